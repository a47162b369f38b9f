"""The attacked model, loaded for an audit: the head an attacker knows (torch, for gradients), and a trained
head + tail (onnxruntime) for membership inference. The audit reads checkpoints through these public functions."""

from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpa.audit.config import InversionConfig
from dpa.contract.architecture import ArchConfig, cut_info
from dpa.contract.devices import DeviceProfile, resolve_device
from dpa.contract.errors import UserError
from dpa.contract.manifest import ARTIFACT_FILES, load_manifest, load_release_centre
from dpa.contract.ort_training import CheckpointState, Module, session_options
from dpa.faces.lfw import FaceIndex, load_batch
from dpa.privacy.clipping import clip_factors, l2_norms, scale_examples
from dpa.privacy.mechanism import DPActivations, DPConfig, Mechanism
from exporter.export import VGGFACE_MEAN
from exporter.networks import family
from exporter.vggface import RELEASE_PROJECTION, build_parts, init_weights
from runtime_client.head import HEAD_CHECKPOINT, HeadModel, load_head_checkpoint
from runtime_server.tail import CHECKPOINT_NAME

__all__ = [
    "FROM_SCRATCH_PIXEL_STD",
    "VictimHead",
    "TrainedSplitModel",
    "cross_entropy",
    "checkpoint_file",
    "head_from_weights",
    "load_victim_head",
]

#: Pixel std of a from-scratch export (exporter.export uses 64.0 with VGGFACE_MEAN).
FROM_SCRATCH_PIXEL_STD = 64.0


@dataclass(frozen=True, eq=False)
class VictimHead:
    module: Any  # torch head, eval mode
    cut: str
    image_size: int
    activation_shape: tuple[int, ...]
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    source: str
    width: float = 0.25  # the architecture, so that a recorded view can rebuild this head
    num_classes: int = 2


