"""PLD privacy accounting over a run: agreement with independent computations, calibration, save/restore."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from dp_accounting import GaussianDpEvent, rdp
from dp_accounting.pld import privacy_loss_distribution as pld
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpa.privacy.accountant import (
    BudgetExceeded,
    Mechanism,
    PrivacyAccountant,
    calibrate_noise_multiplier,
    epsilon_spent,
)
from dpa.privacy.calibration import gaussian_delta
from dpa.privacy.mechanism import DPConfig
from dpa.privacy.mechanism import noise_scale_for as sigma_for

G, L = Mechanism.GAUSSIAN, Mechanism.LAPLACE
SQRT2 = math.sqrt(2.0)


def _independent_gaussian(*, sigma: float, clip: float, releases: int, delta: float, interval: float) -> float:
    """N-fold self-composition of the Gaussian PLD with sensitivity 2C, built here from the library's primitives."""
    single = pld.from_gaussian_mechanism(
        standard_deviation=sigma, sensitivity=2.0 * clip, value_discretization_interval=interval
    )
    return single.self_compose(releases).get_epsilon_for_delta(delta)


def _exact_gaussian_delta(*, noise_multiplier: float, releases: int, epsilon: float) -> float:
    """Exact privacy profile (Balle and Wang): N Gaussians compose to one with sensitivity sqrt(N)."""
    return gaussian_delta(sigma=noise_multiplier, epsilon=epsilon, sensitivity=math.sqrt(releases))


# --------------------------------------------------------------------------- pinned agreement


@pytest.mark.parametrize(
    ("nm", "releases", "delta", "pinned", "interval"),
    [
        (1.0, 10, 1e-5, 17.8566, 1e-3),
        (0.5, 100, 1e-5, 284.397, 3e-3),
        (4.0, 50, 1e-6, 9.48224, 1e-3),
    ],
)
def test_gaussian_agrees_with_independent_pld_and_exact_profile(nm, releases, delta, pinned, interval):
    eps = epsilon_spent(mechanism="gaussian", noise_multiplier=nm, releases=releases, delta=delta)
    assert eps == pytest.approx(pinned, rel=1e-4)
    clip = 1.7  # the multiplier is scale-free: sigma = nm * 2C for any C
    independent = _independent_gaussian(
        sigma=nm * 2 * clip, clip=clip, releases=releases, delta=delta, interval=interval
    )
    assert eps == pytest.approx(independent, rel=1e-2)
    # Never under-reported, and tight: the exact profile meets delta at eps but not at 0.99 eps.
    assert _exact_gaussian_delta(noise_multiplier=nm, releases=releases, epsilon=eps) <= delta
    assert _exact_gaussian_delta(noise_multiplier=nm, releases=releases, epsilon=0.99 * eps) > delta
    # The RDP accountant is a looser upper bound.
    rdp_acc = rdp.RdpAccountant()
    rdp_acc.compose(GaussianDpEvent(nm), releases)
    assert eps <= rdp_acc.get_epsilon(delta)


@pytest.mark.parametrize("releases", [1, 10, 100])
def test_laplace_pure_dp_is_exact_and_pld_agrees(releases):
    clip, b = 1.0, 1.0
    nm = SQRT2 * b / (2 * clip)
    pure = releases * 2 * clip / b
    assert epsilon_spent(mechanism="laplace", noise_multiplier=nm, releases=releases, delta=0.0) == pytest.approx(
        pure, rel=1e-12
    )
    eps = epsilon_spent(mechanism="laplace", noise_multiplier=nm, releases=releases, delta=1e-5)
    independent = (
        pld.from_laplace_mechanism(parameter=b, sensitivity=2 * clip, value_discretization_interval=1e-3)
        .self_compose(releases)
        .get_epsilon_for_delta(1e-5)
    )
    assert eps <= pure
    assert eps == pytest.approx(independent, rel=1e-2)
    if releases == 100:
        assert eps == pytest.approx(161.245, rel=1e-4)  # delta > 0 buys a lot over 2N = 200


