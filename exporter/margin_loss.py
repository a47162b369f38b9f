"""Margin losses on normalised embeddings, as face recognition trains its embeddings.

Softmax cross-entropy separates the training identities; what a gallery of *new* identities needs is
embeddings whose angles cluster by identity, so that a template (the mean embedding of a person) and a
cosine threshold work for people never trained on. CosFace (Wang et al., "CosFace: Large Margin Cosine
Loss for Deep Face Recognition", CVPR 2018; insightface's ``CombinedMarginLoss`` with m1 = 1, m2 = 0)
trains on

    logit_j = s * (cos(theta_j) - m * [j = y]),   cos(theta_j) = <e / ||e||, w_j / ||w_j||>

so each example must beat every other identity by a cosine margin m. A margin from the first step can
keep a plain network without batch norm from ever leaving chance, so ``margin_at`` ramps it from 0 over
the first epochs (as insightface warms up its learning rate).
"""

from __future__ import annotations

import torch

__all__ = ["cosface_logits", "margin_at"]


def cosface_logits(
    embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, scale: float, margin: float
) -> torch.Tensor:
    """(B, classes) logits s * (cos - m onehot) for cross-entropy; ``weight`` (classes, dim) holds one
    direction per training identity."""
    cos = torch.nn.functional.normalize(embeddings, dim=1) @ torch.nn.functional.normalize(weight, dim=1).T
    onehot = torch.nn.functional.one_hot(labels, cos.shape[1]).to(cos.dtype)
    return scale * (cos - margin * onehot)


def margin_at(epoch: float, *, margin: float, ramp_epochs: float) -> float:
    """The margin at (fractional) ``epoch``: linear from 0 to ``margin`` over ``ramp_epochs``."""
    if ramp_epochs <= 0:
        return margin
    return margin * min(1.0, max(0.0, epoch / ramp_epochs))
