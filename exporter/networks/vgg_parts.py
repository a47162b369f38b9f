"""VGG-Face in PyTorch, built from the layer table and split at a cut.

Parameter names are the layer names of the published network (``conv1_1.weight``,
``fc6.bias``...): they are the names in the ONNX graphs, the ORT checkpoints and a
converted VGG-Face state dict, so one name means one tensor everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dpa.contract.architecture import ArchConfig, LayerKind, cut_info, layers
from dpa.contract.errors import UserError
from exporter.networks.family import RELEASE_PROJECTION

__all__ = ["RELEASE_PROJECTION", "VGGFacePart", "build_parts", "load_weights", "init_weights", "project_parts"]


class VGGFacePart(nn.Module):
    """A contiguous run of VGG-Face layers (the head or the tail).

    The ReLU of a conv/fc6/fc7 layer belongs to that layer.
    """

    def __init__(
        self, cfg: ArchConfig, names: tuple[str, ...], *, is_head: bool, release_dims: int | None = None
    ) -> None:
        super().__init__()
        self.names = names
        table = {layer.name: layer for layer in layers(cfg)}
        self._ops: list[tuple[str, str]] = []  # (name, op) in forward order
        for name in names:
            layer = table[name]
            if layer.kind is LayerKind.CONV:
                setattr(self, name, nn.Conv2d(layer.in_shape[0], layer.out_shape[0], 3, padding=1))
                self._ops.append((name, "conv"))
            elif layer.kind is LayerKind.POOL:
                self._ops.append((name, "pool"))
            else:
                # A tail after a release projection takes its k dimensions (a public bottleneck).
                first_after_projection = not is_head and release_dims is not None and name == names[0]
                features = release_dims if first_after_projection else layer.in_shape[0]
                setattr(self, name, nn.Linear(features, layer.out_shape[0]))
                # fc6's input is pool5's feature map: flatten it (B, C, H, W) -> (B, C*H*W).
                self._ops.append((name, "fc"))
        if is_head and release_dims is not None:
            # y = W a + b on the flattened activation a: W's rows the public PCA directions, b = -W mu (the
            # public centre), set by the export from public faces and frozen (requires_grad False here; the
            # ORT artifacts leave it out of the trained parameters).
            d = math.prod(table[names[-1]].out_shape)
            setattr(self, RELEASE_PROJECTION, nn.Linear(d, release_dims))
            getattr(self, RELEASE_PROJECTION).requires_grad_(False)
            self._ops.append((RELEASE_PROJECTION, "projection"))
        # The device runs its forward twice (once for the activations, once inside the ORT training
        # step), so the head must be deterministic: dropout only ever runs in the tail. With cut fc7
        # this drops the dropout after fc6, which the docs state.
        self.dropout = nn.Dropout(cfg.dropout if not is_head else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, op in self._ops:
            if op == "projection":
                x = getattr(self, name)(torch.flatten(x, 1))
            elif op == "conv":
                x = torch.relu(getattr(self, name)(x))
            elif op == "pool":
                x = nn.functional.max_pool2d(x, 2, 2)
            else:
                if name in ("fc7", "fc8") and self.dropout.p > 0:
                    # Dropout of the previous fc layer, applied where its output is consumed,
                    # which keeps it in the tail when the cut is fc6 or fc7.
                    x = self.dropout(x)
                if x.dim() > 2:
                    x = torch.flatten(x, 1)
                x = getattr(self, name)(x)
                if name != "fc8":
                    x = torch.relu(x)
        return x


def build_parts(cfg: ArchConfig, cut: str, release_dims: int | None = None) -> tuple[VGGFacePart, VGGFacePart]:
    """Head (device) and tail (edge server) for ``cut``; with ``release_dims`` the head ends in the frozen
    release projection to that many dimensions and the tail starts from them."""
    info = cut_info(cfg, cut)
    return (
        VGGFacePart(cfg, info.head_layers, is_head=True, release_dims=release_dims),
        VGGFacePart(cfg, info.tail_layers, is_head=False, release_dims=release_dims),
    )


def project_parts(
    cfg: ArchConfig, cut: str, parts: tuple[VGGFacePart, VGGFacePart], basis: np.ndarray, centre: np.ndarray,
    seed: int,
) -> tuple[VGGFacePart, VGGFacePart]:  # fmt: skip
    """``parts`` with the head ending in y = basis (a - centre) (``basis`` (k, d) public directions,
    ``centre`` the public mean activation) and a tail that starts from k dimensions: the head's weights
    and every tail tensor whose shape still fits are kept, the tail's first layer is initialised from
    ``seed``."""
    b = np.asarray(basis, dtype=np.float32)
    head, tail = build_parts(cfg, cut, release_dims=len(b))
    init_weights((tail,), seed)
    head.load_state_dict({**head.state_dict(), **parts[0].state_dict()})
    fits = {n: v for n, v in parts[1].state_dict().items() if v.shape == tail.state_dict()[n].shape}
    tail.load_state_dict({**tail.state_dict(), **fits})
    layer = getattr(head, RELEASE_PROJECTION)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(b))
        layer.bias.copy_(torch.from_numpy(-(b.astype(np.float64) @ np.ravel(centre)).astype(np.float32)))
    return head, tail


def init_weights(parts: tuple[nn.Module, ...], seed: int) -> None:
    """Seeded standard initialisation (He-normal convs, small-normal fc, zero biases)."""
    gen = torch.Generator().manual_seed(seed)
    for part in parts:
        for module in part.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.in_channels * 9
                with torch.no_grad():
                    module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=gen)
                    module.bias.zero_()
            elif isinstance(module, nn.Linear):
                with torch.no_grad():
                    module.weight.normal_(0.0, (1.0 / module.in_features) ** 0.5, generator=gen)
                    module.bias.zero_()


def load_weights(parts: tuple[nn.Module, ...], path: Path, seed: int = 0) -> None:
    """Load a state dict (layer-named, e.g. a converted VGG-Face checkpoint) into head and tail.

    Raises ValueError naming every missing or mis-shaped tensor; nothing is loaded then.
    Extra tensors are an error too, so a wrong file is never half-used silently. The one exception:
    an fc8 of another class count (a classifier for other identities) is initialised from ``seed``.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file
        raise UserError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file {path} is not a state dict of tensors")
    expected = {name: p for part in parts for name, p in part.state_dict().items()}
    problems = [f"missing {n} {tuple(p.shape)}" for n, p in expected.items() if n not in state]
    problems += [
        f"{n} has shape {tuple(state[n].shape)}, expected {tuple(p.shape)}"
        for n, p in expected.items()
        if n in state and tuple(state[n].shape) != tuple(p.shape)
    ]
    problems += [f"unexpected tensor {n}" for n in state if n not in expected]
    # A classifier for other identities (pretrained on public faces) is no use here: an fc8 of
    # another class count is initialised from ``seed`` instead, and only it. So is a missing fc8: an
    # embedding-only file (``dpa pretrain`` without its public classifier, as the shipped weights are).
    fresh: set[str] = set()
    if "fc8.weight" in expected and "fc8.weight" in state and "fc8.bias" in state:
        w, b = tuple(state["fc8.weight"].shape), tuple(state["fc8.bias"].shape)
        if len(w) == 2 and w[1] == expected["fc8.weight"].shape[1] and b == (w[0],):
            fresh = {n for n in ("fc8.weight", "fc8.bias") if tuple(state[n].shape) != tuple(expected[n].shape)}
    elif "fc8.weight" in expected and "fc8.weight" not in state and "fc8.bias" not in state:
        fresh = {"fc8.weight", "fc8.bias"}
    problems = [p for p in problems if not any(p.startswith((f"{n} has shape", f"missing {n} ")) for n in fresh)]
    if problems:
        raise UserError(f"weights file {path} does not fit this network: " + "; ".join(problems))
    if fresh:
        init_weights(parts, seed)
    for part in parts:
        part.load_state_dict({n: (p if n in fresh else state[n].float()) for n, p in part.state_dict().items()})
