"""Drawing one synthetic face, one function per feature (clothes, hair, ears, skin marks, beard, eyes,
nose, moustache, mouth, glasses), back to front. ``synth`` draws the traits and composes the image."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from dpa.faces.traits import Traits

__all__ = ["draw_face_layer", "rgb"]


def rgb(values: np.ndarray) -> tuple[int, int, int]:
    c = np.clip(np.round(values), 0, 255).astype(int)
    return int(c[0]), int(c[1]), int(c[2])


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


@dataclass(frozen=True)
class _Sketch:
    """One face being drawn: the canvas, the identity's traits, this image's generator, and the
    geometry every feature is placed by (pixels; a frontal pose before the affine)."""

    d: ImageDraw.ImageDraw
    t: Traits
    r: np.random.Generator
    cx: float
    cy: float
    fw: float  # face half-width
    fh: float  # face half-height
    lw: int  # base line width
    yaw: float
    shift: float  # features move towards the side the head turns to (a cheap yaw)

    @property
    def hair(self) -> tuple[int, ...]:
        return self.t.hair_col + (255,)

    @property
    def mouth_y(self) -> float:
        return self.cy + self.fh * self.t.mouth_y

    @property
    def eye_y(self) -> float:
        return self.cy - self.fh * self.t.eye_y

    @property
    def eye_half_w(self) -> float:
        return self.fw * self.t.eye_w

    @property
    def ear_x(self) -> float:
        return self.fw * 0.97


def draw_face_layer(t: Traits, r: np.random.Generator, s: int, yaw: float) -> Image.Image:
    """The head on a transparent canvas, in a canonical frontal pose (before the affine).

    Features are drawn back to front; the order also fixes the order of ``r``'s draws (clothes,
    stubble, eyes, mouth), so an image depends only on (seed, identity, image index)."""
    layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    fw = s * t.face_w
    k = _Sketch(
        ImageDraw.Draw(layer), t, r, s * 0.5, s * 0.5, fw, s * t.face_h, max(1, round(s * 0.012)), yaw, yaw * fw * 0.28
    )
    _clothes(k)
    _long_hair(k)
    _ears(k)
    outline = _superellipse(k.cx, k.cy, k.fw, k.fh, t.face_n, t.jaw_taper)
    k.d.polygon(outline, fill=_shade(t.skin, 1.0))
    _skin_marks(k)
    _beard(k, outline)
    _hair_cap(k)
    _eyes(k)
    _nose(k)
    _moustache(k)
    _mouth(k)
    _glasses(k)
    return layer


def _clothes(k: _Sketch) -> None:
    """Varies per image: people change clothes."""
    shirt = rgb(k.r.uniform(20, 235, 3)) + (255,)
    cx, cy, fw, fh = k.cx, k.cy, k.fw, k.fh
    k.d.ellipse([cx - fw * 2.4, cy + fh * 1.45, cx + fw * 2.4, cy + fh * 3.6], fill=shirt)
    k.d.rectangle([cx - fw * 0.42, cy + fh * 0.5, cx + fw * 0.42, cy + fh * 1.6], fill=_shade(k.t.skin, 0.85))


def _long_hair(k: _Sketch) -> None:
    """Long hair sits behind the head."""
    t = k.t
    if t.hair_style in (2, 5):
        length = t.hair_len if t.hair_style == 2 else 0.45
        k.d.rounded_rectangle(
            [k.cx - k.fw * 1.22, k.cy - k.fh * 1.12, k.cx + k.fw * 1.22, k.cy + k.fh * length],
            radius=k.fw * 0.7,
            fill=k.hair,
        )


def _ears(k: _Sketch) -> None:
    ew, eh = k.fw * 0.15 * k.t.ear_size, k.fh * 0.2 * k.t.ear_size
    for side in (-1, 1):
        x = k.cx + side * k.ear_x - k.yaw * k.fw * 0.1
        k.d.ellipse([x - ew, k.cy - k.fh * 0.05 - eh, x + ew, k.cy - k.fh * 0.05 + eh], fill=_shade(k.t.skin, 0.9))


def _skin_marks(k: _Sketch) -> None:
    """Moles and freckles: fixed per identity, and as telling as a face's shape."""
    for mx, my, mr in k.t.moles:
        x, y, rr = k.cx + mx * k.fw + k.shift, k.cy + my * k.fh, mr * k.fw
        k.d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=_shade(k.t.skin, 0.45))
    for fx, fy in k.t.freckles:
        x, y, rr = k.cx + fx * k.fw + k.shift, k.cy + fy * k.fh, k.fw * 0.018
        k.d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=_shade(k.t.skin, 0.72))


