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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "HE2019_NO_DEFENCE_PSNR_DB",
    "HE2019_NO_DEFENCE_SSIM",
    "HE2021_RECOGNISABLE_SSIM",
    "PRIOR_MARGIN_SSIM",
    "InversionConfig",
    "EpsilonResult",
    "InversionReport",
    "image_metrics",
    "verdict",
    "run_inversion",
    "write_grid",
    "grid_pixel_size",
]

# --------------------------------------------------------------------------- literature thresholds

#: He, Zhang and Lee, "Model inversion attacks against collaborative inference", ACSAC 2019
#: (doi:10.1145/3359789.3359824): inverting the first convolutional layer with no defence
#: reconstructs inputs almost perfectly, at about 37 dB PSNR and SSIM about 0.99.
HE2019_NO_DEFENCE_PSNR_DB = 37.0
HE2019_NO_DEFENCE_SSIM = 0.99
#: He, Zhang and Lee, "Attacking and protecting data privacy in edge-cloud collaborative
#: inference systems", IEEE Internet of Things Journal, 2021: a reconstruction with
#: SSIM > 0.3 is treated as recognisable.
HE2021_RECOGNISABLE_SSIM = 0.3
#: How far above the prior-only baseline (the mean auxiliary face) the mean SSIM must be
#: before we call a reconstruction recognisable: the mean face alone scores ~0.3 SSIM on
#: the synthetic faces, so the 0.3 threshold alone would call "no information" recognisable.
PRIOR_MARGIN_SSIM = 0.05

#: Pixel std of a from-scratch export (exporter.export uses 64.0 with VGGFACE_MEAN).
FROM_SCRATCH_PIXEL_STD = 64.0

ProgressFn = Callable[[str, int, int], None]  # (description, completed, total)


# --------------------------------------------------------------------------- configuration


def _as_epsilons(values: object) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        values = (values,)
    out = tuple(float(v) for v in values)  # type: ignore[union-attr]
    if not out:
        raise ValueError("give at least one epsilon")
    for eps in out:
        if math.isnan(eps) or eps <= 0:
            raise ValueError(f"epsilon must be > 0 (inf for no noise), got {eps}")
    return out


