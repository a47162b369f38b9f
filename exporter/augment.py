"""Training-time augmentation of a batch of preprocessed faces: mirror images and small shifts.

A face seen mirrored or a few pixels off is the same person: both are what face recognition trains
with (insightface's random flip; the 4-pixel shifts of CIFAR-style training). Drawn from the given
generator, so a seeded pretraining is repeatable.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["flip_and_shift"]


def flip_and_shift(x: torch.Tensor, rng: np.random.Generator, *, shift: int = 4) -> torch.Tensor:
    """(B, C, H, W): each example mirrored with probability 1/2 and moved by up to ``shift`` pixels in
    each direction (zero padding: the preprocessed images are centred on the mean pixel)."""
    b, _, h, w = x.shape
    flips = torch.from_numpy(rng.random(b) < 0.5)
    out = torch.where(flips.view(b, 1, 1, 1), x.flip(3), x)
    if shift <= 0:
        return out
    padded = torch.nn.functional.pad(out, (shift, shift, shift, shift))
    dy, dx = rng.integers(0, 2 * shift + 1, size=(2, b))
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)]).contiguous(
        memory_format=torch.channels_last
    )