def _beard(k: _Sketch, outline: list[tuple[float, float]]) -> None:
    """Below the mouth line, drawn before the mouth."""
    cx, cy, fw, fh, shift = k.cx, k.cy, k.fw, k.fh, k.shift
    if k.t.beard == 1:
        pts = [(x, y) for x, y in outline if y > cy + fh * 0.2]
        pts.sort(key=lambda p: p[0])
        top = [(x, cy + fh * 0.2 + fh * 0.12 * ((x - cx) / fw) ** 2) for x, _ in pts[::-1]]
        lower = sorted(pts, key=lambda p: p[0])
        k.d.polygon(lower + top, fill=k.hair)
    elif k.t.beard == 2:
        k.d.ellipse([cx + shift - fw * 0.28, k.mouth_y + fh * 0.08, cx + shift + fw * 0.28, cy + fh * 1.0], fill=k.hair)
    elif k.t.beard == 4:
        for _ in range(160):
            x = k.r.uniform(-0.8, 0.8) * fw + cx + shift
            y = k.r.uniform(0.35, 0.9) * fh + cy
            k.d.point((x, y), fill=_shade(k.t.skin, 0.55))


def _hair_cap(k: _Sketch) -> None:
    """The hair over the forehead, with curls or spikes for those styles."""
    t, cx, cy, fw, fh = k.t, k.cx, k.cy, k.fw, k.fh
    if t.hair_style == 0:
        return
    line_h = t.hair_line if t.hair_style != 5 else 0.2
    big = _superellipse(cx, cy, fw * 1.1, fh * 1.12, t.face_n, 0.0)
    upper = sorted([(x, y) for x, y in big if y <= cy], key=lambda p: p[0])

    def hairline(x: float) -> float:
        u = (x - cx) / fw
        return cy - fh * line_h + fh * (t.hair_side * u * u + t.hair_slant * u)

    top = [(x, min(y, hairline(x))) for x, y in upper]
    bottom = [(x, hairline(x)) for x, _ in upper[::-1]]
    k.d.polygon(top + bottom, fill=k.hair)
    if t.hair_style == 3:
        for ang, rad in t.curls:
            x = cx + math.cos(ang + math.pi) * fw * 1.05
            y = cy - math.sin(ang) * fh * 1.02 - fh * 0.05
            rr = rad * fw
            k.d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=k.hair)
    elif t.hair_style == 4:
        for j in range(9):
            u = -0.8 + 1.6 * j / 8
            bx = cx + u * fw
            by = cy - fh * 1.05 * math.sqrt(max(0.0, 1 - u * u * 0.8))
            k.d.polygon(
                [(bx - fw * 0.14, by + fh * 0.1), (bx + fw * 0.14, by + fh * 0.1), (bx + u * fw * 0.1, by - fh * 0.25)],
                fill=k.hair,
            )


