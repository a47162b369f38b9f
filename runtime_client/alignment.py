"""The alignment the export's manifest names, applied on the device before its head sees a photo.

An export of a network trained on aligned chips (``Manifest.alignment``, e.g. dlib's ``dlib-5pt-150``)
reads chips, not photographs: the device aligns its own photos with ``dpa.faces.align`` (dlib, the
optional ``faces`` extra) and keeps the chips in its state folder. A folder that holds chips already (every
image the chip's size) is read as it is. A photo with no face found is named and left out: nothing is
released for it, and recognising it is refused.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from PIL import Image

from dpa.contract.errors import UserError
from dpa.contract.manifest import Manifest
from dpa.faces.align import ALIGNMENT, align_images, chip_path
from dpa.faces.lfw import IMAGE_EXTENSIONS

__all__ = ["aligned_folder", "aligned_photos"]

log = logging.getLogger(__name__)


def _spec(manifest: Manifest):  # type: ignore[no-untyped-def]
    if manifest.alignment not in ALIGNMENT:
        raise UserError(f"the export names alignment {manifest.alignment!r}; this dpa knows {', '.join(ALIGNMENT)}")
    return ALIGNMENT[manifest.alignment]


def _are_chips(paths: list[Path], size: int) -> bool:
    for p in paths:
        with Image.open(p) as im:
            if im.size != (size, size):
                return False
    return True


def aligned_folder(root: Path, manifest: Manifest, state_dir: Path) -> Path:
    """The folder the device indexes: ``root`` for an unaligned export or a folder of chips; else the chips
    of ``root``'s photos under ``state_dir/chips/<alignment>`` (aligned once; photos without a face left out,
    each named in a warning)."""
    if manifest.alignment is None:
        return root
    spec = _spec(manifest)
    photos = sorted(p for p in Path(root).glob("*/*") if p.suffix.lower() in IMAGE_EXTENSIONS
                    and not p.name.startswith(".") and not p.parent.name.startswith("."))  # fmt: skip
    if not photos or _are_chips(photos, spec.size):
        return root
    chips = Path(state_dir) / "chips" / spec.name
    report = align_images(photos, Path(root), chips, spec=spec)
    for path in report.no_face:
        log.warning("no face found in %s: left out, nothing is released for it", path)
    return chips


def aligned_photos(paths: list[Path], manifest: Manifest, workdir: Path | None = None) -> list[Path]:
    """The files the head reads for ``paths`` (``dpa recognize``, ``dpa verify``): the photos themselves, or their
    chips in ``workdir`` (a temporary folder if None). A photo with no face found is refused by name."""
    if manifest.alignment is None:
        return list(paths)
    spec = _spec(manifest)
    if _are_chips(list(paths), spec.size):
        return list(paths)
    out = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="dpa-chips-"))
    links = []
    for i, p in enumerate(paths):
        # each photo its own folder, so that two photos of one name never share a chip
        link = out / "photos" / str(i) / Path(p).name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(Path(p).resolve())
        links.append(link)
    report = align_images(links, out / "photos", out / "chips", spec=spec, workers=1)
    if report.no_face:
        raise UserError("no face found in " + ", ".join(str(paths[int(p.parent.name)]) for p in report.no_face))
    return [chip_path(out / "photos", out / "chips", link) for link in links]
