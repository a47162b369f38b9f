"""Model inversion against DP-A releases: can an honest-but-curious server rebuild the faces?

The attacker is the edge server in the strongest setting we can justify:

* it knows the head's weights (as when the device fine-tunes public VGG-Face weights,
  or runs the export's initial head), the cut, the clip C, (epsilon, delta) and the
  public rescaling, because all of them are in the manifest or the protocol;
* it holds AUXILIARY faces whose identities are disjoint from the victims'.

It runs the known head on its auxiliary faces, releases the activations through the
same public DP-A mechanism with its own random generator (fresh noise every epoch),
and trains an inverse network (a small convolutional decoder, He, Zhang and Lee,
ACSAC 2019, "inverse network" attack) from noisy activations back to images. Then it
decodes the victims' noisy activations, as it would receive them during training.

Reconstructions are scored with scikit-image's PSNR and SSIM on images in [0, 1]. A
prior-only baseline (the mean auxiliary face, which needs no activation at all) is
scored too: an SSIM above the literature's "recognisable" threshold means little
if the mean face reaches it as well, which it nearly does on the synthetic faces.

This is an audit tool: it imports torch and is not part of the device client.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpa.audit.config import InversionConfig
from dpa.audit.report import HE2021_RECOGNISABLE_SSIM, EpsilonResult, InversionReport, image_metrics, verdict
from dpa.audit.victim import VictimHead, load_victim_head
from dpa.contract.errors import UserError
from dpa.faces.lfw import index_faces, load_batch
from dpa.faces.synth import SynthConfig, write_synthetic_faces
from dpa.privacy.mechanism import DPActivations, DPConfig

__all__ = ["InversionConfig", "run_inversion"]

ProgressFn = Callable[[str, int, int], None]  # (description, completed, total)


# --------------------------------------------------------------------------- configuration


def _face_sets(cfg: InversionConfig, image_size: int, stack: ExitStack) -> tuple[list[Path], list[Path], list[str]]:
    """(aux paths, victim paths, identity names: aux then victims); victims listed round-robin by identity."""

    needed = cfg.aux_identities + cfg.victim_identities
    if cfg.data == "synthetic":
        synth = SynthConfig(
            identities=needed, per_identity=cfg.images_per_identity, size=image_size, seed=cfg.data_seed
        )
        base = cfg.cache_dir if cfg.cache_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root = base / f"synthetic-{synth.identities}x{synth.per_identity}-{synth.size}px-s{synth.seed}"
        if not root.is_dir():
            write_synthetic_faces(root, synth)
    else:
        root = Path(cfg.data)
    index = index_faces(root, min_faces_per_person=1)
    if len(index.names) < needed:
        raise UserError(
            f"{root} has {len(index.names)} identities; the attack needs {cfg.aux_identities} auxiliary + "
            f"{cfg.victim_identities} victim identities"
        )
    per: list[list[Path]] = []
    for label in range(needed):
        rows = np.flatnonzero(index.labels == label)[: cfg.images_per_identity]
        per.append([index.paths[i] for i in rows])
    aux = [p for paths in per[: cfg.aux_identities] for p in paths]
    victims_by_id = per[cfg.aux_identities :]
    victims = [paths[k] for k in range(max(map(len, victims_by_id))) for paths in victims_by_id if k < len(paths)]
    return aux, victims, list(index.names[:needed])


def _load_images(paths: list[Path], head: VictimHead) -> tuple[np.ndarray, np.ndarray]:
    """(preprocessed (N, 3, H, W) head inputs, targets (N, 3, H, W) in [0, 1])."""

    x = load_batch(paths, size=head.image_size, mean=head.pixel_mean, std=head.pixel_std)
    mean = np.asarray(head.pixel_mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(head.pixel_std, dtype=np.float32).reshape(1, 3, 1, 1)
    target = np.clip((x * std + mean) / 255.0, 0.0, 1.0).astype(np.float32)
    return x, target


# --------------------------------------------------------------------------- decoder


def _decoder(activation_shape: tuple[int, ...], image_size: int, width: int):  # type: ignore[no-untyped-def]
    """Noisy activation -> image in [0, 1]: 3x3 convolutions, bilinear 2x upsampling back to the input side."""

    layers: list[nn.Module] = []
    if len(activation_shape) == 3:
        channels, side, _ = activation_shape
    else:  # fc cut: a linear map onto a small feature map first
        side = max(1, image_size // 16)
        layers += [nn.Linear(activation_shape[0], width * side * side), nn.ReLU(), nn.Unflatten(1, (width, side, side))]
        channels = width
    ups = round(math.log2(image_size / side))
    if side << ups != image_size:
        raise UserError(f"cannot upsample a {side}x{side} activation to {image_size}x{image_size}")
    layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
    for _ in range(ups):
        layers += [nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 3, 3, padding=1), nn.Sigmoid()]
    return nn.Sequential(*layers)


def _activations(head: VictimHead, x: np.ndarray) -> np.ndarray:

    with torch.no_grad():
        return head.module(torch.from_numpy(x)).numpy()


def _attack_one(
    cfg: InversionConfig,
    head: VictimHead,
    eps_index: int,
    aux: tuple[np.ndarray, np.ndarray],
    victims: tuple[np.ndarray, np.ndarray],
    tick: Callable[[float], None],
) -> tuple[np.ndarray, float, Any]:
    """Train the decoder at one epsilon and decode the victims: (reconstructions (N, H, W, 3), loss, DPConfig)."""

    eps = cfg.epsilons[eps_index]
    dp = DPConfig(clip=cfg.clip, epsilon=eps, delta=cfg.delta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # epsilon = inf warns; here it is the point
        attacker = DPActivations(dp, np.random.default_rng([cfg.seed, 1, eps_index]))
        device = DPActivations(dp, np.random.default_rng([cfg.seed, 2, eps_index]))
    order_rng = np.random.default_rng([cfg.seed, 3, eps_index])
    x_aux, y_aux = aux
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 1000 + eps_index)
        decoder = _decoder(head.activation_shape, head.image_size, cfg.decoder_width)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=cfg.lr)
    target = torch.from_numpy(y_aux)
    loss_value = math.nan
    for _ in range(cfg.epochs):
        decoder.train()
        total, seen = 0.0, 0
        order = order_rng.permutation(len(x_aux))
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            noisy, _ = attacker.release(_activations(head, x_aux[rows]))  # the attacker's own DP-A release
            loss = torch.nn.functional.mse_loss(decoder(torch.from_numpy(noisy)), target[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
            seen += len(rows)
        loss_value = total / max(seen, 1)
        tick(loss_value)
    decoder.eval()
    x_vic, _ = victims
    out = []
    with torch.no_grad():
        for start in range(0, len(x_vic), cfg.batch_size):
            noisy, _ = device.release(_activations(head, x_vic[start : start + cfg.batch_size]))  # what the server sees
            out.append(decoder(torch.from_numpy(noisy)).numpy())
    recon = np.concatenate(out).transpose(0, 2, 3, 1)
    return recon, loss_value, dp


# --------------------------------------------------------------------------- the audit


def run_inversion(cfg: InversionConfig, *, progress: ProgressFn | None = None) -> InversionReport:
    """Train one inverse network per epsilon on auxiliary faces, decode the victims, score them."""

    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        with ExitStack() as stack:
            head = load_victim_head(cfg)
            aux_paths, victim_paths, names = _face_sets(cfg, head.image_size, stack)
            aux = _load_images(aux_paths, head)
            victims = _load_images(victim_paths, head)
        originals = victims[1].transpose(0, 2, 3, 1)
        prior = aux[1].mean(axis=0).transpose(1, 2, 0)
        baseline = np.array([image_metrics(o, prior) for o in originals])
        elements = math.prod(head.activation_shape)
        total = cfg.epochs * len(cfg.epsilons)
        done = 0
        results: list[EpsilonResult] = []
        grids: list[np.ndarray] = []
        for i, eps in enumerate(cfg.epsilons):

            def tick(loss: float, eps: float = eps) -> None:
                nonlocal done
                done += 1
                if progress is not None:
                    progress(f"epsilon {eps:g}: decoder loss {loss:.4f}", done, total)

            recon, loss, dp = _attack_one(cfg, head, i, aux, victims, tick)
            scores = np.array([image_metrics(o, r) for o, r in zip(originals, recon, strict=True)])
            psnr, ssim = scores[:, 0], scores[:, 1]
            std = float(dp.noise_std)
            results.append(
                EpsilonResult(
                    epsilon=eps,
                    noise_std=std,
                    snr_per_element=math.inf if std == 0 else cfg.clip / math.sqrt(elements) / std,
                    psnr_mean=float(psnr.mean()),
                    psnr_median=float(np.median(psnr)),
                    ssim_mean=float(ssim.mean()),
                    ssim_median=float(np.median(ssim)),
                    recognisable_fraction=float((ssim > HE2021_RECOGNISABLE_SSIM).mean()),
                    beats_prior_fraction=float((ssim > baseline[:, 1]).mean()),
                    train_loss=loss,
                    verdict=verdict(float(psnr.mean()), float(ssim.mean()), float(baseline[:, 1].mean())),
                    psnr_per_image=tuple(float(v) for v in psnr),
                    ssim_per_image=tuple(float(v) for v in ssim),
                )
            )
            grids.append(recon[: cfg.grid_columns])
    finally:
        torch.set_num_threads(previous_threads)
    return InversionReport(
        config=cfg,
        cut=head.cut,
        image_size=head.image_size,
        activation_shape=tuple(head.activation_shape),
        pixel_mean=tuple(head.pixel_mean),
        pixel_std=tuple(head.pixel_std),
        head_source=head.source,
        aux_identities=tuple(names[: cfg.aux_identities]),
        victim_identities=tuple(names[cfg.aux_identities :]),
        aux_images=len(aux_paths),
        victim_images=len(victim_paths),
        baseline_psnr_mean=float(baseline[:, 0].mean()),
        baseline_ssim_mean=float(baseline[:, 1].mean()),
        baseline_recognisable_fraction=float((baseline[:, 1] > HE2021_RECOGNISABLE_SSIM).mean()),
        results=tuple(results),
        seconds=round(time.perf_counter() - started, 3),
        originals=originals[: cfg.grid_columns],
        reconstructions=tuple(grids),
    )


# --------------------------------------------------------------------------- the picture
