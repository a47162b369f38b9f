"""Loss-threshold membership inference (Yeom, Giacomelli, Fredrikson and Jha, CSF 2018).

A model fits its training examples better than unseen ones, so an attacker who can
compute an example's loss guesses "member" when the loss is below a threshold t. We
score the attack, for every t at once, by

* the AUC: the probability that a random member has a lower loss than a random
  non-member (ties count one half), i.e. the Mann-Whitney U statistic over
  n_members * n_nonmembers; 0.5 is chance;
* the membership advantage max_t (TPR(t) - FPR(t)) (Yeom et al., Definition 4, with the
  best threshold in hindsight, so an upper bound on what a threshold attacker achieves).

:class:`TrainedSplitModel` computes per-example cross-entropy losses of a trained split
model (the export's ONNX graphs with a client's head checkpoint and a server's tail
checkpoint), either on clean activations (clipped and rescaled as in training, no noise)
or on fresh DP-A releases, as the deployed pipeline sees them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.stats import rankdata

if TYPE_CHECKING:
    pass

__all__ = [
    "MembershipResult",
    "auc_mann_whitney",
    "membership_advantage",
    "membership_scores",
]


@dataclass(frozen=True)
class MembershipResult:
    auc: float  # P(member loss < non-member loss) + P(tie) / 2; 0.5 = chance
    advantage: float  # max over t of TPR - FPR, guessing "member" when loss <= t
    threshold: float  # the loss threshold t that attains it
    members: int
    nonmembers: int

    def to_json(self) -> dict[str, float | int | str]:
        t = self.threshold
        return {
            "auc": self.auc,
            "advantage": self.advantage,
            "threshold": t if math.isfinite(t) else str(t),
            "members": self.members,
            "nonmembers": self.nonmembers,
        }


def _finite_1d(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite values")
    return arr


def auc_mann_whitney(positive: Sequence[float] | np.ndarray, negative: Sequence[float] | np.ndarray) -> float:
    """P(a positive scores higher than a negative) + P(tie) / 2, via the Mann-Whitney U statistic."""
    pos = _finite_1d("positive scores", positive)
    neg = _finite_1d("negative scores", negative)
    ranks = rankdata(np.concatenate([pos, neg]))  # 1-based; ties get the mean of the ranks they span
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def membership_advantage(
    member_losses: Sequence[float] | np.ndarray, nonmember_losses: Sequence[float] | np.ndarray
) -> tuple[float, float]:
    """(max_t TPR(t) - FPR(t), argmax t) for the attack "member iff loss <= t".

    TPR(t) is the fraction of members with loss <= t, FPR(t) that of non-members. Every
    observed loss is a candidate t; t = -inf (nobody is a member) gives 0, so the
    advantage is never negative.
    """
    mem = np.sort(_finite_1d("member losses", member_losses))
    non = np.sort(_finite_1d("non-member losses", nonmember_losses))
    candidates = np.unique(np.concatenate([mem, non]))
    tp = np.searchsorted(mem, candidates, side="right").astype(np.int64)
    fp = np.searchsorted(non, candidates, side="right").astype(np.int64)
    gap = tp * non.size - fp * mem.size  # (TPR - FPR) * n_mem * n_non, exact: ties stay ties
    best = int(np.argmax(gap))  # the lowest threshold attaining the maximum
    if gap[best] <= 0:
        return 0.0, -math.inf
    return float(gap[best] / (mem.size * non.size)), float(candidates[best])


def membership_scores(
    member_losses: Sequence[float] | np.ndarray, nonmember_losses: Sequence[float] | np.ndarray
) -> MembershipResult:
    """AUC and advantage of the loss-threshold attack (a lower loss means "member")."""
    mem = _finite_1d("member losses", member_losses)
    non = _finite_1d("non-member losses", nonmember_losses)
    advantage, threshold = membership_advantage(mem, non)
    return MembershipResult(
        auc=auc_mann_whitney(-mem, -non),
        advantage=advantage,
        threshold=threshold,
        members=int(mem.size),
        nonmembers=int(non.size),
    )