def test_laplace_l1_shift_in_one_coordinate_is_the_worst_case():
    """The library's LaplaceDpEvent contract: spreading an L1 shift of D over coordinates never costs more."""
    delta = 1e-3
    one = pld.from_laplace_mechanism(parameter=1.0, sensitivity=1.0, value_discretization_interval=1e-3)
    for split in ([0.5, 0.5], [0.9, 0.1], [0.25] * 4):
        spread = None
        for s in split:
            part = pld.from_laplace_mechanism(parameter=1.0, sensitivity=s, value_discretization_interval=1e-3)
            spread = part if spread is None else spread.compose(part)
        for n in (1, 5):
            worst = one.self_compose(n).get_epsilon_for_delta(delta)
            assert spread.self_compose(n).get_epsilon_for_delta(delta) <= worst + 1e-9


def test_one_release_matches_the_per_release_calibration_of_dpconfig():
    # Gaussian: DPConfig's analytic sigma for (eps, delta) has exactly that guarantee for one release.
    cfg = DPConfig(mechanism="gaussian", clip=3.0, epsilon=2.0, delta=1e-5)
    assert sigma_for(noise_multiplier=cfg.noise_multiplier, clip=3.0, mechanism=G) == pytest.approx(cfg.noise_scale)
    eps = epsilon_spent(mechanism=G, noise_multiplier=cfg.noise_multiplier, releases=1, delta=1e-5)
    assert eps == pytest.approx(2.0, rel=1e-3)
    # Laplace: b = 2C / eps, pure DP.
    cfg = DPConfig(mechanism="laplace", clip=3.0, epsilon=2.0, delta=0.0)
    assert sigma_for(noise_multiplier=cfg.noise_multiplier, clip=3.0, mechanism=L) == pytest.approx(cfg.noise_scale)
    assert epsilon_spent(mechanism=L, noise_multiplier=cfg.noise_multiplier, releases=7, delta=0.0) == pytest.approx(
        14.0, rel=1e-12
    )


def test_sigma_for_conventions():
    assert sigma_for(noise_multiplier=1.5, clip=2.0, mechanism="gaussian") == 6.0
    assert sigma_for(noise_multiplier=1.5, clip=2.0, mechanism="laplace") == pytest.approx(6.0 / SQRT2)
    with pytest.raises(ValueError, match="clip must be > 0"):
        sigma_for(noise_multiplier=1.0, clip=0.0, mechanism="gaussian")


# --------------------------------------------------------------------------- edge cases and validation


def test_edge_cases():
    assert epsilon_spent(mechanism=G, noise_multiplier=1.0, releases=0, delta=1e-5) == 0.0
    assert epsilon_spent(mechanism=L, noise_multiplier=0.0, releases=0, delta=0.0) == 0.0
    assert epsilon_spent(mechanism=G, noise_multiplier=0.0, releases=1, delta=1e-5) == math.inf
    assert epsilon_spent(mechanism=L, noise_multiplier=0.0, releases=3, delta=1e-5) == math.inf
    # Gaussian with mu = sqrt(N)/z <= delta sqrt(2 pi) is (0, delta)-DP already.
    assert epsilon_spent(mechanism=G, noise_multiplier=1e6, releases=3, delta=1e-5) == 0.0
    assert _exact_gaussian_delta(noise_multiplier=1e6, releases=3, epsilon=1e-12) <= 1e-5
    assert 0 < epsilon_spent(mechanism=G, noise_multiplier=1e4, releases=3, delta=1e-5) < 1e-3
    # numpy scalars are accepted
    assert epsilon_spent(
        mechanism=G, noise_multiplier=np.float32(1.0), releases=np.int64(10), delta=1e-5
    ) == pytest.approx(17.8566, rel=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"noise_multiplier": -1.0}, ValueError, "noise_multiplier must be >= 0"),
        ({"noise_multiplier": math.nan}, ValueError, "noise_multiplier must not be NaN"),
        ({"noise_multiplier": math.inf}, ValueError, "noise_multiplier must be finite"),
        ({"noise_multiplier": "1"}, TypeError, "noise_multiplier must be a real number"),
        ({"releases": -1}, ValueError, "releases must be >= 0"),
        ({"releases": 2.0}, TypeError, "releases must be an integer"),
        ({"releases": True}, TypeError, "releases must be an integer"),
        ({"delta": 0.0}, ValueError, r"delta must be in \(0, 1\) for the gaussian"),
        ({"delta": 1.0}, ValueError, r"delta must be in \(0, 1\) for the gaussian"),
        ({"delta": 1.0, "mechanism": "laplace"}, ValueError, r"delta must be in \[0, 1\) for the laplace"),
        ({"mechanism": "exponential"}, ValueError, "unknown mechanism 'exponential'"),
    ],
)
def test_epsilon_spent_rejects_bad_parameters(kwargs, exc, match):
    args = {"mechanism": "gaussian", "noise_multiplier": 1.0, "releases": 3, "delta": 1e-5} | kwargs
    with pytest.raises(exc, match=match):
        epsilon_spent(**args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"total_epsilon": 0.0}, "total_epsilon must be > 0"),
        ({"total_epsilon": math.inf}, "total_epsilon must be finite"),
        ({"total_epsilon": math.nan}, "total_epsilon must not be NaN"),
        ({"releases": 0}, "releases must be >= 1"),
        ({"delta": 0.0}, r"delta must be in \(0, 1\)"),
    ],
)
def test_calibrate_rejects_bad_parameters(kwargs, match):
    args = {"mechanism": "gaussian", "total_epsilon": 1.0, "releases": 3, "delta": 1e-5} | kwargs
    with pytest.raises(ValueError, match=match):
        calibrate_noise_multiplier(**args)


