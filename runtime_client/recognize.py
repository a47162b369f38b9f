"""Recognition on the device: who is in an image (or "unknown"), and are two images the same person.

What a device does with the templates it kept after enrolling (``on_device.Gallery``): its own images
never leave it. A probe is embedded exactly as templates are made (the head's centred activation,
clipped, times the public scale) and scored by its cosine to each template; above the gallery's
open-set threshold the best template's identity is the answer, below it "unknown". Verification
compares the cosine of two images' own embeddings (``on_device.pair_embeddings``: the head's output, not
centred) against the pair threshold. Both thresholds were chosen on public
faces (``dpa.runs.recognition``); ``threshold`` overrides them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpa.contract.devices import DeviceProfile, resolve_device
from dpa.contract.errors import UserError
from dpa.contract.manifest import load_manifest
from dpa.faces.verification import unit_rows
from runtime_client.alignment import aligned_photos
from runtime_client.head import HeadModel
from runtime_client.on_device import GALLERY_FILE, Gallery, embed_files, load_gallery, pair_embeddings

__all__ = ["UNKNOWN", "Recognition", "recognize", "verify"]

UNKNOWN = "unknown"


@dataclass(frozen=True)
class Recognition:
    path: Path
    identity: str  # a gallery name, or UNKNOWN
    score: float  # the best cosine to a template
    best_match: str  # the best template's name, even when below the threshold


def _setup(artifacts: Path, state_dir: Path) -> tuple[HeadModel, Gallery, object]:
    gallery = load_gallery(Path(state_dir) / GALLERY_FILE)
    manifest = load_manifest(artifacts, verify=("head",))
    if tuple(gallery.templates.shape[1:]) != tuple(manifest.activation_shape):
        raise UserError(
            f"the gallery in {state_dir} was made at another cut ({gallery.templates.shape[1:]}, this export's "
            f"activation is {tuple(manifest.activation_shape)}): use the export the device enrolled with"
        )
    return HeadModel(artifacts, manifest, resolve_device(DeviceProfile.CPU)), gallery, manifest


def _check_files(paths: list[Path]) -> None:
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise UserError(f"no such image: {', '.join(missing)}")


def _embed(head: HeadModel, gallery: Gallery, manifest, paths: list[Path]) -> np.ndarray:  # type: ignore[no-untyped-def]
    _check_files(paths)
    return unit_rows(embed_files(head, manifest, aligned_photos(paths, manifest), gallery.clip, gallery.scale))


def _threshold(given: float | None, kept: float, what: str) -> float:
    t = kept if given is None else given
    if not math.isfinite(t):
        raise UserError(f"no {what} threshold in the gallery (none was chosen on public faces): pass --threshold")
    return t


def recognize(
    artifacts: Path, state_dir: Path, paths: list[Path], *, threshold: float | None = None
) -> list[Recognition]:
    """Each image's identity among the enrolled ones, or UNKNOWN below the open-set threshold."""
    head, gallery, manifest = _setup(artifacts, state_dir)
    t = _threshold(threshold, gallery.open_set_threshold, "open-set")
    cos = _embed(head, gallery, manifest, paths) @ unit_rows(gallery.templates).T
    cos[:, gallery.counts <= 0] = -np.inf  # a class the server never received
    best = cos.argmax(axis=1)
    return [
        Recognition(Path(p), gallery.names[k] if cos[i, k] > t else UNKNOWN, float(cos[i, k]), gallery.names[k])
        for i, (p, k) in enumerate(zip(paths, best, strict=True))
    ]


def verify(
    artifacts: Path, state_dir: Path, a: Path, b: Path, *, threshold: float | None = None
) -> tuple[bool, float, float]:
    """(same person?, cosine of the two embeddings, the threshold used)."""
    head, gallery, manifest = _setup(artifacts, state_dir)
    t = _threshold(threshold, gallery.pair_threshold, "verification")
    _check_files([Path(a), Path(b)])
    e = pair_embeddings(head, manifest, aligned_photos([Path(a), Path(b)], manifest))
    score = float(e[0] @ e[1])
    return score >= t, score, t
