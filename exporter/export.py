"""``dpa export``: build a network family (VGG-Face, dlib's ResNet), split it, write and verify the artifacts,
atomically.

Everything is built in a temporary folder beside ``--out``, verified against torch,
and only then renamed into place. An existing export at ``--out`` is replaced as a
whole (moved aside, then removed), so a reader never sees a mix of two exports and a
failed export leaves ``--out`` as it was.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpa.contract.architecture import ArchConfig
from dpa.contract.choices import NetworkName
from dpa.contract.errors import UserError
from dpa.contract.manifest import GraphNames, Manifest, OptimizerConfig, sha256_file
from dpa.faces.lfw import index_faces, load_batch
from dpa.privacy.release_clip import public_clip_from_norms
from exporter.networks import family
from exporter.networks.vggface import VGGFACE_MEAN

__all__ = ["ExportConfig", "export", "principal_basis", "VGGFACE_MEAN"]

log = logging.getLogger(__name__)

#: Where a centred export keeps its public release centre (``Manifest.release_centre``).
RELEASE_CENTRE_FILE = "head/release_centre.npy"


@dataclass(frozen=True)
class ExportConfig:
    network: NetworkName = NetworkName.VGGFACE  # the family (exporter.networks); VGG-Face is the seed's
    # VGG-Face's shape; the dlib family reads only num_classes (its tail's classifier) from it
    arch: ArchConfig = field(default_factory=ArchConfig)
    cut: str = "conv1_1"  # the seed's cut: the device runs only the first convolution
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    out: Path = Path("artifacts")  # default export folder, shared by client and server on one machine
    # VGG-Face: a layer-named PyTorch state dict, None: seeded initialisation; dlib-resnet: its .dat file,
    # None: the one face-recognition-models installs
    weights: Path | None = None
    seed: int = 0  # initialisation seed (ignored with weights)
    verify: bool = True  # compare ORT against torch autograd before publishing the export
    verify_batch: int = 2  # examples in the verification batch
    # Max relative L2 error (see exporter.verify). Gradients get more room: at 224x224 width 1.0,
    # max-pool ties routed differently in deep layers give d loss / d activation 0.6% (measured).
    tolerance: float = 2e-2  # gradients
    forward_tolerance: float = 1e-4  # activations, logits, loss
    ort_format: bool = False  # also write the head in ORT format for ONNX Runtime Mobile
    # Pixel scale (images are (x - mean) / std); None: 1 with --weights (published VGG-Face), 64 without.
    # `dpa pretrain` trains at 64: export its weights with 64.
    pixel_std: float | None = None
    # Centred releases: a folder of PUBLIC faces (LFW layout) whose mean head activation the device
    # subtracts before clipping (head/release_centre.npy); None: not centred.
    centre_faces: Path | None = None
    # Without centring: a folder of PUBLIC faces to measure only ``release_clip`` on (the trained-from-scratch
    # recipe's exports); ignored with centre_faces, which measures it on the centred activations.
    clip_faces: Path | None = None
    # A public projection before the release: the head ends in y = W (a - centre), W the top
    # ``release_dims`` principal directions of the centred activations of the same public faces
    # (``exporter.vggface.RELEASE_PROJECTION``, frozen); the release, the tail's input and the templates
    # are then k-dimensional, under the same sensitivity 2C. None: releases are the cut's activation.
    release_dims: int | None = None
    # How far the projection whitens the public spectrum: row i of W is scaled by (lambda_i / lambda_1) ** (-w / 2),
    # lambda the public principal variances (0: plain principal directions; 1: whitened). The clip then spends
    # its norm more evenly over the directions, which the release's isotropic noise treats alike. On public LFW
    # people (scripts/real_face_projection.py, 5 photos enrolled each, whole-run epsilon 8): 48 dims 0.890
    # plain, 0.904 at w = 0.4, 0.890 at w = 1.
    release_whitening: float = 0.0
    # The field's test-time flip inside the head (``--flip-average``): its output is the mean of the image's and
    # its mirror image's, so the device's releases and probes, the public centre, projection and clip all see
    # it (twice the head's forward). dlib-resnet at its embedding only. On public LFW people (5 photos each,
    # whole-run epsilon 8, scripts/real_face_projection.py): 0.904 -> 0.923.
    flip_average: bool = False


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _check_out_dir(out: Path) -> None:
    parent = out.resolve().parent
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a folder")
    if not parent.is_dir():
        raise UserError(f"cannot write to {out}: parent folder {parent} does not exist")
    try:
        probe = tempfile.TemporaryFile(dir=parent)
    except OSError as exc:
        raise UserError(f"cannot write to {out}: {exc.strerror}") from None
    probe.close()


def export(cfg: ExportConfig, *, progress: Callable[[str], None] = lambda _msg: None) -> tuple[Manifest, object]:
    """Export and (by default) verify. Returns the manifest and the verification report (or None).

    Raises ValueError for every user error (bad cut, unwritable folder, wrong weights, failed verification);
    nothing is left at ``cfg.out`` or beside it then.
    """
    import onnxruntime
    import torch

    from exporter.ort_artifacts import export_onnx, write_part_artifacts

    onnxruntime.set_default_logger_severity(3)  # onnxblock's graph builders are very chatty at INFO
    _check_request(cfg)

    net = family(cfg.network)
    split = net.build(cfg)
    if net.check is not None:
        progress(f"checking the {cfg.network.value} network against its own toolkit")
        check_note = net.check(cfg, split)
    if cfg.flip_average:  # after the check: the toolkit's descriptor is of the image alone
        assert net.mirror is not None  # _check_request
        split = net.mirror(cfg, split)
    size = split.image_size

    out = cfg.out.resolve()
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
    try:
        example = torch.zeros(2, 3, size, size)
        split, centre, clip = _public_release(cfg, net, split, example, progress)
        head, tail = split.head, split.tail
        with torch.no_grad():
            activation = head.eval()(example)  # the (possibly projected) head's
        progress("exporting head to ONNX")
        write_part_artifacts(
            export_onnx(head, example, GraphNames.IMAGES, GraphNames.ACTIVATION),
            part="head",
            out_dir=staging / "head",
            optimizer=cfg.optimizer,
            ort_format=cfg.ort_format,
            frozen=cfg.flip_average,
        )
        progress("exporting tail to ONNX")
        write_part_artifacts(
            export_onnx(tail.train(), activation, GraphNames.ACTIVATION, GraphNames.LOGITS),
            part="tail",
            out_dir=staging / "tail",
            optimizer=cfg.optimizer,
        )
        if centre is not None:
            np.save(staging / RELEASE_CENTRE_FILE, centre)
        manifest = _manifest(cfg, split, staging, centre is not None, clip)
        manifest.write(staging)
        report = _verified(cfg, staging, head, tail, None if net.check is None else check_note, progress)
        _publish(staging, out)
        return manifest, report
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _manifest(cfg: ExportConfig, split: Any, staging: Path, centred: bool, clip: float | None) -> Manifest:
    """The manifest of what ``staging`` holds: every file's hash, and what the device and the server must
    agree on (the network, its cut and shapes, its preprocessing, the public release's centre, clip and
    projection, the flip)."""
    from exporter.ort_artifacts import OPSET

    files = {p.relative_to(staging).as_posix(): sha256_file(p) for p in sorted(staging.rglob("*")) if p.is_file()}
    size = split.image_size
    return Manifest(
        arch=cfg.network.value,
        cut=cfg.cut,
        image_size=size,
        width=split.width,
        num_classes=cfg.arch.num_classes,
        dropout=split.dropout,
        input_shape=(3, size, size),
        activation_shape=split.activation_shape,
        opset=OPSET,
        optimizer=cfg.optimizer,
        pixel_mean=split.pixel_mean,
        pixel_std=split.pixel_std,
        seed=split.seed,
        weights_sha256=None if split.weights is None else sha256_file(Path(split.weights)),
        files=files,
        versions=_versions(),
        release_centre=RELEASE_CENTRE_FILE if centred else None,
        release_clip=clip,
        release_dims=cfg.release_dims,
        alignment=split.alignment,
        flip_average=cfg.flip_average,
    )


def _check_request(cfg: ExportConfig) -> None:
    """Every refusal that needs no network built: the cut, the folder, the weights, the projection."""
    cuts = family(cfg.network).cuts()
    if cfg.cut not in cuts:
        raise UserError(f"unknown cut {cfg.cut!r}; valid cuts: {', '.join(cuts)}")
    _check_out_dir(cfg.out)
    if cfg.weights is not None and not Path(cfg.weights).is_file():
        raise UserError(f"weights file {cfg.weights} does not exist")
    if cfg.release_dims is not None and cfg.centre_faces is None:
        raise UserError("--release-dims needs --centre-from: the projection's directions come from public faces")
    if cfg.release_dims is not None and cfg.release_dims < 1:
        raise UserError(f"--release-dims must be >= 1, got {cfg.release_dims}")
    if not (math.isfinite(cfg.release_whitening) and 0.0 <= cfg.release_whitening <= 1.0):
        raise UserError(f"--release-whitening must be in [0, 1], got {cfg.release_whitening:g}")
    if cfg.release_whitening and cfg.release_dims is None:
        raise UserError("--release-whitening needs --release-dims: it shapes the public projection")
    if cfg.flip_average and family(cfg.network).mirror is None:
        raise UserError(f"--flip-average is not available for {cfg.network.value}")


def _public_release(
    cfg: ExportConfig, net: Any, split: Any, example: Any, progress: Callable[[str], None]
) -> tuple[Any, np.ndarray | None, float | None]:
    """(split, centre, clip): what public faces give the release. The clip alone without centring
    (``clip_faces``); the centre and the clip (``centre_faces``); with ``release_dims`` the head projected
    on the public principal directions, which centres by its bias (no centre file) and whose output the clip
    is measured on."""
    head, size = split.head, split.image_size
    pre = _Pre(size, split.pixel_mean, split.pixel_std)
    if cfg.centre_faces is None:
        if cfg.clip_faces is None:
            return split, None, None
        progress("measuring the release clip on public faces")
        return split, None, _public_clip(head, Path(cfg.clip_faces), pre)
    progress("computing the release centre and clip on public faces")
    faces = Path(cfg.centre_faces)
    if split.alignment is not None:
        _check_chips(faces, size, split.alignment)
    centre = _public_centre(head, faces, pre)
    if cfg.release_dims is None:
        return split, centre, _public_clip(head, faces, pre, centre)
    if net.project is None:
        raise UserError(f"--release-dims is not available for {cfg.network.value} yet")
    progress(f"projecting the release on {cfg.release_dims} public principal directions")
    basis = _public_basis(head, faces, pre, centre, cfg.release_dims, cfg.release_whitening)
    split = net.project(cfg, split, basis, centre)
    return split, None, _public_clip(split.head, faces, pre)


def _verified(
    cfg: ExportConfig, staging: Path, head: Any, tail: Any, check_note: str | None, progress: Callable[[str], None]
) -> object:
    """The verification report of the staged export against torch autograd (None without ``cfg.verify``);
    refused when an error exceeds its tolerance."""
    if not cfg.verify:
        return None
    from exporter.verify import verify_export

    progress("verifying against torch autograd")
    report = verify_export(staging, head, tail, batch=cfg.verify_batch, seed=cfg.seed)
    if check_note is not None:
        report.notes.append(check_note)
    for name, (_abs, rel) in report.errors.items():
        limit = cfg.tolerance if name.endswith("grad") or "d_activation" in name else cfg.forward_tolerance
        if rel > limit:
            raise UserError(f"verification failed: relative error {rel:.3g} of {name} exceeds tolerance {limit:g}")
    return report


@dataclass(frozen=True)
class _Pre:
    """How the export's network reads an image: side, mean, std (the manifest's)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _activations(head: object, faces: Path, pre: _Pre) -> Iterator[Any]:
    """The head's activations (float64 torch tensors, 64 images at a time) on a folder of public faces."""
    import torch

    index = index_faces(faces, min_faces_per_person=1)
    if not len(index.paths):
        raise UserError(f"no faces in {faces} to compute the release centre from")
    for start in range(0, len(index.paths), 64):
        batch = load_batch(list(index.paths[start : start + 64]), size=pre.size, mean=pre.mean, std=pre.std)
        with torch.no_grad():
            yield head.eval()(torch.from_numpy(batch)).double()  # type: ignore[attr-defined]


