"""Label differential privacy on the device: randomised response with a prior (RRWithPrior).

Ghazi, Golowich, Kumar, Manurangsi and Zhang, "Deep Learning with Label Differential Privacy"
(NeurIPS 2021), Algorithm 2. Given a prior p over the k classes (what the device believes each
example's label is, from anything but the label itself) and epsilon:

1. order the classes by p, and pick the k* that maximises
   ``e^eps / (e^eps + k* - 1) * (sum of the k* largest p)`` (the chance to send the true label);
2. if the true label is among those k* classes, send it with probability e^eps / (e^eps + k* - 1)
   and each of the other k* - 1 with probability 1 / (e^eps + k* - 1);
3. otherwise send one of the k* classes uniformly.

Whatever the prior, two labels y, y' give output distributions within a factor e^eps of each other:
each release of a label is eps-label-DP. With a uniform prior k* = k and this is plain k-ary
randomised response. The prior may come from the server (its logits for the example's earlier
releases): a lying server can only make the device's labels less useful, never less private.

The choice among classes uses the device's secure generator (``noise_source``).
"""

from __future__ import annotations

import math

import numpy as np

from dpa.contract.errors import UserError
from dpa.privacy import checks

__all__ = ["keep_probability", "top_k_size", "randomize_labels"]


def keep_probability(epsilon: float, k: int) -> float:
    """The probability that k-ary randomised response at ``epsilon`` sends the true label."""
    if k < 1:
        raise UserError(f"randomised response needs k >= 1 classes, got {k}")
    if math.isinf(epsilon):
        return 1.0
    return 1.0 / (1.0 + (k - 1) * math.exp(-epsilon))  # e^eps / (e^eps + k - 1), without overflow


def top_k_size(sorted_prior: np.ndarray, epsilon: float) -> int:
    """k* for one prior sorted in decreasing order: argmax_k keep(eps, k) * (sum of the k largest)."""
    k = np.arange(1, sorted_prior.size + 1)
    gain = np.cumsum(sorted_prior) / (1.0 + (k - 1) * math.exp(-epsilon))
    return int(np.argmax(gain)) + 1


def randomize_labels(
    labels: np.ndarray,
    *,
    epsilon: float,
    num_classes: int,
    rng: np.random.Generator,
    priors: np.ndarray | None = None,
) -> np.ndarray:
    """RRWithPrior for each label (int64, same shape). ``priors``: (B, num_classes) or None (uniform).

    ``epsilon = inf`` returns the labels unchanged (no label privacy). Every label draws the same
    number of random values, whatever the outcome, so a replayed step draws exactly what it did."""
    eps = checks.epsilon(epsilon, allow_inf=True, name="label epsilon")
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(f"labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}")
    if math.isinf(eps):
        return y.copy()
    if priors is None:
        p = np.full((y.size, num_classes), 1.0 / num_classes)
    else:
        p = np.asarray(priors, dtype=np.float64)
        if p.shape != (y.size, num_classes) or not np.all(np.isfinite(p)) or np.any(p < 0):
            raise UserError(f"priors must be finite, >= 0 and of shape ({y.size}, {num_classes}), got {p.shape}")
        p = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-300)
    u = rng.random((y.size, 2))  # (keep or not, which other class): two draws per label, always
    if not y.size:
        return y.copy()
    order = np.argsort(-p, axis=1, kind="stable")  # ties: the lower class first, deterministically
    ranked = np.take_along_axis(p, order, axis=1)
    gain = np.cumsum(ranked, axis=1) / (1.0 + np.arange(num_classes) * math.exp(-eps))
    k = np.argmax(gain, axis=1) + 1  # k* per example (the first maximum)
    pos = np.argmax(order == y[:, None], axis=1)  # where the true label ranks
    keep = 1.0 / (1.0 + (k - 1) * math.exp(-eps))
    inside = pos < k
    other = np.minimum((u[:, 1] * (k - 1)).astype(np.int64), np.maximum(k - 2, 0))
    other = np.where(other < pos, other, other + 1)  # the j-th of the chosen classes other than y
    outside = np.minimum((u[:, 1] * k).astype(np.int64), k - 1)
    kept = inside & ((u[:, 0] < keep) | (k == 1))
    index = np.where(kept, pos, np.where(inside, other, outside))
    return np.take_along_axis(order, index[:, None], axis=1)[:, 0].astype(np.int64)
