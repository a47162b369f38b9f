"""The field's metrics for face embeddings: verification on pairs and open-set identification.

Face recognition is judged on people the model never trained on: LFW-style *verification* (are two
images the same person? ROC AUC, true-accept rate at a false-accept rate of 1e-3, accuracy at a
threshold chosen beforehand) and *open-set identification* (a gallery of enrolled identities; a
stranger must be rejected as "unknown"). Thresholds are always chosen on public pairs and then
applied to the private ones, never tuned on the data they are scored on.

Pure numpy + scikit-learn (``roc_auc_score``, ``roc_curve``); no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = [
    "FAR",
    "VerificationPairs",
    "balanced_accuracy",
    "cosine_scores",
    "far_threshold",
    "far_threshold_bound",
    "open_set",
    "roc_points",
    "sample_pairs",
    "unit_rows",
    "verification",
]

#: The false-accept rate the field quotes TAR at (LFW's BLUFR protocol, IJB-B/C's 1e-3 operating point).
FAR = 1e-3


@dataclass(frozen=True)
class VerificationPairs:
    """Index pairs into one set of embeddings, and whether each pair is the same identity."""

    first: np.ndarray  # (P,) int
    second: np.ndarray  # (P,) int
    same: np.ndarray  # (P,) bool


def sample_pairs(labels: np.ndarray, rng: np.random.Generator, *, genuine: int, impostor: int) -> VerificationPairs:
    """Up to ``genuine`` same-identity pairs (all of them if fewer exist) and ``impostor`` pairs of two
    identities, without repeats, drawn from ``rng``; at least 1 / FAR impostors make TAR at FAR meaningful."""
    y = np.asarray(labels).reshape(-1)
    same_i, same_j = [], []
    for k in np.unique(y):
        rows = np.flatnonzero(y == k)
        iu, ju = np.triu_indices(len(rows), 1)
        same_i.append(rows[iu])
        same_j.append(rows[ju])
    gi, gj = np.concatenate(same_i), np.concatenate(same_j)
    if len(gi) > genuine:
        keep = rng.choice(len(gi), genuine, replace=False)
        gi, gj = gi[keep], gj[keep]
    ii = rng.integers(0, len(y), size=4 * impostor)
    jj = rng.integers(0, len(y), size=4 * impostor)
    ok = y[ii] != y[jj]
    lo, hi = np.minimum(ii[ok], jj[ok]), np.maximum(ii[ok], jj[ok])
    _, first = np.unique(lo * len(y) + hi, return_index=True)
    first = np.sort(first)[:impostor]
    first_i, second_i = lo[first], hi[first]
    return VerificationPairs(
        np.concatenate([gi, first_i]),
        np.concatenate([gj, second_i]),
        np.concatenate([np.ones(len(gi), bool), np.zeros(len(first_i), bool)]),
    )


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row (flattened) scaled to unit L2 norm, in float64; an all-zero row stays zero."""
    e = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def cosine_scores(embeddings: np.ndarray, pairs: VerificationPairs, chunk: int = 256) -> np.ndarray:
    """The cosine similarity of each pair (embeddings flattened per row).

    Pairs are gathered ``chunk`` at a time: at conv1_1 a row has 65,536 elements, and gathering all
    13,000 pairs' rows at once took two 6.8 GB arrays and a minute of the demo.
    """
    e = unit_rows(embeddings)
    out = np.empty(len(pairs.first), dtype=e.dtype)
    for lo in range(0, len(out), chunk):
        hi = lo + chunk
        out[lo:hi] = np.einsum("ij,ij->i", e[pairs.first[lo:hi]], e[pairs.second[lo:hi]])
    return out


def far_threshold(impostor_scores: np.ndarray, far: float = FAR) -> float:
    """The smallest threshold at which at most ``far`` of these impostors score above it ("accept": > t)."""
    s = np.sort(np.asarray(impostor_scores, dtype=np.float64))
    allowed = int(np.floor(far * len(s)))
    return float(s[len(s) - allowed - 1]) if allowed < len(s) else float(-np.inf)


