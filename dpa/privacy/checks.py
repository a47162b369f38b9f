"""Argument checks for every privacy-critical number: one place, one message per check.

The mechanism, the calibration, the accountant, the audit and the CLI all validate through
these functions (the CLI wraps them as typer callbacks, ``dpa.cli.errors.option_check``), so
"epsilon > 0" or "delta in (0, 1)" is decided, and worded, once. Each returns the value as a
plain float or int and raises ``TypeError`` for a non-number, ``ValueError`` otherwise; NaN fails
every comparison and so every check
(``real_number`` names it).
"""

from __future__ import annotations

import math
import numbers

from dpa.contract.errors import UserError

__all__ = ["real_number", "epsilon", "delta", "positive_finite", "count", "noise_multiplier"]


def _float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def real_number(name: str, value: object) -> float:
    """``value`` as a float; rejects non-numbers, booleans and NaN."""
    out = _float(name, value)
    if math.isnan(out):
        raise UserError(f"{name} must not be NaN")
    return out


def epsilon(value: object, *, allow_inf: bool, name: str = "epsilon") -> float:
    """A privacy budget: > 0; ``inf`` (no noise, no privacy) only where ``allow_inf``."""
    eps = _float(name, value)
    hint = " (inf for no noise)" if allow_inf else ""
    if math.isnan(eps):
        raise UserError(f"{name} must not be NaN; {name} must be > 0{hint}")
    if not eps > 0:
        raise UserError(f"{name} must be > 0, got {eps}{hint}")
    if math.isinf(eps) and not allow_inf:
        raise UserError(f"{name} must be finite here, got inf")
    return eps


def delta(value: object, *, allow_zero: bool, mechanism: str = "") -> float:
    """In (0, 1), or in [0, 1) where ``allow_zero`` (pure-DP mechanisms: Laplace ignores delta).
    ``mechanism`` names the mechanism the range is for in the message."""
    d = real_number("delta", value)
    if 0 < d < 1 or (allow_zero and d == 0):
        return d
    if allow_zero:
        why = f" for the {mechanism} mechanism ({mechanism} ignores it)" if mechanism else " (in (0, 1) for gaussian)"
        raise UserError(f"delta must be in [0, 1){why}, got {d}")
    raise UserError(f"delta must be in (0, 1){f' for the {mechanism} mechanism' if mechanism else ''}, got {d}")


def positive_finite(name: str, value: object) -> float:
    """> 0 and finite: a clip, a sensitivity, a noise scale."""
    out = real_number(name, value)
    if not out > 0:
        raise UserError(f"{name} must be > 0, got {out}")
    if math.isinf(out):
        raise UserError(f"{name} must be finite, got {out}")
    return out


def count(name: str, value: object, *, minimum: int = 0) -> int:
    """An integer >= ``minimum``: releases, epochs."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    out = int(value)
    if out < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {out}")
    return out


def noise_multiplier(value: object, *, name: str = "noise_multiplier") -> float:
    """z = noise std / 2C: >= 0 (0: no noise) and finite."""
    nm = real_number(name, value)
    if not nm >= 0:
        raise UserError(f"{name} must be >= 0, got {nm}")
    if math.isinf(nm):
        raise UserError(f"{name} must be finite, got inf")
    return nm
