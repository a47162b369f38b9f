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
import shutil
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpa.audit.config import InversionConfig
from dpa.audit.map_inversion import calibrate_tv_weight, map_reconstruct
from dpa.audit.report import HE2021_RECOGNISABLE_SSIM, EpsilonResult, InversionReport, image_metrics, verdict
from dpa.audit.victim import CentredHead, VictimHead, load_victim_head
from dpa.contract.errors import UserError
from dpa.contract.manifest import load_manifest
from dpa.contract.server_view import ViewRecorder
from dpa.faces.lfw import index_faces, load_batch
from dpa.faces.synth import SynthConfig, cached_faces
from dpa.privacy.mechanism import DPActivations, DPConfig
from dpa.privacy.public_parameters import release_parameters
from dpa.privacy.release_clip import release_clip

__all__ = [
    "InversionConfig",
    "face_sets",
    "load_images",
    "make_report",
    "release_all",
    "run_inversion",
    "score_setting",
    "ticks_per_setting",
]

ProgressFn = Callable[[str, int, int], None]  # (description, completed, total)


# --------------------------------------------------------------------------- configuration


def face_sets(cfg: InversionConfig, image_size: int, stack: ExitStack) -> tuple[list[Path], list[Path], list[str]]:
    """(aux paths, victim paths, identity names: aux then victims); victims listed round-robin by identity."""

    needed = cfg.aux_identities + cfg.victim_identities
    if cfg.data == "synthetic":
        synth = SynthConfig(
            identities=needed, per_identity=cfg.images_per_identity, size=image_size, seed=cfg.data_seed
        )
        base = cfg.cache_dir if cfg.cache_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root = cached_faces(base, synth)
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


def load_images(paths: list[Path], head: VictimHead) -> tuple[np.ndarray, np.ndarray]:
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
    ups = max(0, math.ceil(math.log2(image_size / side)))
    layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
    for _ in range(ups):
        layers += [nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    if side << ups != image_size:  # a side that is no power-of-two fraction of the input (dlib's 35 of 150)
        layers += [nn.Upsample(size=(image_size, image_size), mode="bilinear")]
    layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 3, 3, padding=1), nn.Sigmoid()]
    return nn.Sequential(*layers)


def _activations(head: VictimHead, x: np.ndarray) -> np.ndarray:

    with torch.no_grad():
        return head.module(torch.from_numpy(x)).numpy()


def _epsilon_key(dp: DPConfig) -> float:
    """What names a setting's seed: its per-release epsilon, or for a mechanism given only by its noise
    multiplier (the class-sum audit's), that multiplier."""
    return dp.epsilon if dp.epsilon is not None else dp.noise_multiplier


def _setting_seed(eps: float) -> int:
    """A seed per epsilon that does not depend on its position in the list (a view audited later,
    at one epsilon, draws exactly what the live audit drew)."""
    return zlib.crc32(repr(float(eps)).encode()) % 100_000


def _mechanism(dp: DPConfig, seed: Sequence[int]) -> DPActivations:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # epsilon = inf warns; here it is the point
        return DPActivations(dp, np.random.default_rng(list(seed)))


def release_all(head: VictimHead, dp: DPConfig, x: np.ndarray, rng_seed: Sequence[int], batch: int) -> np.ndarray:
    """The DP-A releases of images ``x`` through ``head`` (float32, as the server receives them)."""
    mechanism = _mechanism(dp, rng_seed)
    parts = [mechanism.release(_activations(head, x[i : i + batch]))[0].copy() for i in range(0, len(x), batch)]
    return np.concatenate(parts)


@dataclass(frozen=True, eq=False)
class AttackOutcome:
    reconstructions: np.ndarray  # (N, H, W, 3) in [0, 1]
    detail: dict[str, Any]  # what the attack chose or reached (decoder loss, MAP prior weight...)


def _decoder_attack(
    cfg: InversionConfig,
    head: VictimHead,
    dp: DPConfig,
    aux: tuple[np.ndarray, np.ndarray],
    victim_releases: np.ndarray,
    tick: Callable[[float], None],
) -> AttackOutcome:
    """Train an inverse network on the attacker's own releases of its faces, decode the victims'."""

    key = _setting_seed(_epsilon_key(dp))
    attacker = _mechanism(dp, (cfg.seed, 1, key))
    order_rng = np.random.default_rng([cfg.seed, 3, key])
    x_aux, y_aux = aux
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 100_000 + key)
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
    out = []
    with torch.no_grad():
        for start in range(0, len(victim_releases), cfg.batch_size):
            out.append(decoder(torch.from_numpy(victim_releases[start : start + cfg.batch_size])).numpy())
    return AttackOutcome(np.concatenate(out).transpose(0, 2, 3, 1), {"train_loss": loss_value})


