"""One synthetic identity's fixed traits: what ``synth`` draws per identity and ``features`` paints.

Its own module so that the painter and the generator both import it and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Traits"]


@dataclass(frozen=True)
class Traits:
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
