"""The verification and open-set metrics against independent references (issue 23)."""

from __future__ import annotations

import numpy as np
import pytest

from dpa.audit.membership import auc_mann_whitney
from dpa.faces.synth import _traits
from dpa.faces.verification import (
    FAR,
    cosine_scores,
    far_threshold,
    far_threshold_bound,
    open_set,
    sample_pairs,
    verification,
)
from exporter.pretrain import PUBLIC_SEED, VALIDATION_SEED


def test_pairs_are_what_they_say_and_never_repeat():
    labels = np.repeat(np.arange(30), 5)
    pairs = sample_pairs(labels, np.random.default_rng(0), genuine=100, impostor=2000)
    assert pairs.same.sum() == 100 and (~pairs.same).sum() == 2000
    np.testing.assert_array_equal(labels[pairs.first] == labels[pairs.second], pairs.same)
    assert np.all(pairs.first != pairs.second)
    lo, hi = np.minimum(pairs.first, pairs.second), np.maximum(pairs.first, pairs.second)
    keys = set(zip(lo.tolist(), hi.tolist(), strict=True))
    assert len(keys) == len(pairs.same)
    few = sample_pairs(labels, np.random.default_rng(0), genuine=10**6, impostor=10)
    assert few.same.sum() == 30 * 10  # every genuine pair when fewer exist than asked: 30 x C(5, 2)


def test_auc_equals_the_mann_whitney_statistic_and_tar_counts_above_the_far_threshold():
    rng = np.random.default_rng(1)
    same = np.r_[np.ones(500, bool), np.zeros(5000, bool)]
    scores = np.r_[rng.normal(1.0, 1.0, 500), rng.normal(0.0, 1.0, 5000)]
    v = verification(scores, same)
    assert v["auc"] == pytest.approx(auc_mann_whitney(scores[same], scores[~same]), abs=1e-12)
    t = far_threshold(scores[~same])
    assert np.mean(scores[~same] > t) <= FAR < np.mean(scores[~same] >= t) + 1e-12
    assert v["tar_at_far_1e-3"] == pytest.approx(np.mean(scores[same] > t))
    accept = scores >= 0.5
    balanced = (np.mean(accept[same]) + np.mean(~accept[~same])) / 2
    assert verification(scores, same, threshold=0.5)["accuracy"] == pytest.approx(balanced)
    assert np.isfinite(verification(scores, same)["threshold"])  # never "reject every pair"


def test_cosine_scores_and_open_set():
    e = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    pairs = sample_pairs(np.array([0, 0, 1]), np.random.default_rng(0), genuine=1, impostor=2)
    s = cosine_scores(e, pairs)
    np.testing.assert_allclose(s, [1.0, 0.0, 0.0], atol=1e-12)
    r = open_set(np.array([0.9, 0.8, 0.2]), np.array([True, False, True]), np.array([0.1, 0.7]), threshold=0.5)
    assert r["identification_rate_at_threshold"] == pytest.approx(1 / 3) and r["open_set_rejection"] == 0.5


def test_public_training_validation_and_device_identities_are_different_people():
    """Names may repeat across seeds (2000 names); the people do not: each seed draws its own traits."""
    device = {_traits(0, k) for k in range(100)}
    for seed in (PUBLIC_SEED, VALIDATION_SEED):
        assert not device & {_traits(seed, k) for k in range(1000)}
    assert len({PUBLIC_SEED, VALIDATION_SEED, 0}) == 3


@pytest.mark.parametrize("n", [150, 400, 1000, 3000])
def test_the_far_bound_accepts_the_most_impostors_the_binomial_still_certifies(n: int) -> None:
    """Reference: the Clopper-Pearson bound is <= 1% exactly when seeing so few accepts would be unlikely (<= 5%)
    at a true rate of 1%: scipy's binomial CDF, not the beta quantile the function uses."""
    from scipy.stats import binom

    scores = np.random.default_rng(n).standard_normal(n)
    t = far_threshold_bound(scores, 0.01, 0.95)
    accepted = int(np.sum(scores > t))
    if binom.cdf(0, n, 0.01) > 0.05:  # too few impostors to certify anything: none of them is accepted
        assert accepted == 0 and t == scores.max()
        return
    assert binom.cdf(accepted, n, 0.01) <= 0.05 < binom.cdf(accepted + 1, n, 0.01)
    assert accepted < 0.01 * n  # stricter than the point estimate far_threshold
    assert t >= far_threshold(scores, 0.01)
