"""Procedurally drawn faces: the built-in data set when no real one can be downloaded.

Each identity gets fixed traits (face shape, eye spacing, nose, mouth, brows, hair,
skin and eye colour, background colour family, glasses, beard, moles/freckles). Each
image of that identity then varies pose (shift, rotation, scale, yaw), lighting,
expression, clothing, background clutter, occlusion, blur and sensor noise. The
variation is deliberately strong: same-identity images differ a lot pixel by pixel,
so a linear model on raw pixels does poorly while a small CNN can still pick up the
identity cues. That keeps the split-training experiments meaningful instead of
trivially solved.

The output folder follows the LFW layout (``<Name>/<Name>_0001.jpg``), so the same
loader (:mod:`dpa.faces.lfw`) reads this and the real data set. Everything is
a pure function of :class:`SynthConfig`: the same config gives byte-identical files.

Only numpy and pillow are used: this module runs on the device side.
"""

from __future__ import annotations

import colorsys
import math
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dpa.contract.errors import UserError
from dpa.faces.features import draw_face_layer, rgb
from dpa.faces.traits import Traits

__all__ = [
    "cached_faces",
    "SynthConfig",
    "identity_names",
    "render_face",
    "write_synthetic_faces",
    "JPEG_QUALITY",
]

JPEG_QUALITY = 95
"""High enough that compression artefacts do not dominate the small images."""

_MAX_PER_IDENTITY = 9999  # LFW file names carry a 4-digit index

_FIRST_NAMES = (
    "Abel", "Adina", "Aldo", "Alva", "Amos", "Anika", "Arlo", "Astrid", "Basil", "Bea",
    "Bruno", "Calla", "Cato", "Cora", "Dara", "Dario", "Edda", "Elio", "Enzo", "Esme",
    "Fenna", "Ferris", "Gia", "Gideon", "Hale", "Ines", "Ivo", "Jora", "Kasimir", "Lea",
    "Lorin", "Mara", "Milo", "Nadia", "Nico", "Odile", "Orin", "Pia", "Quill", "Rhea",
    "Rolf", "Sabe", "Soren", "Tala", "Teo", "Una", "Vito", "Wren", "Yara", "Zeno",
)  # fmt: skip
_LAST_NAMES = (
    "Albrecht", "Barlow", "Castell", "Dunmore", "Eskola", "Falkner", "Garnier", "Holm",
    "Ibarra", "Jansen", "Kovacs", "Lindqvist", "Marchetti", "Novak", "Okafor", "Petrov",
    "Quintero", "Rasmussen", "Sorensen", "Tanaka", "Ueda", "Varga", "Wexley", "Yilmaz",
    "Zeller", "Abara", "Brandt", "Corvin", "Delacroix", "Ekberg", "Fontaine", "Grieve",
    "Hartmann", "Iversen", "Jovanovic", "Kessler", "Lozano", "Moreau", "Nakamura", "Oyelaran",
)  # fmt: skip
_MAX_IDENTITIES = len(_FIRST_NAMES) * len(_LAST_NAMES)

# Stream tags keep the random streams of identities, images and names apart.
_TAG_NAMES, _TAG_IDENTITY, _TAG_IMAGE = 1, 2, 3


