"""Face alignment as the field does it: detect, find 5 landmarks, warp a similarity transform to a chip.

dlib's HOG frontal-face detector (and, for the faces it misses, dlib's CNN detector), its 5-point shape
predictor (``face-recognition-models``, CC0) and
``get_face_chip`` (a similarity transform of the landmarks onto dlib's canonical face, ``padding`` of the
face's size around it, bilinear) make exactly the 150x150 chip dlib's face network was trained on; any
other crop costs accuracy. dlib is an optional extra (``pip install 'dpa[faces]'``): only the device that
aligns its own photos and ``dpa faces align`` need it, never the server.

Detectors: the HOG detector first (fast); where it finds nothing, dlib's MMOD CNN detector
(``mmod_human_face_detector.dat``, also in face-recognition-models), which finds the profile, dark and
occluded faces HOG misses (every one of 20 LFW misses tried) at about a second an image on one core. Both
box conventions suit the 5-point model (dlib trained it on both). Which face: the detection whose centre
lies nearest the image's centre (LFW's convention: the labelled person is the central face). No face
found: ``chip`` returns None and the caller names the image and releases nothing for it.
``centre_fallback`` is for benchmarks whose protocol scores every image (LFW's View 2): the landmarks are
then looked for in a fixed central box, and the report says so.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dpa.contract.errors import UserError

__all__ = [
    "ALIGNMENT", "Aligner", "AlignReport", "AlignSpec", "align_folder", "align_images", "chip_path", "model_file",
]  # fmt: skip


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
#: bottom): the median HOG detection over the 9,479 images of LFW's View 1 training identities that HOG
#: found a face in (development data: never View 2).
CENTRE_BOX = (0.268, 0.320, 0.700, 0.748)


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
    cnn_fallback: bool = True  # try the CNN detector where HOG finds nothing

    def __post_init__(self) -> None:
        dlib = _dlib()
        self._dlib = dlib
        self._hog = dlib.get_frontal_face_detector()
        self._cnn = None
        self._landmarks = dlib.shape_predictor(str(model_file("shape_predictor_5_face_landmarks.dat")))

    def _detect(self, rgb: np.ndarray) -> tuple[list, str]:  # type: ignore[type-arg]
        found = list(self._hog(rgb, self.spec.upsample))
        if found or not self.cnn_fallback:
            return found, "hog"
        if self._cnn is None:
            self._cnn = self._dlib.cnn_face_detection_model_v1(str(model_file("mmod_human_face_detector.dat")))
        return [d.rect for d in self._cnn(rgb, self.spec.upsample)], "cnn"

    def locate(self, rgb: np.ndarray) -> tuple[object | None, str]:
        """(the central face's box or None, which detector found it: "hog", "cnn" or "centre")."""
        found, detector = self._detect(rgb)
        h, w = rgb.shape[:2]
        if found:
            return min(found, key=lambda r: (r.center().x - w / 2) ** 2 + (r.center().y - h / 2) ** 2), detector
        if not self.centre_fallback:
            return None, detector
        left, top, right, bottom = CENTRE_BOX
        return self._dlib.rectangle(round(left * w), round(top * h), round(right * w), round(bottom * h)), "centre"

    def detected_chip(self, rgb: np.ndarray) -> tuple[np.ndarray | None, str]:
        """(chip (size, size, 3) uint8 or None when no face, the detector that found it: hog, cnn or centre)."""
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        box, detector = self.locate(rgb)
        if box is None:
            return None, detector
        shape = self._landmarks(rgb, box)
        chip = self._dlib.get_face_chip(rgb, shape, size=self.spec.size, padding=self.spec.padding)
        return np.asarray(chip, dtype=np.uint8), detector

    def chip(self, rgb: np.ndarray) -> tuple[np.ndarray | None, bool]:
        """(chip or None when no face, whether the centre box stood in for a detection)."""
        chip, detector = self.detected_chip(rgb)
        return chip, chip is not None and detector == "centre"

    def chip_file(self, path: Path) -> tuple[np.ndarray | None, bool]:
        return self.chip(_read_rgb(path))


@dataclass(frozen=True)
class AlignReport:
    """What an alignment of many images did: how many chips, and which images needed help or had no face."""

    aligned: int
    reused: int  # chips already in the cache (their detectors are not recounted)
    cnn: tuple[Path, ...]  # images only the CNN detector found a face in
    fallbacks: tuple[Path, ...]  # images aligned on the centre box (only with centre_fallback)
    no_face: tuple[Path, ...]  # images with no face found: no chip written, nothing released for them

    def as_json(self) -> dict[str, object]:
        return {"aligned": self.aligned, "reused": self.reused, "cnn_detector": len(self.cnn),
                "centre_box": [str(p) for p in self.fallbacks], "no_face": [str(p) for p in self.no_face]}  # fmt: skip


_WORKER: Aligner | None = None


def _init_worker(spec: AlignSpec, centre_fallback: bool) -> None:
    global _WORKER
    _WORKER = Aligner(spec, centre_fallback=centre_fallback)


def _align_one(job: tuple[Path, Path]) -> tuple[Path, str | None]:
    """Write one chip atomically; (source, the detector that found the face, or None: no face)."""
    from io import BytesIO

    from dpa.base.atomic import atomic_write_bytes

    src, out = job
    assert _WORKER is not None
    chip, detector = _WORKER.detected_chip(_read_rgb(src))
    if chip is None:
        return src, None
    buf = BytesIO()
    Image.fromarray(chip).save(buf, format="PNG")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    return src, detector


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.ascontiguousarray(np.asarray(im.convert("RGB")))
    except OSError as exc:
        raise UserError(f"cannot read image {path}: {exc}") from exc


def chip_path(src_root: Path, chips: Path, image: Path) -> Path:
    """Where the chip of ``src_root/<identity>/<name>.<ext>`` lives: ``chips/<identity>/<name>.png``."""
    rel = Path(image).relative_to(src_root)
    return Path(chips) / rel.parent / (rel.stem + ".png")


def align_images(
    images: list[Path], src_root: Path, chips: Path, *, spec: AlignSpec = ALIGNMENT["dlib-5pt-150"],
    centre_fallback: bool = False, workers: int = 2, progress: Callable[[int, int], None] = lambda _i, _n: None,
) -> AlignReport:  # fmt: skip
    """Chips of ``images`` (under ``src_root``, LFW layout) in ``chips`` (same layout, PNG), in ``workers``
    processes. Each chip is written atomically (temp file, fsync, rename), so an interrupted run leaves whole
    chips only, and a chip already there is reused: a second call aligns only what is missing. An image with
    no face gets no chip (and is named in the report); one that had none before is tried again."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(Path(p), chip_path(src_root, chips, p)) for p in images]
    todo = [j for j in jobs if not j[1].is_file()]
    cnn: list[Path] = []
    fallbacks: list[Path] = []
    no_face: list[Path] = []
    done = len(jobs) - len(todo)
    progress(done, len(jobs))
    if todo:
        with ProcessPoolExecutor(max(1, workers), initializer=_init_worker, initargs=(spec, centre_fallback)) as pool:
            for src, detector in pool.map(_align_one, todo, chunksize=16):
                done += 1
                progress(done, len(jobs))
                if detector is None:
                    no_face.append(src)
                elif detector == "cnn":
                    cnn.append(src)
                elif detector == "centre":
                    fallbacks.append(src)
    return AlignReport(len(jobs) - len(no_face), len(jobs) - len(todo), tuple(cnn), tuple(fallbacks), tuple(no_face))


def align_folder(
    src: Path, dst: Path, *, workers: int = 2, progress: Callable[[int, int], None] = lambda _i, _n: None
) -> AlignReport:
    """``dpa faces align``: a PNG chip for every image of an LFW-layout folder (``src/<identity>/<image>``)
    into the same layout under ``dst``, which must not exist yet. The chips are written to a staging folder
    beside ``dst`` and renamed into place at the end, so ``dst`` is whole or absent."""
    import shutil
    import tempfile

    from dpa.faces.lfw import IMAGE_EXTENSIONS

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise UserError(f"{src} is not a folder of identity folders")
    if dst.exists():
        raise UserError(f"{dst} exists: align into a new folder")
    if not dst.resolve().parent.is_dir():
        raise UserError(f"cannot write {dst}: its parent folder does not exist")
    images = sorted(p for p in src.glob("*/*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                    and not p.name.startswith("."))  # fmt: skip
    if not images:
        raise UserError(f"no images in {src} (expected {src}/<identity>/<image>.jpg)")
    staging = Path(tempfile.mkdtemp(dir=dst.resolve().parent, prefix=f".{dst.name}.staging-"))
    try:
        report = align_images(images, src, staging, workers=workers, progress=progress)
        staging.rename(dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report
