"""Noise calibration for DP-A: how much noise a given (epsilon, delta) needs.

Pure math, no I/O, no torch. Every privacy-critical number is a keyword-only
argument and is validated up front (NaN is rejected everywhere).

* :func:`gaussian_sigma` -- the *analytic* Gaussian mechanism of Balle and Wang,
  "Improving the Gaussian Mechanism for Differential Privacy: Analytical
  Calibration and Optimal Denoising", ICML 2018 (Theorem 8, Algorithm 1).
  Exact, and valid for every epsilon > 0.
* :func:`gaussian_delta` -- the exact privacy profile of the Gaussian mechanism
  that :func:`gaussian_sigma` inverts (Balle and Wang, Theorem 8).
* :func:`classical_gaussian_sigma` -- the textbook bound of Dwork and Roth,
  "The Algorithmic Foundations of Differential Privacy", 2014, Theorem A.1;
  valid only for epsilon < 1 and never smaller than the analytic sigma.
* :func:`laplace_scale` -- the Laplace mechanism of Dwork, McSherry, Nissim and
  Smith, "Calibrating Noise to Sensitivity in Private Data Analysis", TCC 2006.

Floating-point caveat: the calibration is exact up to ~1e-10 relative and always
rounded towards more noise; the samplers elsewhere do not defend against
floating-point attacks on the noise itself (Mironov, CCS 2012).
"""

from __future__ import annotations

import math

from scipy.special import log_ndtr

from dpa.contract.errors import UserError
from dpa.privacy import checks
from dpa.privacy.search import smallest_accepted

__all__ = [
    "gaussian_sigma",
    "gaussian_delta",
    "classical_gaussian_sigma",
    "laplace_scale",
]

#: Bisection stops once hi/lo - 1 is below this; the upper end is returned.
_SIGMA_RTOL = 1e-12
#: Generous relative accuracy of log_ndtr and of float64 sums of its values.
_LOG_RTOL = 1e-14


# --------------------------------------------------------------------------- Gaussian


def _log_profile(sigma: float, epsilon: float, sensitivity: float) -> tuple[float, float]:
    """(log delta(sigma), bound on its rounding error) for Balle and Wang, Theorem 8.

    With a = D/(2 sigma) and b = eps sigma / D,
    delta = Phi(a - b) - e^eps Phi(-a - b)
          = Phi(a - b) * (1 - exp(g)),   g = eps + log Phi(-a - b) - log Phi(a - b) < 0,
    using log Phi (``log_ndtr``) so that neither e^eps nor tiny Phi values over-
    or underflow, and ``expm1`` so that the difference keeps its digits.

    The one lossy step is g: when sigma is large (small eps), g is a small
    difference of larger logs. Its absolute error is bounded (generously) by
    _LOG_RTOL * (|eps| + |log Phi(-a-b)| + |log Phi(a-b)|); the returned bound
    propagates it to log delta. Returns (-inf, 0) where delta rounds to 0.
    """
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    log_first = float(log_ndtr(a - b))
    log_tail = float(log_ndtr(-a - b))
    gap = epsilon + log_tail - log_first
    gap_err = _LOG_RTOL * (epsilon + abs(log_tail) + abs(log_first))
    gap = min(gap, 0.0)  # mathematically < 0 for every sigma > 0; clamp rounding
    one_minus = -math.expm1(gap)
    if one_minus <= 0.0:
        return -math.inf, 0.0
    # d/dg log(1 - e^g) = -e^g / (1 - e^g)
    err = gap_err * math.exp(gap) / one_minus + 4 * _LOG_RTOL
    return log_first + math.log(one_minus), err


def gaussian_delta(*, sigma: float, epsilon: float, sensitivity: float) -> float:
    """Exact delta of the Gaussian mechanism N(0, sigma^2 I) at a given epsilon.

    Balle and Wang (ICML 2018), Theorem 8: adding N(0, sigma^2 I) to a function
    with L2 sensitivity D is (epsilon, delta)-DP if and only if

        delta >= Phi(D/(2 sigma) - epsilon sigma/D)
                 - e^epsilon * Phi(-D/(2 sigma) - epsilon sigma/D),

    with Phi the standard normal CDF. Returns the right-hand side (the privacy
    profile), which decreases strictly in sigma and in epsilon.

    Requires sigma > 0 finite, 0 < epsilon < inf, sensitivity > 0 finite.
    """
    sigma = checks.positive_finite("sigma", sigma)
    eps = checks.epsilon(epsilon, allow_inf=False)
    d = checks.positive_finite("sensitivity", sensitivity)
    return math.exp(_log_profile(sigma, eps, d)[0])