@dataclass(frozen=True)
class SynthConfig:
    """What to draw; every byte written is a function of these four numbers."""

    identities: int = 10  # classes; 10 keeps a default run small but not trivial
    per_identity: int = 40  # images per class; enough for a 75/25 split to be useful
    size: int = 64  # output side in pixels; the loader resizes to the model's input
    seed: int = 0  # master seed: names, traits and per-image variation derive from it

    def __post_init__(self) -> None:
        for name in ("identities", "per_identity", "size", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserError(f"SynthConfig.{name} must be an int, got {value!r}")
        if not 2 <= self.identities <= _MAX_IDENTITIES:
            raise UserError(f"SynthConfig.identities must be between 2 and {_MAX_IDENTITIES}, got {self.identities}")
        if not 2 <= self.per_identity <= _MAX_PER_IDENTITY:
            raise UserError(
                f"SynthConfig.per_identity must be between 2 and {_MAX_PER_IDENTITY} "
                f"(file names carry a 4-digit index), got {self.per_identity}"
            )
        if self.size < 32:
            raise UserError(f"SynthConfig.size must be >= 32 pixels, got {self.size}")
        if self.seed < 0:
            raise UserError(f"SynthConfig.seed must be >= 0, got {self.seed}")


def _rng(*words: int) -> np.random.Generator:
    """An independent, reproducible stream for one (seed, tag, ...) tuple."""
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


def identity_names(cfg: SynthConfig) -> tuple[str, ...]:
    """Deterministic, distinct LFW-style names (``First_Last``) for the identities."""
    rng = _rng(cfg.seed, _TAG_NAMES)
    picks = rng.choice(_MAX_IDENTITIES, size=cfg.identities, replace=False)
    n_last = len(_LAST_NAMES)
    return tuple(f"{_FIRST_NAMES[p // n_last]}_{_LAST_NAMES[p % n_last]}" for p in picks)


# --------------------------------------------------------------------------- traits


_HAIR_PALETTE = np.array(
    [(25, 20, 18), (60, 40, 28), (105, 70, 40), (200, 165, 100), (150, 65, 30), (150, 150, 150)],
    dtype=float,
)
_EYE_PALETTE = np.array([(70, 45, 25), (40, 28, 20), (60, 110, 160), (80, 120, 70), (120, 100, 60)], dtype=float)


@lru_cache(maxsize=4096)
def _traits(seed: int, identity: int) -> Traits:
    """Draw one identity's traits; cached because every image of it needs them."""
    r = _rng(seed, _TAG_IDENTITY, identity)
    tone = r.uniform(0.0, 1.0)
    light, dark = np.array([241.0, 206.0, 180.0]), np.array([88.0, 56.0, 40.0])
    skin = light * (1 - tone) + dark * tone + r.normal(0, 7, 3)
    hair_col = _HAIR_PALETTE[r.integers(len(_HAIR_PALETTE))] + r.normal(0, 10, 3)
    eye_col = _EYE_PALETTE[r.integers(len(_EYE_PALETTE))] + r.normal(0, 10, 3)
    lip = skin * np.array([0.85, 0.62, 0.62]) + r.normal(0, 6, 3)
    glasses = int(r.choice(4, p=[0.6, 0.15, 0.15, 0.1]))
    beard = int(r.choice(5, p=[0.55, 0.12, 0.1, 0.12, 0.11]))
    n_moles = int(r.choice(4, p=[0.4, 0.3, 0.2, 0.1]))
    moles = tuple(
        (float(r.uniform(-0.6, 0.6)), float(r.uniform(-0.3, 0.7)), float(r.uniform(0.025, 0.05)))
        for _ in range(n_moles)
    )
    freckles: tuple[tuple[float, float], ...] = ()
    if r.random() < 0.2:
        freckles = tuple(
            (float(r.choice([-1, 1]) * r.uniform(0.2, 0.65)), float(r.uniform(0.05, 0.4)))
            for _ in range(int(r.integers(12, 30)))
        )
    curls = tuple((float(r.uniform(0, math.pi)), float(r.uniform(0.12, 0.2))) for _ in range(22))
    return Traits(
        face_w=float(r.uniform(0.18, 0.25)),
        face_h=float(r.uniform(0.25, 0.31)),
        face_n=float(r.uniform(2.0, 3.6)),
        jaw_taper=float(r.uniform(0.0, 0.4)),
        skin=(float(skin[0]), float(skin[1]), float(skin[2])),
        eye_y=float(r.uniform(0.04, 0.2)),
        eye_sp=float(r.uniform(0.34, 0.5)),
        eye_w=float(r.uniform(0.13, 0.2)),
        eye_h=float(r.uniform(0.4, 0.7)),
        eye_col=rgb(eye_col),
        brow_th=float(r.uniform(0.03, 0.09)),
        brow_tilt=float(r.uniform(-0.35, 0.35)),
        brow_gap=float(r.uniform(1.3, 2.2)),
        nose_len=float(r.uniform(0.12, 0.3)),
        nose_w=float(r.uniform(0.09, 0.2)),
        mouth_y=float(r.uniform(0.42, 0.6)),
        mouth_w=float(r.uniform(0.24, 0.45)),
        lip_col=rgb(lip),
        smile_bias=float(r.uniform(-0.4, 0.6)),
        hair_style=int(r.choice(6, p=[0.1, 0.25, 0.2, 0.15, 0.1, 0.2])),
        hair_col=rgb(hair_col),
        hair_line=float(r.uniform(0.35, 0.65)),
        hair_side=float(r.uniform(0.1, 0.7)),
        hair_slant=float(r.uniform(-0.25, 0.25)),
        hair_len=float(r.uniform(0.4, 1.2)),
        bg_hue=float(r.uniform(0.0, 1.0)),
        glasses=glasses,
        glass_col=rgb(r.uniform(10, 200, 3)),
        beard=beard,
        moles=moles,
        freckles=freckles,
        ear_size=float(r.uniform(0.8, 1.25)),
        curls=curls,
    )


# --------------------------------------------------------------------------- drawing


def _affine(layer: Image.Image, angle: float, sx: float, sy: float, tx: float, ty: float) -> Image.Image:
    """Rotate/scale about the centre, then translate; PIL wants the inverse map."""
    s = layer.size[0]
    c0 = s / 2.0
    ca, sa = math.cos(angle), math.sin(angle)
    a, b = ca / sx, sa / sx
    dd, e = -sa / sy, ca / sy
    ox, oy = c0 + tx, c0 + ty
    c = c0 - (a * ox + b * oy)
    f = c0 - (dd * ox + e * oy)
    return layer.transform(layer.size, Image.Transform.AFFINE, (a, b, c, dd, e, f), Image.Resampling.BILINEAR)


def _background(t: Traits, r: np.random.Generator, s: int) -> Image.Image:
    """An identity's colour family, varied per image, with a gradient and clutter."""
    hue = (t.bg_hue + r.normal(0.0, 0.07)) % 1.0
    base = np.array(colorsys.hsv_to_rgb(hue, r.uniform(0.1, 0.6), r.uniform(0.3, 0.95))) * 255
    other = np.array(colorsys.hsv_to_rgb(r.random(), r.uniform(0.0, 0.6), r.uniform(0.2, 1.0))) * 255
    mix = r.uniform(0.0, 0.6)
    ang = r.uniform(0, 2 * math.pi)
    small = 16
    yy, xx = np.mgrid[0:small, 0:small] / (small - 1) - 0.5
    ramp = np.clip(0.5 + (xx * math.cos(ang) + yy * math.sin(ang)), 0, 1)[..., None] * mix
    grad = base * (1 - ramp) + other * ramp
    bg = Image.fromarray(np.clip(grad, 0, 255).astype(np.uint8), "RGB").resize((s, s), Image.Resampling.BILINEAR)
    d = ImageDraw.Draw(bg)
    for _ in range(int(r.integers(1, 6))):
        m = r.uniform(0.2, 0.7)
        col = rgb(base * (1 - m) + r.uniform(0, 255, 3) * m)
        x0, y0 = r.uniform(-0.2, 1.0, 2) * s
        w, h = r.uniform(0.1, 0.5, 2) * s
        if r.random() < 0.5:
            d.ellipse([x0, y0, x0 + w, y0 + h], fill=col)
        else:
            d.rectangle([x0, y0, x0 + w, y0 + h], fill=col)
    return bg


def _occlude(img: Image.Image, r: np.random.Generator, s: int) -> None:
    """Sometimes cover part of the face: a bar, a patch or a hand-like blob."""
    if r.random() >= 0.35:
        return
    d = ImageDraw.Draw(img)
    kind = int(r.integers(3))
    col = rgb(r.uniform(0, 255, 3))
    if kind == 0:
        cx, cy = r.uniform(0.25, 0.75, 2) * s
        ang = r.uniform(0, math.pi)
        half = s * r.uniform(0.25, 0.6)
        dx, dy = math.cos(ang) * half, math.sin(ang) * half
        d.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=col, width=max(2, round(s * r.uniform(0.05, 0.13))))
    elif kind == 1:
        x0, y0 = r.uniform(0.15, 0.7, 2) * s
        w, h = r.uniform(0.15, 0.35, 2) * s
        d.rectangle([x0, y0, x0 + w, y0 + h], fill=col)
    else:
        tone = r.uniform(0, 1)
        hand = rgb(np.array([235.0, 200.0, 175.0]) * (1 - tone) + np.array([95.0, 62.0, 45.0]) * tone)
        px, py = r.uniform(0.3, 0.7) * s, r.uniform(0.55, 0.85) * s
        pw, ph = s * 0.13, s * 0.11
        d.ellipse([px - pw, py - ph, px + pw, py + ph], fill=hand)
        for k in range(4):
            fx = px - pw * 0.75 + k * pw * 0.5
            d.line(
                [(fx, py - ph * 0.5), (fx + r.normal(0, pw * 0.1), py - ph * 2.2)],
                fill=hand,
                width=max(2, round(pw * 0.38)),
            )


