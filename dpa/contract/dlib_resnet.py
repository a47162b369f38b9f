"""dlib's face ResNet: its stages and the arithmetic of cutting it (torch-free).

The network of ``dlib_face_recognition_resnet_model_v1.dat`` (``face-recognition-models`` on PyPI, CC0;
dlib's ``dnn_face_recognition_ex.cpp`` defines it): a 150x150 aligned RGB chip, a 7x7/2 convolution with a
per-channel affine and ReLU, a 3x3/2 max-pool, then 14 residual units (two 3x3 convolutions, each followed
by a per-channel affine, the first by a ReLU; a downsampling unit strides its first convolution by 2 and
average-pools its shortcut 2x2/2), a global average pool and a 128-d linear embedding without bias.

Cuts are the stage boundaries: ``stem``, ``res1`` .. ``res14``, ``pool`` (the 256-d average) and
``embedding`` (the 128-d descriptor dlib compares by Euclidean distance). The server's tail is the rest of
the network and a linear classifier over the device's identities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpa.contract.errors import UserError

__all__ = ["NAME", "IMAGE_SIZE", "PIXEL_MEAN", "PIXEL_STD", "UNITS", "DlibStage", "stages", "stage_cut", "cut_names"]

NAME = "dlib-resnet"
#: dlib's chip side (``input_rgb_image_sized<150>``).
IMAGE_SIZE = 150
#: ``input_rgb_image``'s means (RGB, 0..255) as the .dat file stores them; pixels are (p - mean) / 256.
PIXEL_MEAN = (122.78199768066406, 117.00099945068359, 104.2979965209961)
PIXEL_STD = (256.0, 256.0, 256.0)
#: (output channels, downsamples) of each residual unit, in forward order (dlib's alevel4 .. alevel0).
UNITS: tuple[tuple[int, bool], ...] = (
    ((32, False),) * 3 + ((64, True),) + ((64, False),) * 3 + ((128, True),) + ((128, False),) * 2
    + ((256, True),) + ((256, False),) * 2 + ((256, True),)
)  # fmt: skip
#: The stem's width and the embedding's.
STEM_CHANNELS, EMBEDDING_DIMS = 32, 128


@dataclass(frozen=True)
class DlibStage:
    name: str
    kind: str  # "stem", "unit", "pool", "embedding"
    out_shape: tuple[int, ...]  # per example
    channels: int = 0  # a unit's output channels
    down: bool = False  # a unit that strides by 2
    flops: int = 0  # multiply-adds x 2, per example, forward (convolutions and the fc)
    params: int = 0


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def stages() -> list[DlibStage]:
    """Every stage in forward order with its per-example output shape. dlib adds a unit's two branches with
    ``add_prev``, which zero-pads the smaller to the larger in every dimension: at res11 the strided branch
    is 3x3 and the pooled shortcut 4x4, so the unit's output is 4x4."""
    s = _conv_out(IMAGE_SIZE, 7, 2, 0)
    c = STEM_CHANNELS
    out = [DlibStage("stem", "stem", (c, _conv_out(s, 3, 2, 0), _conv_out(s, 3, 2, 0)),
                     flops=2 * 3 * c * 49 * s * s, params=3 * c * 49 + 3 * c)]  # fmt: skip
    s = _conv_out(s, 3, 2, 0)
    for i, (oc, down) in enumerate(UNITS, start=1):
        branch = _conv_out(s, 3, 2, 0) if down else s
        shortcut = _conv_out(s, 2, 2, 0) if down else s
        flops = 2 * 9 * (c * oc + oc * oc) * branch * branch
        params = 9 * (c * oc + oc * oc) + 2 * oc + 4 * oc
        s, c = max(branch, shortcut), oc
        out.append(DlibStage(f"res{i}", "unit", (c, s, s), channels=oc, down=down, flops=flops, params=params))
    out.append(DlibStage("pool", "pool", (c,)))
    out.append(DlibStage("embedding", "embedding", (EMBEDDING_DIMS,), flops=2 * c * EMBEDDING_DIMS,
                         params=c * EMBEDDING_DIMS))  # fmt: skip
    return out


def cut_names() -> list[str]:
    return [s.name for s in stages()]


def stage_cut(cut: str) -> tuple[list[DlibStage], list[DlibStage]]:
    """The head's stages (up to and including ``cut``) and the tail's."""
    names = cut_names()
    if cut not in names:
        raise UserError(f"unknown cut {cut!r} for {NAME}; valid cuts: {', '.join(names)}")
    i = names.index(cut) + 1
    all_stages = stages()
    return all_stages[:i], all_stages[i:]


def activation_numel(cut: str) -> int:
    return math.prod(stage_cut(cut)[0][-1].out_shape)
