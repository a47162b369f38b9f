"""The class-sum release: its sensitivity (labels included) against brute force, its noise against the
formula, and its account against the analytic Gaussian mechanism's exact delta (Balle and Wang 2018)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from dpa.privacy.accountant import calibrate_noise_multiplier, epsilon_spent
from dpa.privacy.class_sums import ClassSums, class_sums_sensitivity, contributions, release_class_sums
from dpa.privacy.clipping import clip_factors, l2_norms, scale_examples

C, K, D = 3.0, 5, 40


def _clipped(rng: np.random.Generator, n: int, scale: float = 4.0) -> np.ndarray:
    a = rng.normal(0, scale, (n, D))
    return scale_examples(a, clip_factors(l2_norms(a), clip=C))


def test_replacing_one_example_moves_the_sums_by_at_most_2c_whatever_its_label():
    rng = np.random.default_rng(0)
    x, y = _clipped(rng, 30), rng.integers(0, K, 30)
    base = contributions(x, y, K, C)
    worst = 0.0
    for trial in range(300):
        i = trial % 30
        x2, y2 = x.copy(), y.copy()
        x2[i] = _clipped(rng, 1, scale=rng.choice([0.01, 1.0, 10.0]))[0]
        y2[i] = rng.integers(0, K)
        worst = max(worst, float(np.linalg.norm(contributions(x2, y2, K, C) - base)))
    assert worst <= class_sums_sensitivity(C) + 1e-9
    # The bound is attained: the opposite activation under the same label, and two full-norm ones under two.
    u = x[0] / np.linalg.norm(x[0]) * C
    x2 = x.copy()
    x2[0], x[0] = -u, u
    same = np.linalg.norm(contributions(x2, y, K, C) - contributions(x, y, K, C))
    y2 = y.copy()
    y2[0] = (y[0] + 1) % K
    x3 = x.copy()
    x3[0] = u
    moved = np.linalg.norm(contributions(x3, y2, K, C) - contributions(x, y, K, C))
    assert same == pytest.approx(2 * C) and moved == pytest.approx(2 * C)


def test_the_sums_are_the_per_class_sums_and_counts():
    rng = np.random.default_rng(1)
    x, y = _clipped(rng, 20), rng.integers(0, K, 20)
    s = contributions(x, y, K, C)
    for k in range(K):
        np.testing.assert_allclose(s[k, :-1], x[y == k].sum(axis=0), atol=1e-12)
        assert s[k, -1] == C * np.sum(y == k)


def test_unclipped_or_non_finite_activations_and_bad_labels_are_refused():
    rng = np.random.default_rng(2)
    x, y = _clipped(rng, 4), np.array([0, 1, 2, 3])
    with pytest.raises(ValueError, match="clipped to norm"):
        contributions(x * 2, y, K, C)
    x[1, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        contributions(x, y, K, C)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        contributions(_clipped(rng, 4), np.array([0, 1, 2, 5]), K, C)


def test_the_noise_has_the_calibrated_standard_deviation_on_sums_and_counts():
    rng = np.random.default_rng(3)
    x, y = _clipped(rng, 50), rng.integers(0, K, 50)
    exact = contributions(x, y, K, C)
    z = 0.6
    draws = [release_class_sums(exact, clip=C, noise_multiplier=z, rng=np.random.default_rng(s)) for s in range(40)]
    sums_noise = np.stack([d.sums - exact[:, :-1] for d in draws])
    count_noise = np.stack([d.counts - exact[:, -1] / C for d in draws])
    assert draws[0].noise_scale == 2 * z * C
    assert np.std(sums_noise) == pytest.approx(2 * z * C, rel=0.03)  # 8,000 draws
    assert np.std(count_noise) == pytest.approx(2 * z, rel=0.15)  # 200 draws: the count's own scale, 2z
    assert abs(np.mean(sums_noise)) < 0.05 * 2 * z * C
    exact_release = release_class_sums(exact, clip=C, noise_multiplier=0.0, rng=rng)
    np.testing.assert_allclose(exact_release.sums, exact[:, :-1], rtol=1e-6)


def test_means_divide_by_the_noisy_count_and_drop_classes_never_seen():
    sums = np.array([[2.0, 4.0], [1.0, 1.0], [3.0, 0.0]], dtype=np.float32)
    counts = np.array([2.0, 0.3, 0.6], dtype=np.float32)
    np.testing.assert_allclose(ClassSums(sums, counts, 1.0).means(), [[1.0, 2.0], [0.0, 0.0], [3.0, 0.0]])


def _analytic_delta(epsilon: float, z: float) -> float:
    """delta(epsilon) of one Gaussian mechanism with sigma / sensitivity = z (Balle and Wang, ICML 2018, thm 8)."""
    return float(norm.cdf(-epsilon * z + 1 / (2 * z)) - math.exp(epsilon) * norm.cdf(-epsilon * z - 1 / (2 * z)))


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_one_class_sum_release_is_accounted_as_one_gaussian_release(epsilon):
    """The plan's z for a whole-run epsilon is tight against the exact delta of one Gaussian release."""
    z = calibrate_noise_multiplier(mechanism="gaussian", total_epsilon=epsilon, delta=1e-5, releases=1)
    assert epsilon_spent(mechanism="gaussian", noise_multiplier=z, releases=1, delta=1e-5) <= epsilon
    assert _analytic_delta(epsilon, z) <= 1e-5 * 1.001
    assert _analytic_delta(epsilon, z * 0.99) > 1e-5  # 1% less noise would break the budget