def _supersample(size: int) -> int:
    """Draw at 2-4x so that thin strokes come out antialiased after the downsample."""
    return int(min(4, max(2, math.ceil(192 / size))))


def render_face(identity: int, image_index: int, cfg: SynthConfig) -> np.ndarray:
    """Draw image ``image_index`` of ``identity``: uint8 (size, size, 3), deterministic."""
    if not 0 <= identity < cfg.identities:
        raise UserError(f"identity must be in [0, {cfg.identities}), got {identity}")
    if image_index < 0:
        raise UserError(f"image_index must be >= 0, got {image_index}")
    t = _traits(cfg.seed, identity)
    r = _rng(cfg.seed, _TAG_IMAGE, identity, image_index)
    ss = _supersample(cfg.size)
    s = cfg.size * ss

    yaw = float(r.uniform(-1.0, 1.0))
    face = draw_face_layer(t, r, s, yaw)
    scale = r.uniform(0.78, 1.12)
    angle = math.radians(float(np.clip(r.normal(0.0, 10.0), -22.0, 22.0)))
    tx, ty = r.uniform(-0.12, 0.12, 2) * s
    face = _affine(face, angle, scale * (1.0 - 0.22 * abs(yaw)), scale, tx, ty)
    img = _background(t, r, s)
    img.paste(face, (0, 0), face)
    _occlude(img, r, s)
    img = img.reduce(ss)

    # lighting: a directional gradient, brightness, contrast, white balance, gamma
    px = np.asarray(img, dtype=np.float32) / 255.0
    n = cfg.size
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / (n - 1) - 0.5
    ang = r.uniform(0, 2 * math.pi)
    gain = 1.0 + r.uniform(0.15, 0.7) * 2.0 * (xx * math.cos(ang) + yy * math.sin(ang))
    px = px * np.clip(gain, 0.2, None)[..., None]
    px = (px - px.mean()) * r.uniform(0.6, 1.35) + px.mean()
    px = px * r.uniform(0.65, 1.3) * np.exp(r.normal(0.0, 0.08, 3)).astype(np.float32)
    px = np.clip(px, 0.0, 1.0) ** r.uniform(0.8, 1.25)
    img = Image.fromarray(np.round(px * 255).astype(np.uint8), "RGB")

    radius = r.uniform(0.0, 0.9) * n / 64
    if radius > 0.1:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    out = np.asarray(img, dtype=np.float32) + r.normal(0.0, r.uniform(2.0, 12.0), (n, n, 3))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- writing


