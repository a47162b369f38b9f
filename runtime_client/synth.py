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
loader (:mod:`runtime_client.faces`) reads this and the real data set. Everything is
a pure function of :class:`SynthConfig`: the same config gives byte-identical files.

Only numpy and pillow are used: this module runs on the device side.
"""

from __future__ import annotations

import colorsys
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
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
                raise ValueError(f"SynthConfig.{name} must be an int, got {value!r}")
        if not 2 <= self.identities <= _MAX_IDENTITIES:
            raise ValueError(f"SynthConfig.identities must be between 2 and {_MAX_IDENTITIES}, got {self.identities}")
        if not 2 <= self.per_identity <= _MAX_PER_IDENTITY:
            raise ValueError(
                f"SynthConfig.per_identity must be between 2 and {_MAX_PER_IDENTITY} "
                f"(file names carry a 4-digit index), got {self.per_identity}"
            )
        if self.size < 32:
            raise ValueError(f"SynthConfig.size must be >= 32 pixels, got {self.size}")
        if self.seed < 0:
            raise ValueError(f"SynthConfig.seed must be >= 0, got {self.seed}")


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


@dataclass(frozen=True)
class _Traits:
    """Fixed per identity; everything in units of the face half-width/height."""

    face_w: float
    face_h: float
    face_n: float  # superellipse exponent: 2 = oval, larger = squarer
    jaw_taper: float
    skin: tuple[float, float, float]
    eye_y: float
    eye_sp: float
    eye_w: float
    eye_h: float
    eye_col: tuple[int, int, int]
    brow_th: float
    brow_tilt: float
    brow_gap: float
    nose_len: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lip_col: tuple[int, int, int]
    smile_bias: float
    hair_style: int  # 0 bald, 1 short, 2 long, 3 curly, 4 spiky, 5 bob with fringe
    hair_col: tuple[int, int, int]
    hair_line: float
    hair_side: float
    hair_slant: float
    hair_len: float
    bg_hue: float
    glasses: int  # 0 none, 1 round, 2 rectangular, 3 sunglasses
    glass_col: tuple[int, int, int]
    beard: int  # 0 none, 1 full, 2 goatee, 3 moustache, 4 stubble
    moles: tuple[tuple[float, float, float], ...]
    freckles: tuple[tuple[float, float], ...]
    ear_size: float
    curls: tuple[tuple[float, float], ...]


_HAIR_PALETTE = np.array(
    [(25, 20, 18), (60, 40, 28), (105, 70, 40), (200, 165, 100), (150, 65, 30), (150, 150, 150)],
    dtype=float,
)
_EYE_PALETTE = np.array([(70, 45, 25), (40, 28, 20), (60, 110, 160), (80, 120, 70), (120, 100, 60)], dtype=float)


def _col(values: np.ndarray) -> tuple[int, int, int]:
    c = np.clip(np.round(values), 0, 255).astype(int)
    return int(c[0]), int(c[1]), int(c[2])


@lru_cache(maxsize=4096)
def _traits(seed: int, identity: int) -> _Traits:
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
    return _Traits(
        face_w=float(r.uniform(0.18, 0.25)),
        face_h=float(r.uniform(0.25, 0.31)),
        face_n=float(r.uniform(2.0, 3.6)),
        jaw_taper=float(r.uniform(0.0, 0.4)),
        skin=(float(skin[0]), float(skin[1]), float(skin[2])),
        eye_y=float(r.uniform(0.04, 0.2)),
        eye_sp=float(r.uniform(0.34, 0.5)),
        eye_w=float(r.uniform(0.13, 0.2)),
        eye_h=float(r.uniform(0.4, 0.7)),
        eye_col=_col(eye_col),
        brow_th=float(r.uniform(0.03, 0.09)),
        brow_tilt=float(r.uniform(-0.35, 0.35)),
        brow_gap=float(r.uniform(1.3, 2.2)),
        nose_len=float(r.uniform(0.12, 0.3)),
        nose_w=float(r.uniform(0.09, 0.2)),
        mouth_y=float(r.uniform(0.42, 0.6)),
        mouth_w=float(r.uniform(0.24, 0.45)),
        lip_col=_col(lip),
        smile_bias=float(r.uniform(-0.4, 0.6)),
        hair_style=int(r.choice(6, p=[0.1, 0.25, 0.2, 0.15, 0.1, 0.2])),
        hair_col=_col(hair_col),
        hair_line=float(r.uniform(0.35, 0.65)),
        hair_side=float(r.uniform(0.1, 0.7)),
        hair_slant=float(r.uniform(-0.25, 0.25)),
        hair_len=float(r.uniform(0.4, 1.2)),
        bg_hue=float(r.uniform(0.0, 1.0)),
        glasses=glasses,
        glass_col=_col(r.uniform(10, 200, 3)),
        beard=beard,
        moles=moles,
        freckles=freckles,
        ear_size=float(r.uniform(0.8, 1.25)),
        curls=curls,
    )


# --------------------------------------------------------------------------- drawing


def _superellipse(
    cx: float, cy: float, w: float, h: float, n: float, taper: float, steps: int = 72
) -> list[tuple[float, float]]:
    """Face outline: a superellipse whose lower half narrows towards the chin."""
    t = np.linspace(0.0, 2.0 * math.pi, steps, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    x = np.sign(c) * np.abs(c) ** (2.0 / n)
    y = np.sign(s) * np.abs(s) ** (2.0 / n)
    x = np.where(y > 0, x * (1.0 - taper * np.clip(y, 0, 1) ** 1.5), x)
    return list(zip((cx + w * x).tolist(), (cy + h * y).tolist(), strict=True))


def _shade(col: tuple[float, float, float] | tuple[int, int, int], k: float) -> tuple[int, ...]:
    return tuple(int(max(0, min(255, round(v * k)))) for v in col) + (255,)


def _draw_face_layer(t: _Traits, r: np.random.Generator, s: int, yaw: float) -> Image.Image:
    """The head on a transparent canvas, in a canonical frontal pose (before the affine)."""
    layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    cx, cy = s * 0.5, s * 0.5
    fw, fh = s * t.face_w, s * t.face_h
    skin = t.skin
    hair = t.hair_col + (255,)
    lw = max(1, round(s * 0.012))  # base line width

    # clothing (varies per image: people change clothes)
    shirt = _col(r.uniform(20, 235, 3)) + (255,)
    d.ellipse([cx - fw * 2.4, cy + fh * 1.45, cx + fw * 2.4, cy + fh * 3.6], fill=shirt)
    d.rectangle([cx - fw * 0.42, cy + fh * 0.5, cx + fw * 0.42, cy + fh * 1.6], fill=_shade(skin, 0.85))

    # long hair sits behind the head
    if t.hair_style in (2, 5):
        length = t.hair_len if t.hair_style == 2 else 0.45
        d.rounded_rectangle(
            [cx - fw * 1.22, cy - fh * 1.12, cx + fw * 1.22, cy + fh * length],
            radius=fw * 0.7,
            fill=hair,
        )

    # ears
    ew, eh = fw * 0.15 * t.ear_size, fh * 0.2 * t.ear_size
    ear_x = fw * 0.97
    for side in (-1, 1):
        x = cx + side * ear_x - yaw * fw * 0.1
        d.ellipse([x - ew, cy - fh * 0.05 - eh, x + ew, cy - fh * 0.05 + eh], fill=_shade(skin, 0.9))

    outline = _superellipse(cx, cy, fw, fh, t.face_n, t.jaw_taper)
    d.polygon(outline, fill=_shade(skin, 1.0))

    # features shift towards the side the head turns to (a cheap yaw)
    shift = yaw * fw * 0.28

    for mx, my, mr in t.moles:
        x, y, rr = cx + mx * fw + shift, cy + my * fh, mr * fw
        d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=_shade(skin, 0.45))
    for fx, fy in t.freckles:
        x, y, rr = cx + fx * fw + shift, cy + fy * fh, fw * 0.018
        d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=_shade(skin, 0.72))

    # beard below the mouth line, drawn before the mouth
    mouth_y = cy + fh * t.mouth_y
    if t.beard == 1:
        pts = [(x, y) for x, y in outline if y > cy + fh * 0.2]
        pts.sort(key=lambda p: p[0])
        top = [(x, cy + fh * 0.2 + fh * 0.12 * ((x - cx) / fw) ** 2) for x, _ in pts[::-1]]
        lower = sorted(pts, key=lambda p: p[0])
        d.polygon(lower + top, fill=hair)
    elif t.beard == 2:
        d.ellipse([cx + shift - fw * 0.28, mouth_y + fh * 0.08, cx + shift + fw * 0.28, cy + fh * 1.0], fill=hair)
    elif t.beard == 4:
        for _ in range(160):
            x = r.uniform(-0.8, 0.8) * fw + cx + shift
            y = r.uniform(0.35, 0.9) * fh + cy
            d.point((x, y), fill=_shade(skin, 0.55))

    # hair cap over the forehead
    if t.hair_style != 0:
        line_h = t.hair_line if t.hair_style != 5 else 0.2
        big = _superellipse(cx, cy, fw * 1.1, fh * 1.12, t.face_n, 0.0)
        upper = sorted([(x, y) for x, y in big if y <= cy], key=lambda p: p[0])

        def hairline(x: float) -> float:
            u = (x - cx) / fw
            return cy - fh * line_h + fh * (t.hair_side * u * u + t.hair_slant * u)

        top = [(x, min(y, hairline(x))) for x, y in upper]
        bottom = [(x, hairline(x)) for x, _ in upper[::-1]]
        d.polygon(top + bottom, fill=hair)
        if t.hair_style == 3:
            for ang, rad in t.curls:
                x = cx + math.cos(ang + math.pi) * fw * 1.05
                y = cy - math.sin(ang) * fh * 1.02 - fh * 0.05
                rr = rad * fw
                d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=hair)
        elif t.hair_style == 4:
            for k in range(9):
                u = -0.8 + 1.6 * k / 8
                bx = cx + u * fw
                by = cy - fh * 1.05 * math.sqrt(max(0.0, 1 - u * u * 0.8))
                d.polygon(
                    [
                        (bx - fw * 0.14, by + fh * 0.1),
                        (bx + fw * 0.14, by + fh * 0.1),
                        (bx + u * fw * 0.1, by - fh * 0.25),
                    ],
                    fill=hair,
                )

    # eyes: openness and gaze are expression
    openness = float(np.clip(r.normal(0.85, 0.25), 0.12, 1.15))
    gaze = r.uniform(-0.35, 0.35)
    eye_y = cy - fh * t.eye_y
    eye_half_w = fw * t.eye_w
    eye_half_h = eye_half_w * t.eye_h * openness
    brow_raise = r.normal(0.0, 0.25) * eye_half_w
    for side in (-1, 1):
        ex = cx + side * fw * t.eye_sp + shift
        scale = 1.0 - 0.25 * max(0.0, side * -yaw)  # the far eye looks smaller
        w, h = eye_half_w * scale, eye_half_h * scale
        d.ellipse([ex - w, eye_y - h, ex + w, eye_y + h], fill=(236, 234, 228, 255))
        ir = min(w * 0.55, h)
        ix = ex + gaze * w
        d.ellipse([ix - ir, eye_y - ir, ix + ir, eye_y + ir], fill=t.eye_col + (255,))
        pr = ir * 0.45
        d.ellipse([ix - pr, eye_y - pr, ix + pr, eye_y + pr], fill=(12, 10, 10, 255))
        d.arc([ex - w, eye_y - h, ex + w, eye_y + h], 180, 360, fill=(40, 25, 20, 255), width=lw)
        # brows
        by = eye_y - eye_half_w * t.eye_h * t.brow_gap - brow_raise
        x0, x1 = ex - side * w * 1.1, ex + side * w * 1.25
        tilt = t.brow_tilt * eye_half_w
        d.line(
            [(x0, by + tilt), (ex, by - eye_half_w * 0.15), (x1, by - tilt * 0.3)],
            fill=_shade(t.hair_col, 0.8),
            width=max(1, round(fw * t.brow_th)),
            joint="curve",
        )

    # nose: projects the most, so it moves the most with yaw
    nx = cx + yaw * fw * 0.4
    tip_y = cy + fh * t.nose_len
    nw = fw * t.nose_w
    d.line([(nx - nw * 0.3, eye_y + eye_half_w * 0.4), (nx - nw * 0.1, tip_y)], fill=_shade(skin, 0.78), width=lw)
    d.polygon([(nx - nw, tip_y), (nx + nw, tip_y), (nx, tip_y - fh * 0.12)], fill=_shade(skin, 0.88))
    for side in (-1, 1):
        x = nx + side * nw * 0.55
        d.ellipse([x - nw * 0.25, tip_y - nw * 0.15, x + nw * 0.25, tip_y + nw * 0.15], fill=_shade(skin, 0.55))

    # moustache above the mouth
    if t.beard in (1, 3):
        mw0 = fw * t.mouth_w * 1.15
        d.polygon(
            [
                (cx + shift - mw0, mouth_y),
                (cx + shift, mouth_y - fh * 0.1),
                (cx + shift + mw0, mouth_y),
                (cx + shift, mouth_y - fh * 0.03),
            ],
            fill=hair,
        )

    # mouth: smile curvature, width and openness are expression
    smile = float(np.clip(t.smile_bias + r.normal(0.0, 0.55), -1.0, 1.0))
    mw = fw * t.mouth_w * r.uniform(0.85, 1.2)
    open_h = fh * r.uniform(0.03, 0.13) if r.random() < 0.35 else 0.0
    xs = np.linspace(-1.0, 1.0, 17)
    upper_y = mouth_y + smile * fh * 0.08 * (1.0 - xs**2)
    upper_pts = list(zip((cx + shift + xs * mw).tolist(), upper_y.tolist(), strict=True))
    if open_h > 0:
        lower_y = upper_y + open_h * (1.0 - xs**2)
        lower_pts = list(zip((cx + shift + xs * mw).tolist(), lower_y.tolist(), strict=True))
        d.polygon(upper_pts + lower_pts[::-1], fill=(70, 20, 25, 255))
        d.line(lower_pts, fill=t.lip_col + (255,), width=lw * 2, joint="curve")
    d.line(upper_pts, fill=t.lip_col + (255,), width=lw * 2, joint="curve")

    # glasses
    if t.glasses:
        gw, gh = eye_half_w * 1.5, eye_half_w * 1.15
        col = t.glass_col + (255,)
        centres = [cx + side * fw * t.eye_sp + shift for side in (-1, 1)]
        for gx in centres:
            box = [gx - gw, eye_y - gh, gx + gw, eye_y + gh]
            if t.glasses == 1:
                d.ellipse(box, outline=col, width=lw * 2)
            elif t.glasses == 2:
                d.rectangle(box, outline=col, width=lw * 2)
            else:
                d.rounded_rectangle(box, radius=gh * 0.5, fill=(20, 20, 25, 255), outline=col, width=lw)
        d.line([(centres[0] + gw, eye_y), (centres[1] - gw, eye_y)], fill=col, width=lw * 2)
        for side, gx in zip((-1, 1), centres, strict=True):
            d.line([(gx + side * gw, eye_y), (cx + side * ear_x, eye_y - fh * 0.02)], fill=col, width=lw)
    return layer


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


def _background(t: _Traits, r: np.random.Generator, s: int) -> Image.Image:
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
        col = _col(base * (1 - m) + r.uniform(0, 255, 3) * m)
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
    col = _col(r.uniform(0, 255, 3))
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
        hand = _col(np.array([235.0, 200.0, 175.0]) * (1 - tone) + np.array([95.0, 62.0, 45.0]) * tone)
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
        raise ValueError(f"identity must be in [0, {cfg.identities}), got {identity}")
    if image_index < 0:
        raise ValueError(f"image_index must be >= 0, got {image_index}")
    t = _traits(cfg.seed, identity)
    r = _rng(cfg.seed, _TAG_IMAGE, identity, image_index)
    ss = _supersample(cfg.size)
    s = cfg.size * ss

    yaw = float(r.uniform(-1.0, 1.0))
    face = _draw_face_layer(t, r, s, yaw)
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
            raise ValueError(f"output path {out_dir} exists and is not a folder")
        if any(out_dir.iterdir()):
            raise ValueError(f"output folder {out_dir} is not empty; refusing to write faces into it")
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
        done = 0
        for identity, name in enumerate(names):
            folder = stage / name
            folder.mkdir()
            for k in range(cfg.per_identity):
                pixels = render_face(identity, k, cfg)
                Image.fromarray(pixels, "RGB").save(
                    folder / f"{name}_{k + 1:04d}.jpg", format="JPEG", quality=JPEG_QUALITY
                )
                done += 1
                if progress is not None:
                    progress(done, total)
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
