"""How much one Gaussian release can tell at most, whatever the number of elements.

A release is ``y = c + n`` with ``||c|| <= C`` (clipping) and ``n ~ N(0, sigma^2 I)``. Its mutual
information with the example is at most the capacity of a Gaussian channel with power C^2:
``I <= C^2 / (2 sigma^2)`` nats, whatever the dimension d (the noise is as spread as the signal can
be). With dpa's noise multiplier ``z = sigma / 2C`` that is

    I <= 1 / (8 z^2) nats per release.

And K releases at noise multiplier z*sqrt(K) carry exactly what one release at z carries (both their
information bound and their privacy, which is why repeating a release buys nothing). At a whole-run
epsilon of 8 (delta 1e-5) in one release, z is about 0.6: at most about 0.35 nats (0.5 bits) per
example. Fano's inequality then caps any classifier of one noisy query among k identities: private
split inference cannot be accurate at such an epsilon, and the useful figure is a model trained from
many releases and used on clean inputs (``runtime_client.on_device``).
"""

from __future__ import annotations

import math

from dpa.privacy import checks

__all__ = ["information_bound_nats", "fano_accuracy_bound"]


def information_bound_nats(noise_multiplier: float, releases: int = 1) -> float:
    """At most this many nats about an example in ``releases`` Gaussian releases at noise multiplier z."""
    z = checks.noise_multiplier(noise_multiplier)
    n = checks.count("releases", releases)
    return math.inf if z == 0 else n / (8.0 * z * z)


def fano_accuracy_bound(information_nats: float, classes: int) -> float:
    """The best accuracy of guessing one of ``classes`` equally likely identities from an observation
    carrying at most ``information_nats``: the largest p with h(p) + (1 - p) ln(k - 1) >= ln k - I."""
    if classes < 2:
        return 1.0
    target = math.log(classes) - information_nats
    if target <= 0:
        return 1.0

    def entropy_bound(p: float) -> float:  # Fano: H(Y|obs) <= h(p_err) + p_err ln(k - 1), p_err = 1 - p
        e = 1.0 - p
        h = 0.0 if e in (0.0, 1.0) else -(e * math.log(e) + (1 - e) * math.log(1 - e))
        return h + e * math.log(classes - 1)

    lo, hi = 1.0 / classes, 1.0  # entropy_bound falls from ln k at p = 1/k to 0 at p = 1
    for _ in range(100):
        mid = (lo + hi) / 2
        if entropy_bound(mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo
