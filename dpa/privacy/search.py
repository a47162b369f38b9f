"""The one search routine of the privacy math: the smallest x > 0 a monotone test accepts.

Calibration (the analytic Gaussian sigma for a per-release epsilon) and the accountant (the
noise multiplier for a whole-run epsilon) both ask "how much noise is just enough?". Both
answers must err towards more noise, so the search returns the *upper* end of its final
bracket: a value the test accepted.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["smallest_accepted"]

#: Safety cap on bracket expansion steps (each multiplies by a growing factor).
_MAX_EXPAND = 2000


def smallest_accepted(accepts: Callable[[float], bool], *, guess: float, rtol: float, step: float) -> float:
    """The smallest x (to relative width ``rtol``) with ``accepts(x)``, where ``accepts`` is monotone:
    false below some threshold, true above it.

    Brackets from ``guess`` by multiplying (or dividing) by ``step``, then by the square of the last
    factor (so a guess far off costs few evaluations), then bisects at geometric midpoints until
    hi / lo - 1 <= ``rtol`` or floating-point resolution is reached. Returns hi, which ``accepts``.
    """
    if not (guess > 0 and math.isfinite(guess) and step > 1 and rtol > 0):
        raise ValueError(f"search needs guess > 0 finite, step > 1 and rtol > 0; got {guess}, {step}, {rtol}")
    hi, factor = guess, step
    for _ in range(_MAX_EXPAND):
        if accepts(hi):
            break
        hi *= factor
        factor *= factor
        if math.isinf(hi):
            raise ArithmeticError("could not bracket the search from above")
    else:  # pragma: no cover - unreachable for a monotone test
        raise ArithmeticError("could not bracket the search from above")
    lo, factor = hi / step, step
    for _ in range(_MAX_EXPAND):
        if not accepts(lo):
            break
        hi = lo
        lo /= factor
        factor *= factor
        if lo == 0.0:
            raise ArithmeticError("could not bracket the search from below")
    else:  # pragma: no cover - unreachable for a monotone test
        raise ArithmeticError("could not bracket the search from below")
    # Invariant: accepts(hi) and not accepts(lo).
    while hi / lo - 1.0 > rtol:
        mid = math.sqrt(lo * hi)
        if not lo < mid < hi:  # floating-point resolution reached
            break
        if accepts(mid):
            hi = mid
        else:
            lo = mid
    return hi
