"""Noise calibration: pinned values, the exact privacy profile, validation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpa.privacy.calibration import (
    classical_gaussian_sigma,
    gaussian_delta,
    gaussian_sigma,
    laplace_scale,
)

# Solutions of Phi(D/2s - eps s/D) - e^eps Phi(-D/2s - eps s/D) = delta, found
# independently by a 200-step bisection in 50-digit mpmath arithmetic.
PINNED = [
    # (epsilon, delta, sensitivity, sigma to 12 significant digits)
    (1.0, 1e-5, 1.0, 3.73063163482),
    (0.1, 1e-5, 1.0, 30.7495661320),
    (8.0, 1e-5, 1.0, 0.600229072199),
    (50.0, 1e-5, 1.0, 0.149760607561),
    (500.0, 1e-5, 1.0, 0.0361358989276),
    (1.0, 1e-5, 2.0, 7.46126326963),
]


def _profile_mp(sigma: float, eps: float, sens: float) -> float:
    """Balle and Wang's profile in 50-digit arithmetic (independent of scipy)."""
    mp = pytest.importorskip("mpmath")
    with mp.workdps(50):
        s, e, d = mp.mpf(sigma), mp.mpf(eps), mp.mpf(sens)
        return float(mp.ncdf(d / (2 * s) - e * s / d) - mp.exp(e) * mp.ncdf(-d / (2 * s) - e * s / d))


@pytest.mark.parametrize(("eps", "delta", "sens", "expected"), PINNED)
def test_gaussian_sigma_pinned(eps, delta, sens, expected) -> None:
    sigma = gaussian_sigma(epsilon=eps, delta=delta, sensitivity=sens)
    assert sigma == pytest.approx(expected, rel=1e-9)
    assert sigma >= expected * (1 - 1e-11)  # rounded towards more noise
    # delta(sigma) meets delta, tightly; 0.1% less noise breaks it.
    assert gaussian_delta(sigma=sigma, epsilon=eps, sensitivity=sens) == pytest.approx(delta, rel=1e-9)
    assert gaussian_delta(sigma=sigma, epsilon=eps, sensitivity=sens) <= delta * (1 + 1e-12)
    assert gaussian_delta(sigma=0.999 * sigma, epsilon=eps, sensitivity=sens) > delta


def test_headline_value_four_digits() -> None:
    assert round(gaussian_sigma(epsilon=1.0, delta=1e-5, sensitivity=1.0), 3) == 3.731


@pytest.mark.parametrize(("eps", "delta", "sens", "_"), PINNED)
def test_gaussian_delta_matches_high_precision(eps, delta, sens, _) -> None:
    for sigma in (0.1, 1.0, 5.0, 40.0):
        exact = _profile_mp(sigma * sens, eps, sens)
        got = gaussian_delta(sigma=sigma * sens, epsilon=eps, sensitivity=sens)
        if exact < 1e-300:
            assert got < 1e-290
        else:
            assert got == pytest.approx(exact, rel=1e-9)


def test_large_epsilon_does_not_overflow() -> None:
    for eps in (50.0, 500.0, 5000.0):
        sigma = gaussian_sigma(epsilon=eps, delta=1e-5, sensitivity=1.0)
        assert math.isfinite(sigma) and sigma > 0
        assert gaussian_delta(sigma=sigma, epsilon=eps, sensitivity=1.0) <= 1e-5 * (1 + 1e-9)