def far_threshold_bound(impostor_scores: np.ndarray, far: float, confidence: float = 0.95) -> float:
    """The smallest threshold ("accept": > t) at which the false-accept rate is at most ``far`` with this
    ``confidence``: the Clopper-Pearson upper bound of the share of these impostors it accepts is <= ``far``.

    ``far_threshold`` lets exactly ``far`` of a sample past, so on new impostors it accepts ``far`` give or
    take the sample's error, above it half the time (LFW, 1% on ~1,000 public faces: strangers rejected
    0.979-0.997 over seeds). A user who is promised "at most 1% of strangers get in" wants the bound. Where no
    count of accepts can be certified (fewer than ~300 impostors at 1%), nothing of the sample is accepted."""
    from scipy.stats import beta

    s = np.sort(np.asarray(impostor_scores, dtype=np.float64))[::-1]
    accepted = np.arange(len(s))
    upper = beta.ppf(confidence, accepted + 1, len(s) - accepted)  # the bound when ``accepted`` pass
    allowed = int(np.sum(upper <= far))  # upper grows with accepted: the first ``allowed`` counts qualify
    return float(s[max(allowed - 1, 0)]) if len(s) else float(-np.inf)


def verification(scores: np.ndarray, same: np.ndarray, *, threshold: float | None = None) -> dict[str, float]:
    """ROC AUC, TAR at FAR 1e-3 (threshold from these impostors), and the accuracy at ``threshold``
    (chosen beforehand on public pairs; None: the best threshold on these pairs, an optimistic figure
    only for public data). Accuracy is balanced, (TPR + TNR) / 2: LFW's pairs are half genuine, and
    with many more impostors than genuine pairs "never the same person" would otherwise score best."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(same, dtype=bool)
    t_far = far_threshold(s[~y])
    fpr, tpr, thresholds = roc_curve(y, s)
    if threshold is None:
        finite = np.isfinite(thresholds)
        best = int(np.argmax(np.where(finite, (tpr + 1 - fpr) / 2, -1.0)))
        threshold = float(thresholds[best])
    return {
        "auc": float(roc_auc_score(y, s)),
        "tar_at_far_1e-3": float(np.mean(s[y] > t_far)),
        "accuracy": balanced_accuracy(s, y, threshold),
        "threshold": float(threshold),
        "genuine_pairs": int(y.sum()),
        "impostor_pairs": int((~y).sum()),
    }


def balanced_accuracy(scores: np.ndarray, same: np.ndarray, threshold: float) -> float:
    """(TPR + TNR) / 2 of "same person iff score >= threshold"."""
    accept = np.asarray(scores) >= threshold
    y = np.asarray(same, dtype=bool)
    return float((np.mean(accept[y]) + np.mean(~accept[~y])) / 2)


def open_set(
    known_scores: np.ndarray, known_correct: np.ndarray, stranger_scores: np.ndarray, *, threshold: float
) -> dict[str, float]:
    """Open-set identification at ``threshold`` (chosen on public data): each probe's best gallery score;
    a probe is accepted above it. ``known_correct``: whether an enrolled probe's best match is its own
    identity. Returns the detection-and-identification rate (enrolled probes accepted and right) and
    the rejection rate of strangers (identities never enrolled)."""
    k, c, st = np.asarray(known_scores), np.asarray(known_correct, bool), np.asarray(stranger_scores)
    return {
        "identification_rate_at_threshold": float(np.mean((k > threshold) & c)),
        "open_set_rejection": float(np.mean(st <= threshold)),
        "threshold": float(threshold),
        "strangers": int(st.size),
    }


def roc_points(scores: np.ndarray, same: np.ndarray, points: int = 200) -> dict[str, list[float]]:
    """At most ``points`` evenly spaced points of the ROC curve (false- and true-accept rates), for plots and
    reports."""
    fpr, tpr, _ = roc_curve(same, scores)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), points)).astype(int))
    return {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()}