class CentredHead(torch.nn.Module):
    """The head as the device runs it on a centred export: head(x) minus the public release centre."""

    def __init__(self, head: torch.nn.Module, centre: np.ndarray) -> None:
        super().__init__()
        self.head = head
        self.register_buffer("centre", torch.from_numpy(np.asarray(centre, dtype=np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) - self.centre


def checkpoint_file(path: Path, name: str) -> Path:
    path = Path(path)
    file = path / name if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no checkpoint at {file}")
    return file


def _head_weights(ckpt: Path) -> dict[str, np.ndarray]:
    """A head's weights: a device's checkpoint (plain onnxruntime's zip of arrays) or an export's
    (onnxruntime-training's checkpoint)."""
    if zipfile.is_zipfile(ckpt):
        return load_head_checkpoint(ckpt)[0]
    return {name: np.array(p.data) for name, p in CheckpointState.load_checkpoint(str(ckpt)).parameters}


def load_victim_head(cfg: InversionConfig) -> VictimHead:

    if cfg.artifacts is None:
        if cfg.head_checkpoint is not None:
            raise UserError("a head checkpoint needs --artifacts (its architecture comes from the manifest)")
        arch = ArchConfig(image_size=cfg.image_size, width=cfg.width, num_classes=2, dropout=0.0)
        head, tail = build_parts(arch, cfg.cut)
        init_weights((head, tail), cfg.arch_seed)  # the head is drawn first, as in `dpa export --seed`
        mean, std = VGGFACE_MEAN, (FROM_SCRATCH_PIXEL_STD,) * 3
        cut, source = cfg.cut, f"init_weights(seed={cfg.arch_seed}), width {cfg.width:g}"
    else:
        manifest = load_manifest(cfg.artifacts, verify=("head",))
        arch = ArchConfig(
            image_size=manifest.image_size, width=manifest.width, num_classes=manifest.num_classes, dropout=0.0
        )
        head, _ = build_parts(arch, manifest.cut, release_dims=manifest.release_dims)
        if cfg.head_checkpoint is not None:
            ckpt = checkpoint_file(cfg.head_checkpoint, HEAD_CHECKPOINT)
        else:
            ckpt = cfg.artifacts / "head" / ARTIFACT_FILES.checkpoint
        weights = _head_weights(ckpt)
        expected = head.state_dict()
        missing = [n for n in expected if n not in weights or tuple(weights[n].shape) != tuple(expected[n].shape)]
        if missing:
            raise UserError(f"head checkpoint {ckpt} does not fit the manifest's head: {', '.join(missing)}")
        head.load_state_dict({n: torch.from_numpy(weights[n].astype(np.float32)) for n in expected})
        mean, std, cut, source = manifest.pixel_mean, manifest.pixel_std, manifest.cut, str(ckpt)
        centre = load_release_centre(cfg.artifacts, manifest)
        if centre is not None:
            head = CentredHead(head, centre)
    head.eval()
    return VictimHead(
        head, cut, arch.image_size, _activation_shape(head, arch, cut), tuple(mean), tuple(std), source,  # type: ignore[arg-type]
        width=arch.width, num_classes=arch.num_classes,
    )  # fmt: skip


def _activation_shape(head: torch.nn.Module, arch: ArchConfig, cut: str) -> tuple[int, ...]:
    """The cut's activation shape, or (k,) for a head that ends in a release projection to k dimensions."""
    projection = getattr(head, RELEASE_PROJECTION, None)
    return cut_info(arch, cut).activation_shape if projection is None else (projection.out_features,)


def head_from_weights(
    *, image_size: int, width: float, num_classes: int, cut: str, weights: dict[str, np.ndarray],
    pixel_mean: tuple[float, ...], pixel_std: tuple[float, ...], source: str, centre: np.ndarray | None = None,
    network: str = "vggface", mirror: bool = False,
) -> VictimHead:  # fmt: skip
    """The head that made a recorded release, rebuilt from its stored parameters (torch, eval mode), for the
    network family the view's header names (a view recorded before headers named one is VGG-Face's);
    ``mirror``: a head that averages each image with its mirror image (the header's ``flip_average``)."""
    # A head with a release projection recorded its frozen parameters with the rest (exporter.vggface).
    projection = weights.get(f"{RELEASE_PROJECTION}.weight")
    dims = None if projection is None else int(np.shape(projection)[0])
    rebuild = family(network).head
    assert rebuild is not None
    head = rebuild(cut, image_size, width, dims, mirror)
    expected = head.state_dict()
    missing = [n for n in expected if n not in weights or tuple(weights[n].shape) != tuple(expected[n].shape)]
    if missing:
        raise UserError(f"the recorded head ({source}) does not fit a {cut} head: {', '.join(missing)}")
    head.load_state_dict({n: torch.from_numpy(np.asarray(weights[n], dtype=np.float32)) for n in expected})
    if centre is not None:
        head = CentredHead(head, centre)
    head.eval()
    with torch.no_grad():  # the release's shape, whatever the family: one forward of a blank image
        shape = tuple(head(torch.zeros(1, 3, image_size, image_size)).shape[1:])
    return VictimHead(
        head, cut, image_size, shape, tuple(pixel_mean), tuple(pixel_std), source,  # type: ignore[arg-type]
        width=width, num_classes=num_classes,
    )  # fmt: skip


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

        self.artifacts = Path(artifacts)
        self.manifest = load_manifest(self.artifacts, verify=("head", "tail"))
        head_dir, tail_dir = self.artifacts / "head", self.artifacts / "tail"
        self.tail_source = checkpoint_file(tail_checkpoint, CHECKPOINT_NAME)
        self.head_source = (
            head_dir / ARTIFACT_FILES.checkpoint
            if head_checkpoint is None
            else checkpoint_file(head_checkpoint, HEAD_CHECKPOINT)
        )
        device = resolve_device(DeviceProfile.CPU)
        # The device's own head (plain onnxruntime, its checkpoint or the export's parameters); the tail's
        # checkpoint is the training API's, as the server writes it.
        self._head = HeadModel(self.artifacts, self.manifest, device, frozen=True,
                               checkpoint=None if head_checkpoint is None else self.head_source)  # fmt: skip
        self._tail_state = CheckpointState.load_checkpoint(str(self.tail_source))
        self._tail = Module(
            str(tail_dir / ARTIFACT_FILES.training), self._tail_state, str(tail_dir / ARTIFACT_FILES.eval),
            device="cpu", session_options=session_options(threads),
        )  # fmt: skip
        self._tail.eval()  # no dropout: the logits are a function of the input
        self.centre = load_release_centre(self.artifacts, self.manifest)

    def activations(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed (B, 3, H, W) float32 images -> head activations (B, *activation_shape), centred
        as the device centres them (``Manifest.release_centre``)."""
        a = self._head.embed(np.ascontiguousarray(images, dtype=np.float32))
        return a if self.centre is None else a - self.centre

    def tail_logits(self, activation: np.ndarray) -> np.ndarray:
        return self._tail(np.ascontiguousarray(activation, dtype=np.float32))

    def tail_losses(self, activation: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Per-example cross-entropy of the tail alone on the given (already released) activations."""
        return cross_entropy(self.tail_logits(activation), labels)

    def logits(
        self,
        index: FaceIndex,
        dp: DPConfig,  # the release the model was trained with (clip, epsilon, delta, normalize)
        *,
        noisy: bool = False,
        rng: np.random.Generator | None = None,
        batch_size: int = 32,
    ) -> np.ndarray:
        """Logits of head + tail on ``index``'s images, (N, classes).

        The head's activation is clipped to ``dp.clip`` and multiplied by the public scale
        ``dp.release_scale(d)``, as in training. ``noisy=False`` adds no noise (the trained model
        used on clean inputs, on the device or by a trusted party); ``noisy=True`` adds DP-A noise
        from ``rng`` (private split inference, the pipeline as deployed).
        """

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
            out.append(self.tail_logits(x))
        return np.concatenate(out) if out else np.zeros((0, m.num_classes), dtype=np.float32)

    def losses(self, index: FaceIndex, dp: DPConfig, **kw: Any) -> np.ndarray:
        """Per-example cross-entropy of head + tail on ``index``'s images (``logits``' options)."""
        return cross_entropy(self.logits(index, dp, **kw), index.labels)

    def accuracy(self, index: FaceIndex, dp: DPConfig, **kw: Any) -> float:
        """Held-out accuracy of head + tail (``logits``' options)."""
        if not len(index.paths):
            return float("nan")
        return float((self.logits(index, dp, **kw).argmax(axis=1) == index.labels).mean())
