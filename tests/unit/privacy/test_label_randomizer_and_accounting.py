"""Label DP: RRWithPrior against its formulas, and the composed accounting against dp-accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dpa.privacy.accountant import BudgetExceeded, PrivacyAccountant, calibrate_noise_multiplier, epsilon_spent
from dpa.privacy.label_accounting import combined_epsilon, label_epsilon_spent, label_guess_bound
from dpa.privacy.label_randomizer import keep_probability, randomize_labels, top_k_size

DRAWS = 200_000


def test_uniform_prior_keeps_the_label_at_the_formula_rate():
    """k-ary randomised response: keep with e^eps / (e^eps + k - 1), the rest uniform over the others."""
    rng = np.random.default_rng(0)
    labels = np.full(DRAWS, 3)
    for eps, k in ((1.0, 10), (4.0, 10), (0.5, 2)):
        out = randomize_labels(labels % k, epsilon=eps, num_classes=k, rng=rng)
        expected = math.exp(eps) / (math.exp(eps) + k - 1)
        assert keep_probability(eps, k) == pytest.approx(expected, rel=1e-12)
        kept = int((out == labels % k).sum())
        assert stats.binomtest(kept, DRAWS, expected).pvalue > 1e-4, (eps, k, kept / DRAWS, expected)
        others = np.bincount(out[out != labels % k], minlength=k)
        others = np.delete(others, labels[0] % k)
        if k > 2:
            assert stats.chisquare(others).pvalue > 1e-4  # the others are equally likely


def test_prior_restricts_the_output_to_the_top_k_and_is_eps_dp():
    """With a peaked prior only the top k* classes are ever sent; every output's probability under
    any two true labels stays within e^eps (measured on many draws)."""
    eps, k = 2.0, 6
    prior = np.array([0.5, 0.3, 0.1, 0.05, 0.03, 0.02])
    kstar = top_k_size(prior, eps)
    brute = max(range(1, k + 1), key=lambda j: prior[:j].sum() * math.exp(eps) / (math.exp(eps) + j - 1))
    assert kstar == brute == 3  # 0.5, 0.705, 0.708, 0.676 for k* = 1..4
    rng = np.random.default_rng(1)
    freq = np.zeros((k, k))
    for y in range(k):
        out = randomize_labels(
            np.full(DRAWS, y), epsilon=eps, num_classes=k, rng=rng, priors=np.tile(prior, (DRAWS, 1))
        )
        freq[y] = np.bincount(out, minlength=k) / DRAWS
    assert np.all(freq[:, kstar:] == 0)  # outside the top k*: never
    keep = keep_probability(eps, kstar)
    assert freq[0, 0] == pytest.approx(keep, abs=8e-3) and freq[4, 0] == pytest.approx(1 / kstar, abs=8e-3)
    sent = freq[:, :kstar]
    assert (sent.max(axis=0) / sent.min(axis=0)).max() <= math.exp(eps) * 1.1


def test_infinite_epsilon_is_the_identity_and_draws_are_replayable():
    labels = np.arange(10) % 4
    assert np.array_equal(
        randomize_labels(labels, epsilon=math.inf, num_classes=4, rng=np.random.default_rng()), labels
    )
    a = randomize_labels(labels, epsilon=1.0, num_classes=4, rng=np.random.default_rng(7))
    b = randomize_labels(labels, epsilon=1.0, num_classes=4, rng=np.random.default_rng(7))
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="labels must lie in"):
        randomize_labels(np.array([4]), epsilon=1.0, num_classes=4, rng=np.random.default_rng())
    with pytest.raises(ValueError, match="label epsilon"):
        randomize_labels(labels, epsilon=0.0, num_classes=4, rng=np.random.default_rng())


def _reference(nm: float, eps_l: float, n: int, delta: float, pessimistic: bool) -> float:
    """dp-accounting's PLDs composed directly, on a fine grid."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    g = pld.from_gaussian_mechanism(nm, pessimistic_estimate=pessimistic, value_discretization_interval=1e-4)
    r = pld.from_randomized_response(
        2 / (math.exp(eps_l) + 1), 2, pessimistic_estimate=pessimistic, value_discretization_interval=1e-4
    )
    return float(g.compose(r).self_compose(n).get_epsilon_for_delta(delta))


