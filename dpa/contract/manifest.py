"""The manifest: what an export contains, and the contract between device and edge.

``dpa export`` writes ``manifest.json`` next to ``head/`` and ``tail/``. Client and
server both rebuild their configuration from it and nothing else, and a session is
only opened when both sides hold byte-identical manifests (same sha256). The schema
is documented field by field in ``docs/protocol.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpa.base.atomic import atomic_write_bytes
from dpa.contract.choices import Choice
from dpa.contract.errors import UserError

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST_FILE",
    "ARTIFACT_FILES",
    "GraphNames",
    "OptimizerName",
    "OptimizerConfig",
    "Manifest",
    "load_manifest",
    "load_release_centre",
    "manifest_sha256",
    "sha256_file",
]

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
PARTS = ("head", "tail")


@dataclass(frozen=True)
class _ArtifactFiles:
    """File names inside ``head/`` and ``tail/``: onnxruntime's training API's, and the head's plain ones."""

    training: str = "training_model.onnx"
    eval: str = "eval_model.onnx"
    optimizer: str = "optimizer_model.onnx"
    checkpoint: str = "checkpoint"
    # The head only, for plain onnxruntime (no training API): its parameters as .npy arrays in a zip, and its
    # backward as an inference graph (images, upstream gradient and parameters in; each trainable
    # parameter's gradient out, named "<parameter>.grad"). docs/protocol.md section 2.
    parameters: str = "parameters.npz"
    gradient: str = "gradient_model.onnx"
    # The same backward cut in two, so that a step's forward runs once (exporter.saved_forward): a forward that
    # also outputs what the backward reads, and a backward that takes it instead of the images.
    forward_saving: str = "forward_saving.onnx"
    backward: str = "backward_model.onnx"

    def onnx_models(self) -> tuple[str, str, str]:
        return (self.training, self.eval, self.optimizer)


ARTIFACT_FILES = _ArtifactFiles()


class GraphNames:
    """Input/output names of the exported graphs (a client in any language uses these)."""

    IMAGES = "images"  # head input, float32 (B, 3, H, W), preprocessed as the manifest says
    ACTIVATION = "activation"  # head eval output and tail input, float32 (B, *activation_shape)
    # head training input: d loss / d activation, same shape (the training API hides names ending in _grad)
    UPSTREAM_GRAD = "upstream_gradient"
    HEAD_LOSS = "vjp_surrogate"  # head training output: sum(activation * upstream_grad), no meaning
    LABELS = "labels"  # tail training input, int64 (B,)
    LOGITS = "logits"  # tail eval output, float32 (B, num_classes)
    ACTIVATION_GRADIENT = "activation_gradient"  # tail training output 3 (1: mean CE loss, 2: logits)


class OptimizerName(Choice):
    SGD = "sgd"  # plain SGD (onnxruntime's SGDOptimizerV2 has no momentum)
    ADAMW = "adamw"  # AdamW, betas (0.9, 0.999), eps 1e-6, bias correction on

    @classmethod
    def what(cls) -> str:
        return "optimizer"


@dataclass(frozen=True)
class OptimizerConfig:
    name: OptimizerName = OptimizerName.SGD  # sgd keeps the split bit-comparable with torch
    lr: float = 0.01  # initial learning rate on both sides
    weight_decay: float = 0.0  # AdamW only; decoupled weight decay

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"learning rate must be a positive number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.weight_decay and self.name is OptimizerName.SGD:
            raise UserError("weight decay is only available with --optimizer adamw (onnxruntime's SGD has none)")