@pytest.mark.parametrize(("mechanism", "delta"), [(G, 1e-5), (L, 1e-5), (L, 0.0)])
def test_epsilon_is_monotone_in_releases_and_noise(mechanism, delta):
    eps = [epsilon_spent(mechanism=mechanism, noise_multiplier=2.0, releases=n, delta=delta) for n in range(0, 41, 4)]
    assert eps[0] == 0.0
    assert all(a < b for a, b in zip(eps, eps[1:], strict=False))
    by_noise = [
        epsilon_spent(mechanism=mechanism, noise_multiplier=z, releases=10, delta=delta) for z in (0.5, 1, 2, 4)
    ]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:], strict=False))


# --------------------------------------------------------------------------- calibration


def test_calibrate_pinned_and_pure_laplace_closed_form():
    nm = calibrate_noise_multiplier(mechanism=G, total_epsilon=8.0, delta=1e-5, releases=10)
    assert nm == pytest.approx(1.89811, rel=1e-4)
    nm = calibrate_noise_multiplier(mechanism=L, total_epsilon=8.0, delta=0.0, releases=10)
    assert nm == pytest.approx(SQRT2 * 10 / 8.0, rel=1e-12)  # b = 2C N / E
    assert epsilon_spent(mechanism=L, noise_multiplier=nm, releases=10, delta=0.0) <= 8.0


@settings(max_examples=16, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    mechanism=st.sampled_from([G, L]),
    total_epsilon=st.floats(0.1, 50.0),
    log10_delta=st.floats(-9.0, -3.0),
    releases=st.integers(1, 200),
)
def test_calibrated_multiplier_is_within_budget_and_tight(mechanism, total_epsilon, log10_delta, releases):
    delta = 10.0**log10_delta
    nm = calibrate_noise_multiplier(mechanism=mechanism, total_epsilon=total_epsilon, delta=delta, releases=releases)
    assert epsilon_spent(mechanism=mechanism, noise_multiplier=nm, releases=releases, delta=delta) <= total_epsilon
    assert (
        epsilon_spent(mechanism=mechanism, noise_multiplier=0.99 * nm, releases=releases, delta=delta) > total_epsilon
    )


# --------------------------------------------------------------------------- the running accountant


def test_accountant_records_until_the_budget_then_refuses():
    nm = calibrate_noise_multiplier(mechanism=G, total_epsilon=4.0, delta=1e-5, releases=5)
    acc = PrivacyAccountant(mechanism="gaussian", noise_multiplier=nm, delta=1e-5, budget_epsilon=4.0)
    assert acc.mechanism is G and acc.releases == 0 and acc.epsilon == 0.0
    assert acc.can_release(5) and not acc.can_release(6)
    acc.record(3)
    acc.record()
    acc.record()
    assert acc.releases == 5
    assert acc.epsilon == epsilon_spent(mechanism=G, noise_multiplier=nm, releases=5, delta=1e-5) <= 4.0
    assert not acc.can_release()
    after = acc.epsilon_after(1)
    with pytest.raises(BudgetExceeded) as info:
        acc.record()
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "budget 4" in message and f"{acc.epsilon:.6g}" in message and f"{after:.6g}" in message
    assert "1 more" in message and "nothing was recorded" in message
    assert acc.releases == 5  # nothing recorded
    acc.record(0)  # a no-op is always allowed
    assert acc.releases == 5