@dataclass(frozen=True)
class InversionConfig:
    """One inversion audit. Validated on construction."""

    # Export folder: the head's architecture, cut, preprocessing and weights come from it.
    # None: an untrained head built from (image_size, width, cut, arch_seed), as `dpa export --seed` would.
    artifacts: Path | None = None
    # A trained head checkpoint (a client's state dir or its head_checkpoint file) instead of the export's.
    head_checkpoint: Path | None = None
    image_size: int = 64  # without artifacts
    width: float = 0.25  # without artifacts
    cut: str = "conv1_1"  # without artifacts
    arch_seed: int = 0  # init_weights seed, without artifacts
    epsilons: tuple[float, ...] = (math.inf, 1e5, 1e3, 8.0)  # per release; inf: clipping only
    clip: float = 10.0  # C, as the client's --clip (the client's default)
    delta: float = 1e-5
    data: str = "synthetic"  # "synthetic" or an LFW-layout folder
    aux_identities: int = 16  # the attacker's faces: the first identities (sorted by folder name)
    victim_identities: int = 4  # the next ones: whose faces the attacker tries to rebuild
    images_per_identity: int = 16  # at most this many images of each identity (first by file name)
    data_seed: int = 0  # synthetic faces' seed
    cache_dir: Path | None = None  # keep the synthetic faces here; None: a temporary folder
    decoder_width: int = 32  # channels of the decoder's hidden layers
    epochs: int = 20  # decoder training epochs per epsilon
    batch_size: int = 16
    lr: float = 1e-3  # Adam
    seed: int = 0  # decoder init, shuffling, attacker's and victims' noise
    grid_columns: int = 8  # victim images shown in the grid
    threads: int | None = None  # torch intra-op threads during the run; None: leave as is

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilons", _as_epsilons(self.epsilons))
        for name in ("artifacts", "head_checkpoint", "cache_dir"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a positive finite number, got {self.clip}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        for name in ("aux_identities", "victim_identities", "epochs", "batch_size", "decoder_width", "grid_columns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.images_per_identity < 2:
            raise ValueError(f"images per identity must be >= 2, got {self.images_per_identity}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate must be a positive number, got {self.lr}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = str(value) if isinstance(value, Path) else value
        out["epsilons"] = [_num(e) for e in self.epsilons]
        return out


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class EpsilonResult:
    epsilon: float
    noise_std: float  # per element, before the public rescaling
    snr_per_element: float  # C / sqrt(d) / noise_std (inf without noise)
    psnr_mean: float  # dB
    psnr_median: float
    ssim_mean: float
    ssim_median: float
    recognisable_fraction: float  # victims with SSIM > HE2021_RECOGNISABLE_SSIM
    beats_prior_fraction: float  # victims whose reconstruction has a higher SSIM than the mean aux face
    train_loss: float  # decoder's last-epoch mean loss on the auxiliary pairs
    verdict: str
    psnr_per_image: tuple[float, ...] = ()
    ssim_per_image: tuple[float, ...] = ()


@dataclass(frozen=True, eq=False)
class InversionReport:
    config: InversionConfig
    cut: str
    image_size: int
    activation_shape: tuple[int, ...]
    pixel_mean: tuple[float, ...]
    pixel_std: tuple[float, ...]
    head_source: str
    aux_identities: tuple[str, ...]
    victim_identities: tuple[str, ...]
    aux_images: int
    victim_images: int
    baseline_psnr_mean: float  # prior only: the mean aux face against every victim
    baseline_ssim_mean: float
    baseline_recognisable_fraction: float
    results: tuple[EpsilonResult, ...]
    seconds: float
    originals: np.ndarray = field(repr=False)  # (grid columns, H, W, 3) in [0, 1]
    reconstructions: tuple[np.ndarray, ...] = field(repr=False)  # one (grid columns, H, W, 3) per epsilon

    def result(self, epsilon: float) -> EpsilonResult:
        for r in self.results:
            if r.epsilon == epsilon:
                return r
        raise KeyError(epsilon)

    def to_json(self) -> dict[str, Any]:
        return _jsonable(
            {
                "attack": "inverse network on DP-A releases (known head, auxiliary identities disjoint from victims)",
                "config": self.config.to_json(),
                "cut": self.cut,
                "image_size": self.image_size,
                "activation_shape": list(self.activation_shape),
                "elements_per_release": math.prod(self.activation_shape),
                "pixel_mean": list(self.pixel_mean),
                "pixel_std": list(self.pixel_std),
                "head_source": self.head_source,
                "aux_identities": list(self.aux_identities),
                "victim_identities": list(self.victim_identities),
                "aux_images": self.aux_images,
                "victim_images": self.victim_images,
                "thresholds": {
                    "he2019_no_defence_psnr_db": HE2019_NO_DEFENCE_PSNR_DB,
                    "he2019_no_defence_ssim": HE2019_NO_DEFENCE_SSIM,
                    "he2021_recognisable_ssim": HE2021_RECOGNISABLE_SSIM,
                    "prior_margin_ssim": PRIOR_MARGIN_SSIM,
                },
                "baseline_mean_aux_face": {
                    "psnr_mean": self.baseline_psnr_mean,
                    "ssim_mean": self.baseline_ssim_mean,
                    "recognisable_fraction": self.baseline_recognisable_fraction,
                },
                "results": [r.__dict__ for r in self.results],
                "seconds": self.seconds,
            }
        )


def _num(x: float) -> float | str:
    """JSON has no inf or NaN: write them as strings."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return _num(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# --------------------------------------------------------------------------- metrics


def image_metrics(original: np.ndarray, reconstruction: np.ndarray) -> tuple[float, float]:
    """(PSNR in dB, SSIM) of two (H, W, 3) images in [0, 1], with scikit-image (data_range 1)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a = np.asarray(original, dtype=np.float64)
    b = np.asarray(reconstruction, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected two (H, W, 3) images of one shape, got {a.shape} and {b.shape}")
    with np.errstate(divide="ignore"):  # identical images: PSNR = inf
        psnr = float(peak_signal_noise_ratio(a, b, data_range=1.0))
    ssim = float(structural_similarity(a, b, channel_axis=-1, data_range=1.0))
    return psnr, ssim


def verdict(psnr_mean: float, ssim_mean: float, baseline_ssim: float) -> str:
    """Compare one epsilon's mean figures with the literature's thresholds and the prior-only baseline."""
    if psnr_mean >= HE2019_NO_DEFENCE_PSNR_DB or ssim_mean >= HE2019_NO_DEFENCE_SSIM:
        return "at the no-defence level (He et al. 2019)"
    if ssim_mean > HE2021_RECOGNISABLE_SSIM and ssim_mean > baseline_ssim + PRIOR_MARGIN_SSIM:
        return "recognisable (SSIM > 0.3, He et al. 2021)"
    if ssim_mean > HE2021_RECOGNISABLE_SSIM:
        return "SSIM > 0.3 but no better than the mean aux face"
    return "not recognisable"


# --------------------------------------------------------------------------- data and head


def _face_sets(cfg: InversionConfig, image_size: int, stack: ExitStack) -> tuple[list[Path], list[Path], list[str]]:
    """(aux paths, victim paths, identity names: aux then victims); victims listed round-robin by identity."""
    from runtime_client.faces import index_faces
    from runtime_client.synth import SynthConfig, write_synthetic_faces

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
        raise ValueError(
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


@dataclass(frozen=True, eq=False)
class _Head:
    module: Any  # torch head, eval mode
    cut: str
    image_size: int
    activation_shape: tuple[int, ...]
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    source: str


def checkpoint_file(path: Path, name: str) -> Path:
    path = Path(path)
    file = path / name if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"no checkpoint at {file}")
    return file


def _load_head(cfg: InversionConfig) -> _Head:
    import torch

    from dpa.architecture import ArchConfig, cut_info
    from exporter.export import VGGFACE_MEAN
    from exporter.vggface import build_parts, init_weights

    if cfg.artifacts is None:
        if cfg.head_checkpoint is not None:
            raise ValueError("a head checkpoint needs --artifacts (its architecture comes from the manifest)")
        arch = ArchConfig(image_size=cfg.image_size, width=cfg.width, num_classes=2, dropout=0.0)
        head, tail = build_parts(arch, cfg.cut)
        init_weights((head, tail), cfg.arch_seed)  # the head is drawn first, as in `dpa export --seed`
        mean, std = VGGFACE_MEAN, (FROM_SCRATCH_PIXEL_STD,) * 3
        cut, source = cfg.cut, f"init_weights(seed={cfg.arch_seed}), width {cfg.width:g}"
    else:
        from dpa.manifest import ARTIFACT_FILES, load_manifest
        from dpa.ort_training import CheckpointState
        from runtime_client.head import HEAD_CHECKPOINT

        manifest = load_manifest(cfg.artifacts, verify=("head",))
        arch = ArchConfig(
            image_size=manifest.image_size, width=manifest.width, num_classes=manifest.num_classes, dropout=0.0
        )
        head, _ = build_parts(arch, manifest.cut)
        if cfg.head_checkpoint is not None:
            ckpt = checkpoint_file(cfg.head_checkpoint, HEAD_CHECKPOINT)
        else:
            ckpt = cfg.artifacts / "head" / ARTIFACT_FILES.checkpoint
        state = CheckpointState.load_checkpoint(str(ckpt))
        weights = {name: np.array(p.data) for name, p in state.parameters}
        expected = head.state_dict()
        missing = [n for n in expected if n not in weights or tuple(weights[n].shape) != tuple(expected[n].shape)]
        if missing:
            raise ValueError(f"head checkpoint {ckpt} does not fit the manifest's head: {', '.join(missing)}")
        head.load_state_dict({n: torch.from_numpy(weights[n].astype(np.float32)) for n in expected})
        mean, std, cut, source = manifest.pixel_mean, manifest.pixel_std, manifest.cut, str(ckpt)
    head.eval()
    info = cut_info(arch, cut)
    return _Head(head, cut, arch.image_size, info.activation_shape, tuple(mean), tuple(std), source)  # type: ignore[arg-type]


def _load_images(paths: list[Path], head: _Head) -> tuple[np.ndarray, np.ndarray]:
    """(preprocessed (N, 3, H, W) head inputs, targets (N, 3, H, W) in [0, 1])."""
    from runtime_client.faces import load_batch

    x = load_batch(paths, size=head.image_size, mean=head.pixel_mean, std=head.pixel_std)
    mean = np.asarray(head.pixel_mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(head.pixel_std, dtype=np.float32).reshape(1, 3, 1, 1)
    target = np.clip((x * std + mean) / 255.0, 0.0, 1.0).astype(np.float32)
    return x, target


# --------------------------------------------------------------------------- decoder


def _decoder(activation_shape: tuple[int, ...], image_size: int, width: int):  # type: ignore[no-untyped-def]
    """Noisy activation -> image in [0, 1]: 3x3 convolutions, bilinear 2x upsampling back to the input side."""
    from torch import nn

    layers: list[nn.Module] = []
    if len(activation_shape) == 3:
        channels, side, _ = activation_shape
    else:  # fc cut: a linear map onto a small feature map first
        side = max(1, image_size // 16)
        layers += [nn.Linear(activation_shape[0], width * side * side), nn.ReLU(), nn.Unflatten(1, (width, side, side))]
        channels = width
    ups = round(math.log2(image_size / side))
    if side << ups != image_size:
        raise ValueError(f"cannot upsample a {side}x{side} activation to {image_size}x{image_size}")
    layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
    for _ in range(ups):
        layers += [nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 3, 3, padding=1), nn.Sigmoid()]
    return nn.Sequential(*layers)


def _activations(head: _Head, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return head.module(torch.from_numpy(x)).numpy()


def _attack_one(
    cfg: InversionConfig,
    head: _Head,
    eps_index: int,
    aux: tuple[np.ndarray, np.ndarray],
    victims: tuple[np.ndarray, np.ndarray],
    tick: Callable[[float], None],
) -> tuple[np.ndarray, float, Any]:
    """Train the decoder at one epsilon and decode the victims: (reconstructions (N, H, W, 3), loss, DPConfig)."""
    import torch

    from runtime_client.mechanism import DPActivations, DPConfig

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
    import torch

    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        with ExitStack() as stack:
            head = _load_head(cfg)
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

_CELL_PX = 96  # one image
_LABEL_PX = 150  # the row labels' column
_TITLE_PX = 40
_DPI = 100


def grid_pixel_size(rows: int, columns: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG :func:`write_grid` writes for this many rows and columns."""
    return _LABEL_PX + columns * _CELL_PX, _TITLE_PX + rows * _CELL_PX


def write_grid(report: InversionReport, path: Path) -> Path:
    """PNG: originals on the first row, one row of reconstructions per epsilon, victims as columns."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = [("original", report.originals)]
    for r, recon in zip(report.results, report.reconstructions, strict=True):
        rows.append((f"ε = {r.epsilon:g}\nSSIM {r.ssim_mean:.2f}\nPSNR {r.psnr_mean:.1f} dB", recon))
    cols = len(report.originals)
    width, height = grid_pixel_size(len(rows), cols)
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    fig.text(
        0.5,
        1 - 0.5 * _TITLE_PX / height,
        f"DP-A inversion at {report.cut}: clip {report.config.clip:g}, delta {report.config.delta:g}, "
        f"mean aux face SSIM {report.baseline_ssim_mean:.2f}",
        ha="center",
        va="center",
        fontsize=9,
    )
    pad = 2
    for r, (label, images) in enumerate(rows):
        top = _TITLE_PX + r * _CELL_PX
        fig.text((_LABEL_PX - 6) / width, 1 - (top + _CELL_PX / 2) / height, label, ha="right", va="center", fontsize=8)
        for c in range(cols):
            ax = fig.add_axes(
                (
                    (_LABEL_PX + c * _CELL_PX + pad) / width,
                    1 - (top + _CELL_PX - pad) / height,
                    (_CELL_PX - 2 * pad) / width,
                    (_CELL_PX - 2 * pad) / height,
                )
            )
            ax.imshow(np.clip(images[c], 0.0, 1.0), interpolation="nearest")
            ax.set_axis_off()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, format="png")
    return path