@pytest.mark.parametrize("eps", [0.01, 0.1, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("delta", [1e-12, 1e-5, 0.1])
def test_analytic_never_exceeds_classical(eps, delta) -> None:
    analytic = gaussian_sigma(epsilon=eps, delta=delta, sensitivity=1.0)
    classical = classical_gaussian_sigma(epsilon=eps, delta=delta, sensitivity=1.0)
    assert analytic <= classical
    # The classical scale is (eps, delta)-DP too, by the exact profile.
    assert gaussian_delta(sigma=classical, epsilon=eps, sensitivity=1.0) <= delta


def test_classical_formula() -> None:
    got = classical_gaussian_sigma(epsilon=0.5, delta=1e-5, sensitivity=2.0)
    assert got == pytest.approx(math.sqrt(2 * math.log(1.25e5)) * 2.0 / 0.5, rel=1e-15)


@settings(max_examples=150, deadline=None)
@given(
    eps=st.floats(0.01, 100.0),
    log_delta=st.floats(-12.0, math.log10(0.5)),
    log_sens=st.floats(-3.0, 3.0),
)
def test_sigma_meets_delta_tightly(eps, log_delta, log_sens) -> None:
    delta, sens = 10.0**log_delta, 10.0**log_sens
    sigma = gaussian_sigma(epsilon=eps, delta=delta, sensitivity=sens)
    assert gaussian_delta(sigma=sigma, epsilon=eps, sensitivity=sens) <= delta * (1 + 1e-9)
    assert gaussian_delta(sigma=0.999 * sigma, epsilon=eps, sensitivity=sens) > delta
    # sigma scales linearly with the sensitivity.
    unit = gaussian_sigma(epsilon=eps, delta=delta, sensitivity=1.0)
    assert sigma == pytest.approx(unit * sens, rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    eps=st.floats(0.01, 50.0),
    factor=st.floats(1.01, 10.0),
    log_delta=st.floats(-12.0, -1.0),
)
def test_sigma_decreases_with_epsilon_and_delta(eps, factor, log_delta) -> None:
    delta = 10.0**log_delta
    base = gaussian_sigma(epsilon=eps, delta=delta, sensitivity=1.0)
    assert gaussian_sigma(epsilon=eps * factor, delta=delta, sensitivity=1.0) < base
    assert gaussian_sigma(epsilon=eps, delta=min(delta * factor, 0.5), sensitivity=1.0) < base


def test_laplace_scale() -> None:
    assert laplace_scale(epsilon=0.5, sensitivity=2.0) == 4.0
    assert laplace_scale(epsilon=4.0, sensitivity=1.0) == 0.25


def test_infinite_epsilon_means_no_noise() -> None:
    assert gaussian_sigma(epsilon=math.inf, delta=1e-5, sensitivity=1.0) == 0.0
    assert laplace_scale(epsilon=math.inf, sensitivity=1.0) == 0.0


NAN = float("nan")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": NAN, "delta": 1e-5, "sensitivity": 1.0}, "epsilon must not be NaN"),
        ({"epsilon": 0.0, "delta": 1e-5, "sensitivity": 1.0}, r"epsilon must be > 0, got 0\.0"),
        ({"epsilon": -1.0, "delta": 1e-5, "sensitivity": 1.0}, r"epsilon must be > 0, got -1\.0"),
        ({"epsilon": 1.0, "delta": NAN, "sensitivity": 1.0}, "delta must not be NaN"),
        ({"epsilon": 1.0, "delta": 0.0, "sensitivity": 1.0}, r"delta must be in \(0, 1\), got 0\.0"),
        ({"epsilon": 1.0, "delta": 1.0, "sensitivity": 1.0}, r"delta must be in \(0, 1\), got 1\.0"),
        ({"epsilon": 1.0, "delta": -1e-5, "sensitivity": 1.0}, r"delta must be in \(0, 1\)"),
        ({"epsilon": 1.0, "delta": 1e-5, "sensitivity": NAN}, "sensitivity must not be NaN"),
        ({"epsilon": 1.0, "delta": 1e-5, "sensitivity": 0.0}, r"sensitivity must be > 0, got 0\.0"),
        ({"epsilon": 1.0, "delta": 1e-5, "sensitivity": -2.0}, r"sensitivity must be > 0"),
        ({"epsilon": 1.0, "delta": 1e-5, "sensitivity": math.inf}, "sensitivity must be finite"),
    ],
)
def test_gaussian_sigma_validation(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        gaussian_sigma(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": NAN, "sensitivity": 1.0}, "epsilon must not be NaN"),
        ({"epsilon": -0.5, "sensitivity": 1.0}, r"epsilon must be > 0, got -0\.5"),
        ({"epsilon": 1.0, "sensitivity": NAN}, "sensitivity must not be NaN"),
        ({"epsilon": 1.0, "sensitivity": 0.0}, "sensitivity must be > 0"),
        ({"epsilon": 1.0, "sensitivity": math.inf}, "sensitivity must be finite"),
    ],
)
def test_laplace_scale_validation(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        laplace_scale(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma": NAN, "epsilon": 1.0, "sensitivity": 1.0}, "sigma must not be NaN"),
        ({"sigma": 0.0, "epsilon": 1.0, "sensitivity": 1.0}, "sigma must be > 0"),
        ({"sigma": math.inf, "epsilon": 1.0, "sensitivity": 1.0}, "sigma must be finite"),
        ({"sigma": 1.0, "epsilon": math.inf, "sensitivity": 1.0}, "epsilon must be finite"),
        ({"sigma": 1.0, "epsilon": 0.0, "sensitivity": 1.0}, "epsilon must be > 0"),
    ],
)
def test_gaussian_delta_validation(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        gaussian_delta(**kwargs)


@pytest.mark.parametrize("eps", [1.0, 2.0, math.inf])
def test_classical_rejects_epsilon_of_one_or_more(eps) -> None:
    with pytest.raises(ValueError, match="classical Gaussian mechanism needs epsilon < 1"):
        classical_gaussian_sigma(epsilon=eps, delta=1e-5, sensitivity=1.0)


def test_classical_validates_delta() -> None:
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        classical_gaussian_sigma(epsilon=0.5, delta=1.5, sensitivity=1.0)


@pytest.mark.parametrize("bad", ["1.0", None, True])
def test_non_numbers_rejected(bad) -> None:
    with pytest.raises(TypeError, match="epsilon must be a real number"):
        gaussian_sigma(epsilon=bad, delta=1e-5, sensitivity=1.0)