def _stage_dir(out_dir: Path) -> Path:
    stage = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    stage.chmod(0o755)  # mkdtemp makes it private; the data set is ordinary files
    return stage


#: Data sets at least this large are drawn on every core: a face takes about 4 ms, a worker 1 s to start.
_PARALLEL_IMAGES = 500


def _write_identity(
    identity: int, name: str, stage: Path, cfg: SynthConfig, progress: Callable[[int], None] | None = None
) -> int:
    """Draw and write every image of one identity into ``stage/name``; how many."""
    folder = stage / name
    folder.mkdir()
    for k in range(cfg.per_identity):
        pixels = render_face(identity, k, cfg)
        Image.fromarray(pixels, "RGB").save(folder / f"{name}_{k + 1:04d}.jpg", format="JPEG", quality=JPEG_QUALITY)
        if progress is not None:
            progress(k + 1)
    return cfg.per_identity


def _report_image(progress: Callable[[int, int], None], base: int, total: int, k: int) -> None:
    progress(base + k, total)


def _write_in_processes(
    jobs: list[tuple[int, str, Path, SynthConfig]],
    workers: int,
    total: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    """``_write_identity`` for every job on ``workers`` spawned processes (not forked: the caller may hold
    threads, onnxruntime's or torch's, that a fork would copy mid-operation)."""
    done = 0
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for count in pool.map(_write_identity, *zip(*jobs, strict=True)):
            done += count
            if progress is not None:
                progress(done, total)


def cached_faces(parent: Path, cfg: SynthConfig) -> Path:
    """The built-in faces of ``cfg`` in a folder under ``parent`` named for the configuration
    (``synthetic-<identities>x<per identity>-<size>px-s<seed>``): drawn the first time, reused after."""
    root = Path(parent) / f"synthetic-{cfg.identities}x{cfg.per_identity}-{cfg.size}px-s{cfg.seed}"
    if not root.is_dir():
        write_synthetic_faces(root, cfg)
    return root


def write_synthetic_faces(
    out_dir: Path,
    cfg: SynthConfig,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the LFW layout under ``out_dir`` atomically and return ``out_dir``.

    Images are built in a hidden temporary folder next to ``out_dir`` and renamed into
    place at the end, so a crash or an exception leaves no half-written data set. An
    existing empty ``out_dir`` is replaced; a non-empty one is refused rather than
    mixed with foreign files.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(f"output path {out_dir} exists and is not a folder")
        if any(out_dir.iterdir()):
            raise UserError(f"output folder {out_dir} is not empty; refusing to write faces into it")
    created: list[Path] = []
    parent = out_dir.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = _stage_dir(out_dir)
    try:
        names = identity_names(cfg)
        total = cfg.identities * cfg.per_identity
        workers = min(os.cpu_count() or 1, cfg.identities) if total >= _PARALLEL_IMAGES else 1
        jobs = [(identity, name, stage, cfg) for identity, name in enumerate(names)]
        parallel = False
        if workers > 1:
            try:
                _write_in_processes(jobs, workers, total, progress)
                parallel = True
            except BrokenProcessPool:  # e.g. a caller read from stdin, which spawned workers cannot re-import
                for folder in list(stage.iterdir()):
                    shutil.rmtree(folder)
        if not parallel:
            for index, job in enumerate(jobs):
                base = index * cfg.per_identity
                report = None if progress is None else partial(_report_image, progress, base, total)
                _write_identity(*job, progress=report)
        os.replace(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for p in created:  # innermost first
            try:
                p.rmdir()
            except OSError:
                break
        raise
    return out_dir