def test_class_sum_templates_carry_n_times_less_noise_than_averaged_per_example_releases():
    """At the same noise multiplier (one release each: the same epsilon), a class's template from its n
    per-example releases has noise variance sigma^2 / n per element; from the class sums, sigma^2 / n^2
    (plus the noisy count's share). Measured against those formulas on clustered data, and the
    templates' accuracy on clean inputs follows."""
    rng = np.random.default_rng(5)
    k, d, n, c = 6, 256, 50, 1.0
    centres = rng.normal(0, 1, (k, d))
    centres *= 0.3 * c / np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(k), m)
        a = centres[y] + rng.normal(0, 0.9 * c / math.sqrt(d), (len(y), d))
        return scale_examples(a, clip_factors(l2_norms(a), clip=c)), y

    x, y = draw(n)
    xt, yt = draw(40)
    z = calibrate_noise_multiplier(mechanism="gaussian", total_epsilon=8.0, delta=1e-5, releases=1)
    sigma = 2 * z * c
    true = np.stack([x[y == q].mean(axis=0) for q in range(k)])
    per_example = np.stack([(x[y == q] + rng.normal(0, sigma, x[y == q].shape)).mean(axis=0) for q in range(k)])
    sums = release_class_sums(contributions(x, y, k, c), clip=c, noise_multiplier=z, rng=rng)
    from_sums = sums.means()
    assert np.var(per_example - true) == pytest.approx(sigma**2 / n, rel=0.1)
    # sums / (n + e) - mean = (noise - e mean) / (n + e): about sigma^2 / n^2 per element
    assert np.var(from_sums - true) == pytest.approx(sigma**2 / n**2, rel=0.2)

    def accuracy(templates: np.ndarray) -> float:
        return float(((xt @ templates.T).argmax(axis=1) == yt).mean())

    assert accuracy(true) == 1.0
    print(f"\nclean accuracy: class sums {accuracy(from_sums):.3f}, per-example {accuracy(per_example):.3f}")
    assert accuracy(from_sums) > 0.9 and accuracy(per_example) < 0.6


def test_add_remove_sensitivity_is_c_by_brute_force_over_every_neighbour() -> None:
    """Add-remove, no counts: adding or removing any one example (any label) moves the totals by <= C; the
    same release under replace-one moves them by up to 2C, which is what its replace-one epsilon reads."""
    from dpa.privacy.class_sums import Adjacency, replace_one_noise_multiplier

    rng = np.random.default_rng(3)
    x, y = _clipped(rng, 12), rng.integers(0, K, 12)
    base = contributions(x, y, K, C, counts=False)
    assert np.all(base[:, -1] == 0)
    worst_removed = max(
        np.linalg.norm(contributions(np.delete(x, i, 0), np.delete(y, i), K, C, counts=False) - base)
        for i in range(len(x))
    )
    extra = _clipped(rng, 1)
    worst_added = max(
        np.linalg.norm(contributions(np.vstack([x, extra]), np.append(y, k), K, C, counts=False) - base)
        for k in range(K)
    )
    assert max(worst_removed, worst_added) <= class_sums_sensitivity(C, Adjacency.ADD_REMOVE) + 1e-9
    assert class_sums_sensitivity(C, Adjacency.ADD_REMOVE) == pytest.approx(C)
    replaced = np.linalg.norm(contributions(np.vstack([x[1:], -x[:1]]), np.append(y[1:], y[0]), K, C, counts=False)
                              - base)  # fmt: skip
    assert replaced == pytest.approx(2 * np.linalg.norm(x[0]))  # replacing x by -x: 2C, hence z / 2 under it
    assert replace_one_noise_multiplier(3.0, Adjacency.ADD_REMOVE) == 1.5


def test_add_remove_release_has_public_counts_and_noise_z_c() -> None:
    from dpa.privacy.class_sums import Adjacency

    rng = np.random.default_rng(4)
    x, y = _clipped(rng, 30), rng.integers(0, K, 30)
    exact = contributions(x, y, K, C, counts=False)
    z = 1.7
    draws = [release_class_sums(exact, clip=C, noise_multiplier=z, rng=np.random.default_rng(s),
                                adjacency=Adjacency.ADD_REMOVE) for s in range(60)]  # fmt: skip
    assert all(np.all(d.counts == 1) for d in draws)  # a public constant: nothing of the data, no noise
    noise = np.stack([d.sums for d in draws]) - exact[:, :-1]
    assert np.std(noise) == pytest.approx(z * C, rel=0.05)
    assert draws[0].noise_scale == pytest.approx(z * C)
    with pytest.raises(ValueError, match="carries no counts"):
        release_class_sums(contributions(x, y, K, C), clip=C, noise_multiplier=z, rng=rng,
                           adjacency=Adjacency.ADD_REMOVE)  # fmt: skip