def _eyes(k: _Sketch) -> None:
    """Eyes and brows; openness and gaze are expression (drawn per image)."""
    t, r, d = k.t, k.r, k.d
    openness = float(np.clip(r.normal(0.85, 0.25), 0.12, 1.15))
    gaze = r.uniform(-0.35, 0.35)
    eye_y, eye_half_w = k.eye_y, k.eye_half_w
    eye_half_h = eye_half_w * t.eye_h * openness
    brow_raise = r.normal(0.0, 0.25) * eye_half_w
    for side in (-1, 1):
        ex = k.cx + side * k.fw * t.eye_sp + k.shift
        scale = 1.0 - 0.25 * max(0.0, side * -k.yaw)  # the far eye looks smaller
        w, h = eye_half_w * scale, eye_half_h * scale
        d.ellipse([ex - w, eye_y - h, ex + w, eye_y + h], fill=(236, 234, 228, 255))
        ir = min(w * 0.55, h)
        ix = ex + gaze * w
        d.ellipse([ix - ir, eye_y - ir, ix + ir, eye_y + ir], fill=t.eye_col + (255,))
        pr = ir * 0.45
        d.ellipse([ix - pr, eye_y - pr, ix + pr, eye_y + pr], fill=(12, 10, 10, 255))
        d.arc([ex - w, eye_y - h, ex + w, eye_y + h], 180, 360, fill=(40, 25, 20, 255), width=k.lw)
        by = eye_y - eye_half_w * t.eye_h * t.brow_gap - brow_raise
        x0, x1 = ex - side * w * 1.1, ex + side * w * 1.25
        tilt = t.brow_tilt * eye_half_w
        d.line(
            [(x0, by + tilt), (ex, by - eye_half_w * 0.15), (x1, by - tilt * 0.3)],
            fill=_shade(t.hair_col, 0.8),
            width=max(1, round(k.fw * t.brow_th)),
            joint="curve",
        )


def _nose(k: _Sketch) -> None:
    """It projects the most, so it moves the most with yaw."""
    t, d, skin = k.t, k.d, k.t.skin
    nx = k.cx + k.yaw * k.fw * 0.4
    tip_y = k.cy + k.fh * t.nose_len
    nw = k.fw * t.nose_w
    d.line([(nx - nw * 0.3, k.eye_y + k.eye_half_w * 0.4), (nx - nw * 0.1, tip_y)], fill=_shade(skin, 0.78), width=k.lw)
    d.polygon([(nx - nw, tip_y), (nx + nw, tip_y), (nx, tip_y - k.fh * 0.12)], fill=_shade(skin, 0.88))
    for side in (-1, 1):
        x = nx + side * nw * 0.55
        d.ellipse([x - nw * 0.25, tip_y - nw * 0.15, x + nw * 0.25, tip_y + nw * 0.15], fill=_shade(skin, 0.55))


def _moustache(k: _Sketch) -> None:
    if k.t.beard in (1, 3):
        mw0, x, y = k.fw * k.t.mouth_w * 1.15, k.cx + k.shift, k.mouth_y
        k.d.polygon([(x - mw0, y), (x, y - k.fh * 0.1), (x + mw0, y), (x, y - k.fh * 0.03)], fill=k.hair)


def _mouth(k: _Sketch) -> None:
    """Smile curvature, width and openness are expression (drawn per image)."""
    t, r, d, fh = k.t, k.r, k.d, k.fh
    smile = float(np.clip(t.smile_bias + r.normal(0.0, 0.55), -1.0, 1.0))
    mw = k.fw * t.mouth_w * r.uniform(0.85, 1.2)
    open_h = fh * r.uniform(0.03, 0.13) if r.random() < 0.35 else 0.0
    xs = np.linspace(-1.0, 1.0, 17)
    upper_y = k.mouth_y + smile * fh * 0.08 * (1.0 - xs**2)
    upper_pts = list(zip((k.cx + k.shift + xs * mw).tolist(), upper_y.tolist(), strict=True))
    if open_h > 0:
        lower_y = upper_y + open_h * (1.0 - xs**2)
        lower_pts = list(zip((k.cx + k.shift + xs * mw).tolist(), lower_y.tolist(), strict=True))
        d.polygon(upper_pts + lower_pts[::-1], fill=(70, 20, 25, 255))
        d.line(lower_pts, fill=t.lip_col + (255,), width=k.lw * 2, joint="curve")
    d.line(upper_pts, fill=t.lip_col + (255,), width=k.lw * 2, joint="curve")


def _glasses(k: _Sketch) -> None:
    t, d, lw, eye_y = k.t, k.d, k.lw, k.eye_y
    if not t.glasses:
        return
    gw, gh = k.eye_half_w * 1.5, k.eye_half_w * 1.15
    col = t.glass_col + (255,)
    centres = [k.cx + side * k.fw * t.eye_sp + k.shift for side in (-1, 1)]
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
        d.line([(gx + side * gw, eye_y), (k.cx + side * k.ear_x, eye_y - k.fh * 0.02)], fill=col, width=lw)