def test_accountant_without_budget_and_validation():
    acc = PrivacyAccountant(mechanism=L, noise_multiplier=SQRT2, delta=0.0)
    assert acc.budget_epsilon == math.inf
    acc.record(1000)
    assert acc.epsilon == pytest.approx(1000.0)
    assert acc.summary() == {
        "epsilon": acc.epsilon,
        "delta": 0.0,
        "noise_multiplier": SQRT2,
        "releases": 1000,
        "mechanism": "laplace",
        "accountant": "pld",
        "labels": "in clear",
        "activation_epsilon": acc.epsilon,
        "label_epsilon_per_release": None,
        "label_epsilon": None,
        "covers": "activations only: labels travel in clear",
    }
    with pytest.raises(ValueError, match="budget_epsilon must be > 0"):
        PrivacyAccountant(mechanism=G, noise_multiplier=1.0, delta=1e-5, budget_epsilon=0.0)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        PrivacyAccountant(mechanism=G, noise_multiplier=1.0, delta=0.0)
    with pytest.raises(ValueError, match="releases must be >= 0"):
        PrivacyAccountant(mechanism=G, noise_multiplier=1.0, delta=1e-5, releases=-1)
    with pytest.raises(ValueError, match="extra must be >= 0"):
        acc.record(-1)


def test_state_round_trip_through_json_and_float32():
    acc = PrivacyAccountant(mechanism=G, noise_multiplier=1.234567891, delta=1e-5, budget_epsilon=30.0)
    acc.record(7)
    state = acc.to_state()
    assert all(k.startswith("accountant.") for k in state)
    assert all(isinstance(v, int | float | str) for v in state.values())
    assert state["accountant.releases"] == 7 and state["accountant.mechanism"] == "gaussian"
    restored = PrivacyAccountant.from_state(
        json.loads(json.dumps(state)) | {"other.key": 3}, mechanism=G, noise_multiplier=1.234567891, delta=1e-5
    )
    assert restored == acc and restored.epsilon == acc.epsilon
    # ONNX Runtime checkpoint properties hold float32
    f32 = {k: float(np.float32(v)) if isinstance(v, float) else v for k, v in state.items()}
    restored = PrivacyAccountant.from_state(f32, mechanism="gaussian", noise_multiplier=1.234567891, delta=1e-5)
    assert restored.releases == 7 and restored.noise_multiplier == 1.234567891
    # An infinite budget is left out (strict JSON) and restored as inf; a new budget may be given.
    unlimited = PrivacyAccountant(mechanism=L, noise_multiplier=1.0, delta=0.0, releases=2)
    state = unlimited.to_state()
    assert "accountant.budget_epsilon" not in state
    json.dumps(state, allow_nan=False)
    assert PrivacyAccountant.from_state(state, mechanism=L, noise_multiplier=1.0, delta=0.0) == unlimited
    capped = PrivacyAccountant.from_state(state, mechanism=L, noise_multiplier=1.0, delta=0.0, budget_epsilon=5.0)
    assert capped.budget_epsilon == 5.0 and capped.releases == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mechanism": "laplace", "delta": 1e-5}, "mechanism was 'gaussian', now 'laplace'"),
        ({"noise_multiplier": 1.01}, "noise_multiplier was 1.0, now 1.01"),
        ({"delta": 1e-6}, "delta was 1e-05, now 1e-06"),
    ],
)
def test_restoring_with_other_settings_is_rejected(kwargs, match):
    state = PrivacyAccountant(mechanism=G, noise_multiplier=1.0, delta=1e-5, releases=3).to_state()
    args = {"mechanism": "gaussian", "noise_multiplier": 1.0, "delta": 1e-5} | kwargs
    with pytest.raises(ValueError, match=match):
        PrivacyAccountant.from_state(state, **args)


def test_restoring_a_broken_state_is_rejected():
    state = PrivacyAccountant(mechanism=G, noise_multiplier=1.0, delta=1e-5, releases=3).to_state()
    args = {"mechanism": G, "noise_multiplier": 1.0, "delta": 1e-5}
    with pytest.raises(ValueError, match="no 'accountant.releases'"):
        PrivacyAccountant.from_state({k: v for k, v in state.items() if k != "accountant.releases"}, **args)
    with pytest.raises(ValueError, match="releases must be >= 0"):
        PrivacyAccountant.from_state(state | {"accountant.releases": -2}, **args)
    with pytest.raises(ValueError, match="of kind 'rdp'"):
        PrivacyAccountant.from_state(state | {"accountant.kind": "rdp"}, **args)