@pytest.mark.parametrize(("nm", "eps_l", "n"), [(0.6, 4.0, 1), (2.0, 1.0, 4), (5.0, 0.5, 8)])
def test_combined_epsilon_matches_dp_accounting_and_never_under_reports(nm, eps_l, n):
    got = combined_epsilon(mechanism="gaussian", noise_multiplier=nm, label_epsilon=eps_l, releases=n, delta=1e-5)
    optimistic = _reference(nm, eps_l, n, 1e-5, pessimistic=False)
    assert got >= optimistic  # an upper bound on the true epsilon
    assert got == pytest.approx(_reference(nm, eps_l, n, 1e-5, pessimistic=True), rel=5e-3)
    # More than either mechanism alone, at most their sum (basic composition).
    alone = epsilon_spent(mechanism="gaussian", noise_multiplier=nm, releases=n, delta=1e-5)
    assert max(alone, n * eps_l * 0.9) < got <= alone + n * eps_l + 1e-6


def test_label_epsilon_alone_and_the_guess_bound():
    assert label_epsilon_spent(label_epsilon=2.0, releases=3) == 6.0  # pure: basic composition is tight
    assert label_epsilon_spent(label_epsilon=2.0, releases=3, delta=1e-5) <= 6.0
    assert label_guess_bound(epsilon=1.0, delta=0.0, classes=10) == pytest.approx(math.e / (math.e + 9))
    assert label_guess_bound(epsilon=2.0, delta=1e-3, classes=5) == pytest.approx(
        (math.exp(2) + 4e-3) / (math.exp(2) + 4)
    )
    assert label_guess_bound(epsilon=math.inf, delta=0.0, classes=5) == 1.0


def test_budget_calibration_covers_labels_and_refuses_when_labels_alone_exceed_it():
    z = calibrate_noise_multiplier(mechanism="gaussian", total_epsilon=8.0, delta=1e-5, releases=2, label_epsilon=1.0)
    spent = combined_epsilon(mechanism="gaussian", noise_multiplier=z, label_epsilon=1.0, releases=2, delta=1e-5)
    assert spent <= 8.0
    assert (
        combined_epsilon(mechanism="gaussian", noise_multiplier=z * 0.99, label_epsilon=1.0, releases=2, delta=1e-5)
        > 8.0
    )
    assert z > calibrate_noise_multiplier(mechanism="gaussian", total_epsilon=8.0, delta=1e-5, releases=2)
    with pytest.raises(BudgetExceeded, match="alone spend"):
        calibrate_noise_multiplier(mechanism="gaussian", total_epsilon=5.0, delta=1e-5, releases=2, label_epsilon=4.0)


def test_accountant_composes_labels_and_restores_them():
    acc = PrivacyAccountant(mechanism="gaussian", noise_multiplier=2.0, delta=1e-5, label_epsilon=1.0)
    acc.record(3)
    assert acc.epsilon == combined_epsilon(
        mechanism="gaussian", noise_multiplier=2.0, label_epsilon=1.0, releases=3, delta=1e-5
    )
    s = acc.summary()
    assert s["label_epsilon"] == 3.0 and s["activation_epsilon"] < s["epsilon"] and s["labels"].startswith("randomised")
    back = PrivacyAccountant.from_state(
        acc.to_state(), mechanism="gaussian", noise_multiplier=2.0, delta=1e-5, label_epsilon=1.0
    )
    assert back.epsilon == acc.epsilon
    with pytest.raises(ValueError, match="label epsilon was 1, now 2"):
        PrivacyAccountant.from_state(
            acc.to_state(), mechanism="gaussian", noise_multiplier=2.0, delta=1e-5, label_epsilon=2.0
        )
    clear = PrivacyAccountant(mechanism="gaussian", noise_multiplier=2.0, delta=1e-5, releases=3)
    assert clear.epsilon == clear.activation_epsilon and clear.summary()["covers"].endswith("in clear")