def _check_chips(faces: Path, size: int, alignment: str) -> None:
    """An aligned network's public faces must be its chips: the centre and the clip are statistics of what the
    device's head will see, and a centre crop of a photograph is not that."""
    from PIL import Image

    index = index_faces(faces, min_faces_per_person=1)
    for path in index.paths[:1]:
        with Image.open(path) as im:
            if im.size != (size, size):
                raise UserError(f"--centre-from {faces} holds {im.size[0]}x{im.size[1]} photos, not {alignment} "
                                f"chips: align them first (dpa faces align {faces} CHIPS)")  # fmt: skip


def _public_centre(head: object, faces: Path, pre: _Pre) -> np.ndarray:
    """The mean head activation over a folder of public faces, float32 of one example's shape: the release
    centre, from public faces only (summed batch by batch, so that no batch of activations is kept)."""
    count, total = 0, 0.0
    for a in _activations(head, faces, pre):
        count, total = count + len(a), total + a.sum(dim=0)
    return (total / count).float().numpy()  # type: ignore[union-attr]


def _public_clip(head: object, faces: Path, pre: _Pre, centre: np.ndarray | None = None) -> float:
    """The export's ``release_clip``: ``dpa.privacy.release_clip``'s policy applied to the L2 norms of the
    (centred) public activations, from public faces only."""
    import torch

    c = None if centre is None else torch.from_numpy(centre)
    sub = (lambda a: a.float() - c) if c is not None else (lambda a: a.float())
    norms = np.concatenate([sub(a).flatten(1).norm(dim=1).numpy() for a in _activations(head, faces, pre)])
    return public_clip_from_norms(norms)


