"""VGG-Face layer table and the arithmetic of cutting it (torch-free).

This is the one place that knows VGG-Face's layers. The exporter builds torch
modules from it; ``dpa export --list-cuts``, the manifest and the client read
shapes, FLOPs and parameter counts from it without importing torch.

VGG-Face (Parkhi, Vedaldi and Zisserman, BMVC 2015) is VGG-16 configuration D:
thirteen 3x3 convolutions with ReLU in five blocks, each block closed by a 2x2
max-pool, then fc6/fc7 (4096, ReLU, dropout) and fc8 (one logit per identity).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from dpa.contract.errors import UserError

__all__ = [
    "ArchConfig",
    "Layer",
    "LayerKind",
    "CutInfo",
    "layers",
    "cut_names",
    "cut_info",
    "all_cuts",
    "validate_cut",
]

#: Convolution widths of VGG-16 configuration D, block by block.
_BLOCKS: tuple[tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
#: Width of fc6 and fc7 as published.
_FC_WIDTH = 4096
#: Every max-pool halves the side; five of them make the input a multiple of 32.
IMAGE_SIZE_MULTIPLE = 32


class LayerKind(StrEnum):
    CONV = "conv"  # 3x3 convolution, padding 1, followed by ReLU (the ReLU belongs to the layer)
    POOL = "pool"  # 2x2 max-pool, stride 2
    FC = "fc"  # fully connected; fc6/fc7 followed by ReLU (+ dropout in the tail), fc8 is the classifier


@dataclass(frozen=True)
class ArchConfig:
    """What defines one VGG-Face instance. Validated on construction."""

    image_size: int = 224  # input side in pixels; published VGG-Face uses 224
    width: float = 1.0  # channel multiplier; 0.25 makes a CPU-sized network
    num_classes: int = 2622  # identities of the VGG-Face data set
    dropout: float = 0.5  # after fc6 and fc7, as published; 0 makes training deterministic

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.image_size % IMAGE_SIZE_MULTIPLE:
            raise UserError(f"image size must be a positive multiple of {IMAGE_SIZE_MULTIPLE}, got {self.image_size}")
        if not 0 < self.width <= 4:
            raise UserError(f"width must be in (0, 4], got {self.width}")
        if self.num_classes < 2:
            raise UserError(f"num_classes must be at least 2, got {self.num_classes}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")

    def channels(self, published: int) -> int:
        """Scaled channel count; never below 1."""
        return max(1, int(round(published * self.width)))


@dataclass(frozen=True)
class Layer:
    name: str
    kind: LayerKind
    in_shape: tuple[int, ...]  # per example, (C, H, W) or (features,)
    out_shape: tuple[int, ...]
    params: int  # weights + biases
    flops: int  # multiply-adds x 2, per example, forward


def layers(cfg: ArchConfig) -> list[Layer]:
    """All layers in order, with their per-example shapes and costs."""
    out: list[Layer] = []
    c, s = 3, cfg.image_size
    for b, (published, n) in enumerate(_BLOCKS, start=1):
        oc = cfg.channels(published)
        for i in range(1, n + 1):
            params = c * oc * 9 + oc
            flops = 2 * c * oc * 9 * s * s
            out.append(Layer(f"conv{b}_{i}", LayerKind.CONV, (c, s, s), (oc, s, s), params, flops))
            c = oc
        out.append(Layer(f"pool{b}", LayerKind.POOL, (c, s, s), (c, s // 2, s // 2), 0, c * s * s))
        s //= 2
    features = c * s * s
    fc = cfg.channels(_FC_WIDTH)
    for name, width in (("fc6", fc), ("fc7", fc), ("fc8", cfg.num_classes)):
        out.append(Layer(name, LayerKind.FC, (features,), (width,), features * width + width, 2 * features * width))
        features = width
    return out


def cut_names() -> list[str]:
    """Names a user may cut after (fc8 is the classifier, so it is never a cut)."""
    return [layer.name for layer in layers(ArchConfig(image_size=32, width=0.25, num_classes=2)) if layer.name != "fc8"]


def validate_cut(cut: str) -> str:
    valid = cut_names()
    if cut not in valid:
        raise UserError(f"unknown cut {cut!r}; valid cuts: {', '.join(valid)}")
    return cut


@dataclass(frozen=True)
class CutInfo:
    """What a user needs to choose a cut."""

    cut: str
    activation_shape: tuple[int, ...]  # per example
    bytes_per_example: int  # float32 activations on the wire
    head_flops_share: float  # fraction of forward FLOPs run on the device
    head_params_share: float  # fraction of parameters held on the device
    head_layers: tuple[str, ...]
    tail_layers: tuple[str, ...]


def cut_info(cfg: ArchConfig, cut: str) -> CutInfo:
    validate_cut(cut)
    all_layers = layers(cfg)
    idx = next(i for i, layer in enumerate(all_layers) if layer.name == cut)
    head, tail = all_layers[: idx + 1], all_layers[idx + 1 :]
    shape = head[-1].out_shape
    n = 1
    for d in shape:
        n *= d
    total_flops = sum(layer.flops for layer in all_layers)
    total_params = sum(layer.params for layer in all_layers)
    return CutInfo(
        cut=cut,
        activation_shape=shape,
        bytes_per_example=4 * n,
        head_flops_share=sum(layer.flops for layer in head) / total_flops,
        head_params_share=sum(layer.params for layer in head) / total_params,
        head_layers=tuple(layer.name for layer in head),
        tail_layers=tuple(layer.name for layer in tail),
    )


def all_cuts(cfg: ArchConfig) -> list[CutInfo]:
    return [cut_info(cfg, cut) for cut in cut_names()]
