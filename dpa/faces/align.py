"""Face alignment as the field does it: detect, find 5 landmarks, warp a similarity transform to a chip.

dlib's HOG frontal-face detector, its 5-point shape predictor (``face-recognition-models``, CC0) and
``get_face_chip`` (a similarity transform of the landmarks onto dlib's canonical face, ``padding`` of the
face's size around it, bilinear) make exactly the 150x150 chip dlib's face network was trained on; any
other crop costs accuracy. dlib is an optional extra (``pip install 'dpa[faces]'``): only the device that
aligns its own photos and ``dpa faces align`` need it, never the server.

Which face: the detection whose centre lies nearest the image's centre (LFW's convention: the labelled
person is the central face). No face found: ``chip`` returns None and the caller names the image and
releases nothing for it. ``centre_fallback`` is for benchmarks whose protocol scores every image (LFW's
View 2): the landmarks are then looked for in a fixed central box, reported as a fallback.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dpa.contract.errors import UserError

__all__ = ["ALIGNMENT", "Aligner", "AlignReport", "AlignSpec", "align_folder", "model_file"]


@dataclass(frozen=True)
class AlignSpec:
    """One alignment, as a manifest names it: the chip's side and dlib's padding around the face."""

    name: str  # the manifest's ``alignment`` value
    size: int  # chip side, pixels
    padding: float  # dlib's get_face_chip padding: 0.25 is what dlib's face network was trained on
    upsample: int = 1  # HOG detector pyramid upsampling: finds faces down to ~40 px instead of ~80


#: Alignments by name. ``dlib-5pt-150`` is dlib's own (``compute_face_descriptor``'s chip).
ALIGNMENT: dict[str, AlignSpec] = {"dlib-5pt-150": AlignSpec("dlib-5pt-150", 150, 0.25)}
#: The central box tried when no face is detected, as shares of the image's side (left, top, right,
#: bottom): the median HOG detection on LFW's View 1 training images (``scripts/lfw_detection_box.py``).
CENTRE_BOX = (0.29, 0.29, 0.71, 0.71)


def model_file(name: str) -> Path:
    """A model file of ``face-recognition-models``, found without importing the package (its ``__init__``
    needs ``pkg_resources``, which current setuptools no longer ships)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("face alignment needs dlib's models: pip install 'dpa[faces]' (face-recognition-models)")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall face-recognition-models")
    return path


def _dlib():  # type: ignore[no-untyped-def]
    try:
        import dlib
    except ImportError:
        raise UserError("face alignment needs dlib: pip install 'dpa[faces]' (dlib-bin)") from None
    return dlib


@dataclass
class Aligner:
    """Detector and landmark model loaded once; ``chip`` aligns one RGB image."""

    spec: AlignSpec = field(default_factory=lambda: ALIGNMENT["dlib-5pt-150"])
    centre_fallback: bool = False

    def __post_init__(self) -> None:
        dlib = _dlib()
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(str(model_file("shape_predictor_5_face_landmarks.dat")))

    def _central_detection(self, rgb: np.ndarray):  # type: ignore[no-untyped-def]
        found = self._detector(rgb, self.spec.upsample)
        if not len(found):
            return None
        h, w = rgb.shape[:2]
        return min(found, key=lambda r: (r.center().x - w / 2) ** 2 + (r.center().y - h / 2) ** 2)

    def chip(self, rgb: np.ndarray) -> tuple[np.ndarray | None, bool]:
        """(chip (size, size, 3) uint8 or None when no face, whether the centre box stood in for a detection)."""
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        box, fallback = self._central_detection(rgb), False
        if box is None:
            if not self.centre_fallback:
                return None, False
            h, w = rgb.shape[:2]
            left, top, right, bottom = CENTRE_BOX
            box = self._dlib.rectangle(round(left * w), round(top * h), round(right * w), round(bottom * h))
            fallback = True
        shape = self._landmarks(rgb, box)
        chip = self._dlib.get_face_chip(rgb, shape, size=self.spec.size, padding=self.spec.padding)
        return np.asarray(chip, dtype=np.uint8), fallback

    def chip_file(self, path: Path) -> tuple[np.ndarray | None, bool]:
        try:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"))
        except OSError as exc:
            raise UserError(f"cannot read image {path}: {exc}") from exc
        return self.chip(rgb)


@dataclass(frozen=True)
class AlignReport:
    aligned: int
    fallbacks: tuple[Path, ...]  # images aligned on the centre box (only with centre_fallback)
    no_face: tuple[Path, ...]  # images with no face found: no chip written


def align_folder(
    src: Path, dst: Path, *, aligner: Aligner, progress: Callable[[int, int], None] = lambda _i, _n: None
) -> AlignReport:
    """Write a PNG chip for every image of an LFW-layout folder (``src/<identity>/<image>``) into the same
    layout under ``dst``, which must not exist yet. The chips are written to a staging folder beside
    ``dst`` and renamed into place at the end, so ``dst`` is whole or absent."""
    import shutil
    import tempfile

    from dpa.faces.lfw import IMAGE_EXTENSIONS

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise UserError(f"{src} is not a folder of identity folders")
    if dst.exists():
        raise UserError(f"{dst} exists: align into a new folder")
    images = sorted(p for p in src.glob("*/*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise UserError(f"no images in {src} (expected {src}/<identity>/<image>.jpg)")
    staging = Path(tempfile.mkdtemp(dir=dst.resolve().parent, prefix=f".{dst.name}.staging-"))
    fallbacks: list[Path] = []
    no_face: list[Path] = []
    try:
        for i, path in enumerate(images):
            chip, fallback = aligner.chip_file(path)
            progress(i + 1, len(images))
            if chip is None:
                no_face.append(path)
                continue
            if fallback:
                fallbacks.append(path)
            out = staging / path.parent.name / (path.stem + ".png")
            out.parent.mkdir(exist_ok=True)
            Image.fromarray(chip).save(out)
        staging.rename(dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return AlignReport(len(images) - len(no_face), tuple(fallbacks), tuple(no_face))