def _map_attack(
    cfg: InversionConfig,
    head: VictimHead,
    dp: DPConfig,
    aux: tuple[np.ndarray, np.ndarray],
    victim_releases: np.ndarray,
    tick: Callable[[float], None],
) -> AttackOutcome:
    """White-box MAP: the prior weight chosen on the attacker's own released faces, then the victims'."""

    settings = cfg.map_settings
    scale = dp.release_scale(math.prod(head.activation_shape))
    x_aux, y_aux = aux
    n = min(settings.calibration_images, len(x_aux))
    calibration = release_all(head, dp, x_aux[:n], (cfg.seed, 4, _setting_seed(_epsilon_key(dp))), cfg.batch_size)
    colour = y_aux.mean(axis=(0, 2, 3))  # the attacker's mean face colour: the constant start

    def reconstruct(releases: np.ndarray, tv_weight: float | np.ndarray) -> np.ndarray:
        return map_reconstruct(
            head.module,
            releases / np.float32(scale),
            clip=cfg.clip,
            noise_std=dp.noise_std,
            pixel_mean=head.pixel_mean,
            pixel_std=head.pixel_std,
            image_size=head.image_size,
            start_colour=colour,
            tv_weight=tv_weight,
            settings=settings,
        )

    weight, scores = calibrate_tv_weight(reconstruct, calibration, y_aux[:n].transpose(0, 2, 3, 1), settings)
    tick(math.nan)
    recon = reconstruct(victim_releases, weight)
    return AttackOutcome(recon, {"tv_weight": weight, "calibration_ssim": {f"{w:g}": v for w, v in scores.items()}})


ATTACKS: dict[str, Callable[..., AttackOutcome]] = {"decoder": _decoder_attack, "map": _map_attack}


def ticks_per_setting(cfg: InversionConfig) -> int:
    return (cfg.epochs if "decoder" in cfg.attacks else 0) + (1 if "map" in cfg.attacks else 0)


def score_setting(
    cfg: InversionConfig,
    head: VictimHead,
    dp: DPConfig,
    aux: tuple[np.ndarray, np.ndarray],
    victim_releases: np.ndarray,
    originals: np.ndarray,
    baseline_ssim: np.ndarray,
    tick: Callable[[str, float], None],
) -> tuple[EpsilonResult, np.ndarray]:
    """Run every configured attack on the same releases; the result holds the strongest (best mean SSIM).

    Returns (the result, the strongest attack's reconstructions of the first grid columns)."""

    elements = math.prod(head.activation_shape)
    by_attack: dict[str, dict[str, Any]] = {}
    recon_by: dict[str, np.ndarray] = {}
    scores_by: dict[str, np.ndarray] = {}
    for name in cfg.attacks:
        outcome = ATTACKS[name](cfg, head, dp, aux, victim_releases, lambda loss, name=name: tick(name, loss))
        scores = np.array([image_metrics(o, r) for o, r in zip(originals, outcome.reconstructions, strict=True)])
        by_attack[name] = {
            "psnr_mean": float(scores[:, 0].mean()),
            "ssim_mean": float(scores[:, 1].mean()),
            **outcome.detail,
        }
        recon_by[name], scores_by[name] = outcome.reconstructions, scores
    strongest = max(cfg.attacks, key=lambda a: by_attack[a]["ssim_mean"])
    psnr, ssim = scores_by[strongest][:, 0], scores_by[strongest][:, 1]
    std = float(dp.noise_std)
    result = EpsilonResult(
        epsilon=dp.epsilon,
        noise_std=std,
        snr_per_element=math.inf if std == 0 else cfg.clip / math.sqrt(elements) / std,
        psnr_mean=float(psnr.mean()),
        psnr_median=float(np.median(psnr)),
        ssim_mean=float(ssim.mean()),
        ssim_median=float(np.median(ssim)),
        recognisable_fraction=float((ssim > HE2021_RECOGNISABLE_SSIM).mean()),
        beats_prior_fraction=float((ssim > baseline_ssim).mean()),
        train_loss=float(by_attack.get("decoder", {}).get("train_loss", math.nan)),
        verdict=verdict(float(psnr.mean()), float(ssim.mean()), float(baseline_ssim.mean())),
        strongest_attack=strongest,
        by_attack=by_attack,
        psnr_per_image=tuple(float(v) for v in psnr),
        ssim_per_image=tuple(float(v) for v in ssim),
    )
    return result, recon_by[strongest][: cfg.grid_columns]


# --------------------------------------------------------------------------- the audit


def _victim_view_header(head: VictimHead) -> dict[str, Any]:
    return {
        "recorded_by": "dpa attack inversion (the audit's own victim releases)",
        "cut": head.cut,
        "image_size": head.image_size,
        "width": head.width,
        "num_classes": head.num_classes,
        "activation_shape": list(head.activation_shape),
        "pixel_mean": list(head.pixel_mean),
        "pixel_std": list(head.pixel_std),
        "head_source": head.source,
    }