def gaussian_sigma(*, epsilon: float, delta: float, sensitivity: float) -> float:
    """Smallest sigma for which N(0, sigma^2 I) noise gives (epsilon, delta)-DP.

    The analytic Gaussian mechanism (Balle and Wang, ICML 2018, Theorem 8 and
    Algorithm 1): sigma is the solution of

        Phi(D/(2 sigma) - eps sigma/D) - e^eps Phi(-D/(2 sigma) - eps sigma/D) = delta

    for L2 sensitivity D. Unlike the classical sqrt(2 ln(1.25/delta)) D / eps
    (valid only for eps < 1), it holds for every eps > 0 and is never larger.

    Solved by bisection on sigma (geometric midpoints, relative width 1e-12)
    with the profile computed stably in log space and padded by a bound on its
    own rounding error; the *upper* end of the final bracket is returned. So the
    exact profile at the result never exceeds ``delta``, and the result is
    within ~1e-10 relative of the exact solution (a few 1e-12 typically).

    ``epsilon = math.inf`` is allowed and returns 0.0 (no noise, no privacy);
    callers that release data are expected to warn about it.
    """
    eps = checks.epsilon(epsilon, allow_inf=True)
    target = checks.delta(delta, allow_zero=False)
    d = checks.positive_finite("sensitivity", sensitivity)
    if math.isinf(eps):
        return 0.0
    log_target = math.log(target)

    # Start from the classical scale (a fine order-of-magnitude guess for any eps).
    guess = d * math.sqrt(2.0 * math.log(1.25 / target)) / eps

    def private_enough(sigma: float) -> bool:
        # Conservative: the profile plus its rounding-error bound must meet delta.
        log_p, err = _log_profile(sigma, eps, d)
        return log_p + err <= log_target

    return smallest_accepted(private_enough, guess=guess, rtol=_SIGMA_RTOL, step=2.0)


def classical_gaussian_sigma(*, epsilon: float, delta: float, sensitivity: float) -> float:
    """The classical Gaussian mechanism scale, valid only for 0 < epsilon < 1.

    Dwork and Roth (2014), Theorem A.1: for eps in (0, 1) and
    c^2 > 2 ln(1.25/delta), N(0, sigma^2) with sigma >= c D / eps is
    (eps, delta)-DP for L2 sensitivity D. Returns

        sigma = sqrt(2 ln(1.25/delta)) * D / eps

    (the infimum of the theorem's admissible scales). Kept as a reference point:
    :func:`gaussian_sigma` is exact, valid for every eps and never larger.
    """
    eps = checks.epsilon(epsilon, allow_inf=True)
    if eps >= 1:
        raise UserError(f"the classical Gaussian mechanism needs epsilon < 1, got {eps}; use gaussian_sigma")
    target = checks.delta(delta, allow_zero=False)
    d = checks.positive_finite("sensitivity", sensitivity)
    return math.sqrt(2.0 * math.log(1.25 / target)) * d / eps


# --------------------------------------------------------------------------- Laplace


def laplace_scale(*, epsilon: float, sensitivity: float) -> float:
    """Scale b of the Laplace mechanism: b = D1 / epsilon.

    Dwork, McSherry, Nissim and Smith (TCC 2006): adding i.i.d. Laplace(0, b)
    noise (density exp(-|z|/b) / (2b)) to every coordinate of a function with
    L1 sensitivity D1 is (epsilon, 0)-DP when b = D1 / epsilon.
    The noise standard deviation per coordinate is sqrt(2) * b.

    ``epsilon = math.inf`` is allowed and returns 0.0 (no noise, no privacy);
    callers that release data are expected to warn about it.
    """
    eps = checks.epsilon(epsilon, allow_inf=True)
    d = checks.positive_finite("sensitivity", sensitivity)
    if math.isinf(eps):
        return 0.0
    return d / eps
