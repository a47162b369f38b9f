"""dlib's 150x150 face chips as its network reads them, without torch: the device's cost benchmark times them
in a process of its own, whose memory must be the device's alone (importing the torch twin would add torch's).
"""

from __future__ import annotations

import numpy as np

from dpa.contract import dlib_resnet as layout

__all__ = ["rendered_chips", "preprocess_chips"]


def rendered_chips(count: int) -> np.ndarray:
    """(count, 150, 150, 3) uint8 faces drawn by ``dpa.faces.synth``: not photographs, but any image
    exercises every tensor and every timing."""
    from dpa.faces.synth import SynthConfig, render_face

    cfg = SynthConfig(identities=max(2, count), size=layout.IMAGE_SIZE)
    return np.stack([render_face(i, 0, cfg) for i in range(count)]).astype(np.uint8)


def preprocess_chips(chips: np.ndarray) -> np.ndarray:
    """(N, 150, 150, 3) uint8 chips -> (N, 3, 150, 150) float32, as dlib's input layer: (p - mean) / 256."""
    x = (chips.astype(np.float32) - np.array(layout.PIXEL_MEAN, dtype=np.float32)) / np.float32(layout.PIXEL_STD[0])
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
