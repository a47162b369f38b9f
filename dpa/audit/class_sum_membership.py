"""Membership inference on class sums: does one image's presence in a noisy sum show?

Reconstruction through a deep cut is blind (a MAP inversion of a noiseless fc7 activation scores at
the no-data baseline), so "the attack stays at the baseline" says nothing about the noise there
(issue 27). This test has power at every cut. For a candidate image x of class c with clipped,
centred activation a_x, and the attacker's public mean activation mu, it scores

    score(x) = <S_c - n_c mu, a_x - mu> - ||a_x - mu||^2 / 2,

the log-likelihood ratio of "x is in the sum" against "it is not" when the other members are
modelled as i.i.d. around mu and the noise as isotropic Gaussian (the Neyman-Pearson test up to a
constant factor). Members are the images summed into S_c; non-members, held-out images of the same
identity, so a high score means "this image", not "this identity". The AUC comes with a bootstrap
95% interval, the same test on the noiseless sums of the same images (its power without noise),
and the limit the Gaussian mechanism allows it.

The limit. Adding one image x (at most the clip C in norm) with its count C moves (S, N) by at most
sqrt(2) C, and the noise on every element is N(0, (2 z C)^2), so the best test of "x in" against
"x out" separates two Gaussians mu = sqrt(2) C / (2 z C) = 1 / (sqrt(2) z) apart: AUC at most
Phi(mu / sqrt 2) (Dong, Roth and Su, "Gaussian differential privacy", 2019/2022, the ROC of mu-GDP).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.stats import norm

from dpa.audit.membership import auc_mann_whitney

__all__ = ["gaussian_membership_auc_limit", "membership_test", "class_sum_membership"]

#: Bootstrap resamples for the AUC's interval, and its seed (the interval is a property of the data).
_BOOTSTRAP = 1000
_BOOTSTRAP_SEED = 0


def gaussian_membership_auc_limit(noise_multiplier: float) -> float:
    """The largest AUC any membership test reaches on a class-sum release at noise multiplier z:
    Phi(mu / sqrt(2)) with mu = 1 / (sqrt(2) z) (module docstring). z = 0: 1."""
    if noise_multiplier <= 0:
        return 1.0
    mu = 1.0 / (math.sqrt(2.0) * noise_multiplier)
    return float(norm.cdf(mu / math.sqrt(2.0)))


def membership_test(
    sums: np.ndarray, counts: np.ndarray, mu: np.ndarray, candidates: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """score(x) for each candidate (rows of ``candidates``, clipped centred activations, flattened),
    against the sum of its own class ``labels``: <S_c - n_c mu, a_x - mu> - ||a_x - mu||^2 / 2."""
    s = np.asarray(sums, dtype=np.float64).reshape(len(sums), -1)
    m = np.asarray(mu, dtype=np.float64).reshape(-1)
    a = np.asarray(candidates, dtype=np.float64).reshape(len(candidates), -1) - m
    rest = s[labels] - np.asarray(counts, dtype=np.float64)[labels, None] * m
    return np.einsum("ij,ij->i", rest, a) - 0.5 * np.einsum("ij,ij->i", a, a)


def _auc_with_interval(members: np.ndarray, held: np.ndarray) -> dict[str, float]:
    rng = np.random.default_rng(_BOOTSTRAP_SEED)
    boots = [
        auc_mann_whitney(rng.choice(members, members.size), rng.choice(held, held.size)) for _ in range(_BOOTSTRAP)
    ]
    low, high = np.percentile(boots, [2.5, 97.5])
    return {"auc": auc_mann_whitney(members, held), "ci_low": float(low), "ci_high": float(high)}


def class_sum_membership(
    *,
    sums: np.ndarray,
    counts: np.ndarray,
    noise_multiplier: float,
    clip: float,
    activations: Callable[[list[str]], np.ndarray],
    members: dict[int, list[str]],
    held_out: dict[int, list[str]],
    public_mean: np.ndarray,
) -> dict[str, Any]:
    """The membership test on the noisy sums the server received and on the noiseless sums of the same
    images. ``activations(paths)``: the clipped, centred activations (N, d) of those images, as the
    device computed them. ``members``: every image summed into each class (the noiseless sums are
    rebuilt from them); ``held_out``: images of the same identities that were not."""
    classes = sorted(k for k in members if held_out.get(k))
    member_rows, held_rows, exact = [], [], np.zeros_like(np.asarray(sums, dtype=np.float64).reshape(len(sums), -1))
    exact_counts = np.zeros(len(sums), dtype=np.float64)
    m_labels: list[int] = []
    h_labels: list[int] = []
    for k in classes:
        a = activations(members[k])
        exact[k] = a.sum(axis=0)
        exact_counts[k] = len(a)
        member_rows.append(a)
        m_labels += [k] * len(a)
        h = activations(held_out[k])
        held_rows.append(h)
        h_labels += [k] * len(h)
    mem, held = np.concatenate(member_rows), np.concatenate(held_rows)
    ml, hl = np.asarray(m_labels), np.asarray(h_labels)

    def scores(s: np.ndarray, n: np.ndarray) -> dict[str, float]:
        return _auc_with_interval(
            membership_test(s, n, public_mean, mem, ml), membership_test(s, n, public_mean, held, hl)
        )

    return {
        "test": "<S_c - n_c mu, a_x - mu> - ||a_x - mu||^2 / 2, members against held-out images of the same identity",
        "members": int(len(mem)),
        "held_out": int(len(held)),
        "noisy": scores(sums, counts),
        "noiseless": scores(exact, exact_counts),
        "limit": gaussian_membership_auc_limit(noise_multiplier),
        "noise_multiplier": noise_multiplier,
        "clip": clip,
    }
