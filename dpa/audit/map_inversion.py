"""The white-box optimisation attack: the MAP estimate of a face from its DP-A release.

He, Zhang and Lee (ACSAC 2019, "regularised maximum likelihood estimation") invert a split
network's first layers by optimising an input image until the known head maps it onto the
observed activation. Under DP-A the server knows more than that: the release is
``y = s * (clip_C(head(x)) + n)`` with ``n ~ N(0, sigma^2 I)`` and C, sigma and s public. The
maximum a posteriori image under a total-variation prior is therefore

    argmin_x  ||clip_C(head(x)) - y / s||^2 / (2 sigma^2)  +  lambda * TV(x),   x in [0, 1]^(3 H W)

found here with Adam from a constant image (the attacker's mean face colour). Without noise
the data term alone pins a conv1_1 face down (SSIM ~0.99); with noise the prior's weight
lambda matters, and the attacker picks it honestly: on its own auxiliary faces (identities
disjoint from the victims'), released through the same public mechanism with its own noise,
never on the victims.

This is the strongest attack the audit has; the report takes the maximum over attacks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from dpa.audit.config import MapSettings
from dpa.audit.report import image_metrics
from dpa.contract.errors import UserError

__all__ = ["MapSettings", "map_reconstruct", "calibrate_tv_weight"]

#: Without noise the data term's scale is set by this floor: sigma_eff^2 = sigma^2 + FLOOR * C^2 / d.
#: It only keeps the division finite; the optimum (head(x) = y) does not depend on it.
NOISELESS_FLOOR = 1e-4


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV per image: the sum of absolute differences of neighbouring pixels."""
    down = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().sum(dim=(1, 2, 3))
    right = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().sum(dim=(1, 2, 3))
    return down + right


def _clip(a: torch.Tensor, clip: float) -> torch.Tensor:
    """clip_C as the device applies it: scale each example to L2 norm at most C."""
    norms = a.flatten(1).norm(dim=1).clamp_min(1e-12)
    factors = torch.clamp(clip / norms, max=1.0)
    return a * factors.view(-1, *([1] * (a.dim() - 1)))


def map_reconstruct(
    head: Callable[[torch.Tensor], torch.Tensor],
    observed: np.ndarray,
    *,
    clip: float,
    noise_std: float,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    image_size: int,
    start_colour: Sequence[float],
    tv_weight: float | np.ndarray,
    settings: MapSettings,
) -> np.ndarray:
    """MAP images (N, H, W, 3) in [0, 1] for releases ``observed`` = y / s (the public rescale undone).

    ``head`` maps preprocessed (B, 3, H, W) images to activations with gradients; ``noise_std``
    is sigma per element before the rescale (0 without noise); ``tv_weight`` is one lambda or one per image."""

    y_all = torch.from_numpy(np.ascontiguousarray(observed, dtype=np.float32))
    if y_all.ndim < 2:
        raise UserError(f"releases must be (N, *activation_shape), got shape {tuple(y_all.shape)}")
    d = math.prod(y_all.shape[1:])
    variance = noise_std**2 + NOISELESS_FLOOR * clip**2 / d
    mean = torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1)
    colour = torch.tensor(start_colour, dtype=torch.float32).view(1, 3, 1, 1)
    weights_all = torch.from_numpy(np.broadcast_to(np.asarray(tv_weight, dtype=np.float32), (len(y_all),)).copy())
    out = []
    for first in range(0, len(y_all), settings.batch_size):
        y = y_all[first : first + settings.batch_size]
        weights = weights_all[first : first + settings.batch_size]
        x = colour.expand(len(y), 3, image_size, image_size).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=settings.lr)
        for _ in range(settings.steps):
            fit = ((_clip(head((x * 255.0 - mean) / std), clip) - y) ** 2).flatten(1).sum(dim=1) / (2 * variance)
            loss = (fit + weights * _total_variation(x)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                x.clamp_(0.0, 1.0)
        out.append(x.detach().numpy().transpose(0, 2, 3, 1))
    return np.concatenate(out) if out else np.zeros((0, image_size, image_size, 3), dtype=np.float32)


def calibrate_tv_weight(
    reconstruct: Callable[[np.ndarray, np.ndarray], np.ndarray],
    aux_observed: np.ndarray,
    aux_targets: np.ndarray,
    settings: MapSettings,
) -> tuple[float, dict[float, float]]:
    """The prior weight whose reconstructions of the attacker's own faces score the best mean SSIM.

    ``reconstruct(observed, tv_weights)`` runs the attack (one weight per image: every candidate is
    tried on every calibration face in one optimisation); ``aux_targets`` are (N, H, W, 3) in [0, 1].
    Returns (chosen weight, mean SSIM per candidate). Victims are never looked at here."""

    n = min(settings.calibration_images, len(aux_observed))
    candidates = settings.tv_weights
    observed = np.concatenate([aux_observed[:n]] * len(candidates))
    weights = np.repeat(np.asarray(candidates, dtype=np.float32), n)
    recon = reconstruct(observed, weights)
    targets = np.concatenate([aux_targets[:n]] * len(candidates))
    ssim = np.array([image_metrics(t, r)[1] for t, r in zip(targets, recon, strict=True)]).reshape(len(candidates), n)
    scores = {w: float(ssim[i].mean()) for i, w in enumerate(candidates)}
    best = max(scores, key=lambda w: scores[w])
    return best, scores
