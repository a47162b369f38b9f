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
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from attack.inversion import checkpoint_file

if TYPE_CHECKING:
    from runtime_client.faces import FaceIndex
    from runtime_client.mechanism import DPConfig

__all__ = [
    "MembershipResult",
    "auc_mann_whitney",
    "membership_advantage",
    "membership_scores",
    "cross_entropy",
    "TrainedSplitModel",
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


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    _, first, counts = np.unique(sorted_x, return_index=True, return_counts=True)
    mean_rank = first + (counts + 1) / 2.0  # 1-based positions first+1 .. first+count
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, counts)
    return ranks


def auc_mann_whitney(positive: Sequence[float] | np.ndarray, negative: Sequence[float] | np.ndarray) -> float:
    """P(a positive scores higher than a negative) + P(tie) / 2, via the Mann-Whitney U statistic."""
    pos = _finite_1d("positive scores", positive)
    neg = _finite_1d("negative scores", negative)
    ranks = _average_ranks(np.concatenate([pos, neg]))
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


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy -log softmax(logits)[label], in float64 (stable log-sum-exp)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if z.ndim != 2 or z.shape[0] != y.shape[0]:
        raise ValueError(f"logits must be (B, classes) with B = {y.shape[0]} labels, got {z.shape}")
    if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"labels must lie in [0, {z.shape[1]})")
    peak = z.max(axis=1, keepdims=True)
    lse = peak[:, 0] + np.log(np.exp(z - peak).sum(axis=1))
    return lse - z[np.arange(y.size), y]


class TrainedSplitModel:
    """A trained head + tail, loaded with onnxruntime from an export and two checkpoints.

    ``tail_checkpoint``: the server's state dir (holding ``tail_checkpoint``) or the file.
    ``head_checkpoint``: the client's state dir (holding ``head_checkpoint``) or the file;
    None uses the export's initial head.
    """

    def __init__(
        self,
        artifacts: Path,
        *,
        tail_checkpoint: Path,
        head_checkpoint: Path | None = None,
        threads: int | None = None,
    ) -> None:
        from dpa.manifest import ARTIFACT_FILES, load_manifest
        from dpa.ort_training import CheckpointState, Module, SessionOptions
        from runtime_client.head import HEAD_CHECKPOINT
        from runtime_server.tail import CHECKPOINT_NAME

        self.artifacts = Path(artifacts)
        self.manifest = load_manifest(self.artifacts, verify=("head", "tail"))
        head_dir, tail_dir = self.artifacts / "head", self.artifacts / "tail"
        self.tail_source = checkpoint_file(tail_checkpoint, CHECKPOINT_NAME)
        self.head_source = (
            head_dir / ARTIFACT_FILES.checkpoint
            if head_checkpoint is None
            else checkpoint_file(head_checkpoint, HEAD_CHECKPOINT)
        )
        self._head_state = CheckpointState.load_checkpoint(str(self.head_source))
        self._tail_state = CheckpointState.load_checkpoint(str(self.tail_source))
        options = SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self._head, self._tail = (
            Module(
                str(part / ARTIFACT_FILES.training),
                state,
                str(part / ARTIFACT_FILES.eval),
                device="cpu",
                session_options=options,
            )
            for part, state in ((head_dir, self._head_state), (tail_dir, self._tail_state))
        )
        self._head.eval()
        self._tail.eval()  # no dropout: the logits are a function of the input

    def activations(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed (B, 3, H, W) float32 images -> head activations (B, *activation_shape)."""
        return self._head(np.ascontiguousarray(images, dtype=np.float32))

    def tail_logits(self, activation: np.ndarray) -> np.ndarray:
        return self._tail(np.ascontiguousarray(activation, dtype=np.float32))

    def tail_losses(self, activation: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Per-example cross-entropy of the tail alone on the given (already released) activations."""
        return cross_entropy(self.tail_logits(activation), labels)

    def losses(
        self,
        index: FaceIndex,
        dp: DPConfig,  # the release the model was trained with (clip, epsilon, delta, normalize)
        *,
        noisy: bool = False,
        rng: np.random.Generator | None = None,
        batch_size: int = 32,
    ) -> np.ndarray:
        """Per-example losses of head + tail on ``index``'s images.

        The head's activation is clipped to ``dp.clip`` and multiplied by the public scale
        ``dp.release_scale(d)``, as in training. ``noisy=False`` adds no noise (the tail on
        clean activations); ``noisy=True`` adds DP-A noise from ``rng`` (the pipeline as deployed).
        """
        import warnings

        from runtime_client.clipping import clip_factors, l2_norms, scale_examples
        from runtime_client.faces import load_batch
        from runtime_client.mechanism import DPActivations, Mechanism

        if dp.mechanism is not Mechanism.GAUSSIAN and not noisy:
            raise ValueError("clean activations are only defined here for the gaussian mechanism (L2 clipping)")
        m = self.manifest
        scale = np.float32(dp.release_scale(m.activation_numel))
        release = None
        if noisy:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # epsilon = inf warns
                release = DPActivations(dp, rng if rng is not None else np.random.default_rng())
        out = []
        for start in range(0, len(index.paths), batch_size):
            paths = index.paths[start : start + batch_size]
            images = load_batch(paths, size=m.image_size, mean=m.pixel_mean, std=m.pixel_std)
            a = self.activations(images)
            if release is not None:
                x, _ = release.release(a)
            else:
                x = scale_examples(a, clip_factors(l2_norms(a), clip=dp.clip)).astype(np.float32) * scale
            out.append(self.tail_losses(x, index.labels[start : start + batch_size]))
        return np.concatenate(out) if out else np.zeros(0)