def _public_basis(
    head: object, faces: Path, pre: _Pre, centre: np.ndarray, k: int, whitening: float = 0.0
) -> np.ndarray:  # fmt: skip
    """``principal_basis`` of the public activations centred on ``centre``; refused where they have fewer than
    ``k`` principal directions."""
    a = np.concatenate([x.flatten(1).numpy() for x in _activations(head, faces, pre)])
    a -= np.ravel(centre).astype(np.float64)
    if not 1 <= k <= min(len(a) - 1, a.shape[1]):
        raise UserError(
            f"--release-dims {k}: the {len(a)} public faces in {faces} give at most "
            f"{min(len(a) - 1, a.shape[1])} principal directions of the {a.shape[1]}-element activation"
        )
    return principal_basis(a, k, whitening)


def principal_basis(centred: np.ndarray, k: int, whitening: float = 0.0) -> np.ndarray:
    """(k, d) float32: the top ``k`` principal directions of the rows of ``centred`` (n, d), row i scaled by
    (lambda_i / lambda_1) ** (-whitening / 2) (orthonormal rows at 0); each row's largest entry made positive,
    so the export does not depend on the SVD's signs. The release projection's one rule: the export and
    ``scripts/real_face_projection.py``, which chooses its ``k`` and ``whitening``, both call it."""
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    basis = vt[:k] * ((singular[:k] / singular[0]) ** -whitening)[:, None]
    signs = np.sign(basis[np.arange(k), np.abs(basis).argmax(axis=1)])
    return (basis * signs[:, None]).astype(np.float32)


def _publish(staging: Path, out: Path) -> None:
    """Rename the verified staging folder to ``out``; an old export is moved aside first, then removed."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{staging.name.rsplit('-', 1)[-1]}"
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