def make_report(
    cfg: InversionConfig, head: VictimHead, started: float, *, aux_names: Sequence[str], victim_names: Sequence[str],
    aux_images: int, victim_images: int, baseline: np.ndarray, results: Sequence[EpsilonResult],
    originals: np.ndarray, grids: Sequence[np.ndarray],
) -> InversionReport:  # fmt: skip
    """The report of an audit, live or on a recorded view; ``baseline``: (N, 2) PSNR and SSIM of the mean face."""
    return InversionReport(
        config=cfg,
        cut=head.cut,
        image_size=head.image_size,
        activation_shape=tuple(head.activation_shape),
        pixel_mean=tuple(head.pixel_mean),
        pixel_std=tuple(head.pixel_std),
        head_source=head.source,
        aux_identities=tuple(aux_names),
        victim_identities=tuple(victim_names),
        aux_images=aux_images,
        victim_images=victim_images,
        baseline_psnr_mean=float(baseline[:, 0].mean()),
        baseline_ssim_mean=float(baseline[:, 1].mean()),
        baseline_recognisable_fraction=float((baseline[:, 1] > HE2021_RECOGNISABLE_SSIM).mean()),
        results=tuple(results),
        seconds=round(time.perf_counter() - started, 3),
        originals=originals[: cfg.grid_columns],
        reconstructions=tuple(grids),
    )


def run_inversion(cfg: InversionConfig, *, progress: ProgressFn | None = None) -> InversionReport:
    """Release the victims once per epsilon, run every attack on those releases, score the strongest.

    With ``cfg.record_view`` each epsilon's victim releases are written as a recorded view
    (``<record_view>/eps-<epsilon>``), which :func:`audit_view` attacks to the same figures."""

    manifest = None if cfg.artifacts is None else load_manifest(cfg.artifacts)
    source = cfg.artifacts if cfg.artifacts is not None else "an untrained head (no --artifacts)"
    cfg = replace(cfg, clip=release_clip(manifest, cfg.clip, source=source))
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        with ExitStack() as stack:
            head = load_victim_head(cfg)
            aux_paths, victim_paths, names = face_sets(cfg, head.image_size, stack)
            aux = load_images(aux_paths, head)
            victims = load_images(victim_paths, head)
        originals = victims[1].transpose(0, 2, 3, 1)
        prior = aux[1].mean(axis=0).transpose(1, 2, 0)
        baseline = np.array([image_metrics(o, prior) for o in originals])
        total = ticks_per_setting(cfg) * len(cfg.epsilons)
        done = 0
        results: list[EpsilonResult] = []
        grids: list[np.ndarray] = []
        for eps in cfg.epsilons:

            def tick(attack: str, loss: float, eps: float = eps) -> None:
                nonlocal done
                done += 1
                if progress is not None:
                    what = "MAP attack" if attack == "map" else f"decoder loss {loss:.4f}"
                    progress(f"epsilon {eps:g}: {what}", done, total)

            dp = DPConfig(clip=cfg.clip, epsilon=eps, delta=cfg.delta)
            releases = release_all(head, dp, victims[0], (cfg.seed, 2, _setting_seed(eps)), cfg.batch_size)
            if cfg.record_view is not None:
                _record_victims(cfg, head, dp, releases, victim_paths, names)
            result, grid = score_setting(cfg, head, dp, aux, releases, originals, baseline[:, 1], tick)
            results.append(result)
            grids.append(grid)
    finally:
        torch.set_num_threads(previous_threads)
    return make_report(
        cfg, head, started, aux_names=names[: cfg.aux_identities], victim_names=names[cfg.aux_identities :],
        aux_images=len(aux_paths), victim_images=len(victim_paths), baseline=baseline, results=results,
        originals=originals, grids=grids,
    )  # fmt: skip


def _record_victims(
    cfg: InversionConfig,
    head: VictimHead,
    dp: DPConfig,
    releases: np.ndarray,
    victim_paths: list[Path],
    names: list[str],
) -> None:
    """The audit's victim releases at one epsilon as a recorded view, one release per batch."""
    assert cfg.record_view is not None
    folder = cfg.record_view / f"eps-{dp.epsilon:g}"
    shutil.rmtree(folder, ignore_errors=True)
    recorder = ViewRecorder(folder, _victim_view_header(head))
    module = head.module
    if isinstance(module, CentredHead):
        recorder.write_centre(module.centre.numpy())
        module = module.head
    weights = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    labels = np.array([names.index(p.parent.name) for p in victim_paths], dtype=np.int64)
    params = release_parameters(dp, math.prod(head.activation_shape))
    for step, start in enumerate(range(0, len(releases), cfg.batch_size), start=1):
        rows = slice(start, start + cfg.batch_size)
        recorder.record(
            step=step,
            activation=releases[rows],
            labels=labels[rows],
            head=weights,
            release=params,
            sources=[str(p) for p in victim_paths[rows]],
            true_labels=labels[rows],
        )


# --------------------------------------------------------------------------- the picture