@dataclass(frozen=True)
class Manifest:
    arch: str
    cut: str
    image_size: int
    width: float
    num_classes: int
    dropout: float
    input_shape: tuple[int, ...]  # per example (C, H, W)
    activation_shape: tuple[int, ...]  # per example: (C, H, W) for conv/pool cuts, (features,) for fc cuts
    opset: int
    optimizer: OptimizerConfig
    pixel_mean: tuple[float, float, float]  # RGB, in 0..255 units, subtracted before dividing by pixel_std
    pixel_std: tuple[float, float, float]
    seed: int | None  # initialisation seed, or None when --weights gave the weights
    weights_sha256: str | None  # sha256 of the --weights file, when one was used
    files: dict[str, str] = field(default_factory=dict)  # "head/checkpoint" -> sha256
    versions: dict[str, str] = field(default_factory=dict)  # torch / onnx / onnxruntime used to export
    # Centred releases: the export's file (relative path, e.g. "head/release_centre.npy": float32
    # activation_shape, .npy) holding a PUBLIC mean activation the device subtracts before clipping
    # (docs/protocol.md section 5); None: releases are not centred.
    release_centre: str | None = None
    # The clip C a device uses unless told otherwise: half the median L2 norm of the (centred) head
    # activations on the PUBLIC faces the centre came from, so that (nearly) every example is clipped to
    # its direction times C (dpa.privacy.release_clip.SHARE_OF_PUBLIC_MEDIAN); None: not computed (a
    # device must then be given its clip).
    release_clip: float | None = None
    # A public projection before the release (``dpa export --release-dims``): the head ends in
    # y = W (a - mu), W the top release_dims principal directions of the cut's activation on the same
    # public faces (frozen head parameters ``release_projection.weight`` / ``.bias``), so the head's
    # output, every release and the tail's input are (release_dims,) and activation_shape says so; the
    # head graph already centres, so such an export has no release_centre. None: no projection.
    release_dims: int | None = None
    # The face alignment the network's input is (``dpa.faces.align.ALIGNMENT``: "dlib-5pt-150" is dlib's
    # 5-landmark similarity transform to a 150x150 chip with padding 0.25): a device aligns each photo so
    # before preprocessing, and releases nothing for a photo where no face is found. None: the image is
    # centre-cropped to a square and resized (the key is then left out of the JSON).
    alignment: str | None = None
    # The head graph averages each image's output with its mirror image's (``dpa export --flip-average``, the
    # field's test-time flip). The graph does it: a device runs the head as always and does nothing more; the
    # field says what the head is (and the audit rebuilds it so). False: left out of the JSON.
    flip_average: bool = False
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.release_dims is not None and (
            self.release_dims < 1 or tuple(self.activation_shape) != (self.release_dims,)
        ):
            raise UserError(
                f"manifest release_dims {self.release_dims} does not match its activation_shape "
                f"{tuple(self.activation_shape)} (a projected export's activation is (release_dims,))"
            )

    @property
    def activation_numel(self) -> int:
        return math.prod(self.activation_shape)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["optimizer"] = {**data["optimizer"], "name": self.optimizer.name.value}
        if self.alignment is None:
            del data["alignment"]  # an unaligned export's manifest is byte for byte what it was before the field
        if not self.flip_average:
            del data["flip_average"]  # likewise
        return data

    def write(self, directory: Path) -> Path:
        text = json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"
        path = directory / MANIFEST_FILE
        atomic_write_bytes(path, text.encode())
        return path

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        if not isinstance(data, dict):
            raise UserError("manifest must be a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise UserError(f"manifest schema_version {version!r} is not supported (this dpa reads {SCHEMA_VERSION})")
        try:
            opt = data["optimizer"]
            return cls(
                arch=str(data["arch"]),
                cut=str(data["cut"]),
                image_size=int(data["image_size"]),
                width=float(data["width"]),
                num_classes=int(data["num_classes"]),
                dropout=float(data["dropout"]),
                input_shape=tuple(int(d) for d in data["input_shape"]),
                activation_shape=tuple(int(d) for d in data["activation_shape"]),
                opset=int(data["opset"]),
                optimizer=OptimizerConfig(
                    name=OptimizerName.parse(opt["name"]), lr=float(opt["lr"]), weight_decay=float(opt["weight_decay"])
                ),
                pixel_mean=tuple(float(v) for v in data["pixel_mean"]),  # type: ignore[arg-type]
                pixel_std=tuple(float(v) for v in data["pixel_std"]),  # type: ignore[arg-type]
                seed=None if data["seed"] is None else int(data["seed"]),
                weights_sha256=data["weights_sha256"],
                files={str(k): str(v) for k, v in data["files"].items()},
                versions={str(k): str(v) for k, v in data["versions"].items()},
                release_centre=None if data.get("release_centre") is None else str(data["release_centre"]),
                release_clip=None if data.get("release_clip") is None else _positive(data["release_clip"]),
                release_dims=None if data.get("release_dims") is None else int(data["release_dims"]),
                alignment=None if data.get("alignment") is None else str(data["alignment"]),
                flip_average=_flag("flip_average", data.get("flip_average", False)),
            )
        except KeyError as exc:
            raise UserError(f"manifest is missing field {exc.args[0]!r}") from None
        except (TypeError, AttributeError) as exc:
            raise UserError(f"manifest has a field of the wrong type: {exc}") from None


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {value!r}")
    return value


def _positive(value: Any) -> float:
    clip = float(value)
    if not (math.isfinite(clip) and clip > 0):
        raise TypeError(f"release_clip must be a positive number, got {value!r}")
    return clip


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_sha256(directory: Path) -> str:
    """The identity of an export: sha256 of the manifest file's bytes (which hold every artifact's hash)."""
    return sha256_file(directory / MANIFEST_FILE)


def load_release_centre(directory: Path, manifest: Manifest) -> np.ndarray | None:
    """The export's public release centre (float32, activation_shape), or None if it has none."""
    if manifest.release_centre is None:
        return None
    path = Path(directory) / manifest.release_centre
    try:
        centre = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the release centre {path}: {exc}") from None
    if centre.dtype != np.float32 or tuple(centre.shape) != tuple(manifest.activation_shape):
        raise UserError(f"release centre {path} is {centre.dtype} {centre.shape}, expected float32 "
                        f"{tuple(manifest.activation_shape)}")  # fmt: skip
    return centre


def load_manifest(directory: Path, *, verify: tuple[str, ...] = ()) -> Manifest:
    """Read ``directory/manifest.json``; check the sha256 of every file of the parts in ``verify``.

    Raises ValueError with the file at fault: a missing manifest, bad JSON, a missing or
    altered artifact. A client needs only ``head/`` and a server only ``tail/``.
    """
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"no {MANIFEST_FILE} in {directory}: run `dpa export --out {directory}` first")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    manifest = Manifest.from_json(data)
    for part in verify:
        if part not in PARTS:
            raise UserError(f"unknown part {part!r}; valid: {', '.join(PARTS)}")
        for rel, digest in manifest.files.items():
            if not rel.startswith(part + "/"):
                continue
            file = Path(directory) / rel
            if not file.is_file():
                raise UserError(f"artifact {file} listed in the manifest is missing")
            if sha256_file(file) != digest:
                raise UserError(f"artifact {file} does not match its sha256 in the manifest (altered or re-exported?)")
    return manifest
