"""dlib's face ResNet in PyTorch, rebuilt from its .dat file and split at a stage boundary.

The stages and their shapes are :mod:`dpa.contract.dlib_resnet`'s; the tensors come from
:func:`exporter.networks.dlib_dat.read_dat`. Parameter names say where each tensor sits
(``res4.conv1.weight``, ``res4.affine1.gamma``, ``embedding.weight``); the tail ends in a linear classifier
``classifier`` over the device's identities, initialised from a seed (dlib ships no classifier).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpa.contract import dlib_resnet as layout
from dpa.contract.errors import UserError
from exporter.networks.dlib_dat import DatLayer, read_dat
from exporter.networks.family import RELEASE_PROJECTION

__all__ = ["DlibPart", "build_parts", "load_dat", "project_parts"]


class Affine(nn.Module):
    """dlib's ``affine_`` in CONV_MODE: y = gamma[c] x + beta[c] (a batch norm folded at the end of training)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)


def _pad(x: torch.Tensor, pad: tuple[int, int, int]) -> torch.Tensor:
    """Zero-pad (B, C, H, W) by (c, h, w) at the end of C, H and W, as dlib's ``add_prev`` treats the
    smaller operand."""
    dc, dh, dw = pad
    return x if not (dc or dh or dw) else F.pad(x, (0, dw, 0, dh, 0, dc))


def _avg_pool_2x2(x: torch.Tensor, side: int) -> torch.Tensor:
    """dlib's ``avg_pool<2,2,2,2>`` (no padding, a last odd row and column dropped) as a slice, a reshape and
    a mean: onnxruntime-training 1.19's AveragePoolGrad returns an empty tensor on the CPU, while these
    three ops' gradients are exact."""
    half = side // 2
    c = x.shape[1]
    x = x[:, :, : 2 * half, : 2 * half].reshape(-1, c, half, 2, half, 2)  # (B, C, h, 2, w, 2)
    return x.mean(dim=(3, 5))


class Unit(nn.Module):
    """A residual unit: relu(add_prev(affine2(conv2(relu(affine1(conv1(x))))), shortcut(x))).

    The two branches' shapes are fixed by the input's (``in_shape``), so the zero padding that makes
    them equal is worked out here, once, and the traced graph holds constants."""

    def __init__(self, in_shape: tuple[int, ...], channels: int, down: bool) -> None:
        super().__init__()
        self.down = down
        stride, pad = (2, 0) if down else (1, 1)  # dlib's con_ pads k/2 only at stride 1
        self.conv1 = nn.Conv2d(in_shape[0], channels, 3, stride=stride, padding=pad)
        self.affine1 = Affine(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.affine2 = Affine(channels)
        side = self._side = in_shape[1]
        branch, shortcut = ((side - 3) // 2 + 1, (side - 2) // 2 + 1) if down else (side, side)
        c, s = max(channels, in_shape[0]), max(branch, shortcut)
        self._pads = ((c - channels, s - branch, s - branch), (c - in_shape[0], s - shortcut, s - shortcut))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(torch.relu(self.affine1(self.conv1(x)))))
        s = _avg_pool_2x2(x, self._side) if self.down else x
        return torch.relu(_pad(y, self._pads[0]) + _pad(s, self._pads[1]))


class Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, layout.STEM_CHANNELS, 7, stride=2)
        self.affine = Affine(layout.STEM_CHANNELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(torch.relu(self.affine(self.conv(x))), 3, 2)


class DlibPart(nn.Module):
    """A contiguous run of stages (the head or the tail); the tail ends in ``classifier``."""

    def __init__(
        self, names: tuple[str, ...], *, in_shape: tuple[int, ...], num_classes: int | None,
        release_dims: int | None = None, mirror: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.names = names
        # The head's output averaged over each image and its mirror image (``dpa export --flip-average``): the
        # field's test-time flip, inside the graph, so every device, public statistic and template sees it.
        self.mirror = mirror
        table = {s.name: s for s in layout.stages()}
        shape = in_shape
        for name in names:
            stage = table[name]
            if stage.kind == "stem":
                setattr(self, name, Stem())
            elif stage.kind == "unit":
                setattr(self, name, Unit(shape, stage.channels, stage.down))
            elif stage.kind == "embedding":
                setattr(self, name, nn.Linear(shape[0], layout.EMBEDDING_DIMS, bias=False))
            shape = stage.out_shape
        self.projected = False
        if num_classes is None and release_dims is not None:
            # The head ends in y = W (a - mu): W the public principal directions, frozen (exporter.export sets
            # them; ort_artifacts leaves RELEASE_PROJECTION out of the trained parameters).
            setattr(self, RELEASE_PROJECTION, nn.Linear(math.prod(shape), release_dims))
            getattr(self, RELEASE_PROJECTION).requires_grad_(False)
            self.projected = True
        features = release_dims if (num_classes is not None and release_dims is not None) else shape[0]
        self.classifier = nn.Linear(features, num_classes) if num_classes is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mirror:  # one batch of 2B: the images, then their mirror images (width reversed)
            x = torch.cat([x, torch.flip(x, dims=(3,))])
        for name in self.names:
            x = x.mean(dim=(2, 3)) if name == "pool" else getattr(self, name)(x)  # pool: (B, 256, 2, 2) -> (B, 256)
        if self.projected:
            x = getattr(self, RELEASE_PROJECTION)(torch.flatten(x, 1))
        if self.mirror:
            x = x.reshape(2, -1, *x.shape[1:]).mean(dim=0)
        return x if self.classifier is None else self.classifier(x)


def build_parts(
    cut: str, *, num_classes: int, release_dims: int | None = None, mirror: bool = False
) -> tuple[DlibPart, DlibPart]:  # fmt: skip
    """Head (device: stages up to ``cut``) and tail (server: the rest and a ``num_classes`` classifier). With
    ``release_dims`` the head ends in the frozen release projection; only where the tail is the classifier
    alone (cut ``embedding``), since no stage of this network takes a projected input. With ``mirror`` the
    head averages each image's output with its mirror image's; only at ``embedding``, where the output is a
    descriptor (a feature map of the mirror image is the mirror of the map, and averaging the two blurs it)."""
    head_stages, tail_stages = layout.stage_cut(cut)
    if release_dims is not None and tail_stages:
        raise UserError(f"--release-dims with {layout.NAME} needs --cut embedding (the tail is then its classifier)")
    if mirror and tail_stages:
        raise UserError(f"--flip-average with {layout.NAME} needs --cut embedding (its descriptor; not a feature map)")
    size = layout.IMAGE_SIZE
    head = DlibPart(tuple(s.name for s in head_stages), in_shape=(3, size, size), num_classes=None,
                    release_dims=release_dims, mirror=mirror)  # fmt: skip
    tail = DlibPart(tuple(s.name for s in tail_stages), in_shape=head_stages[-1].out_shape, num_classes=num_classes,
                    release_dims=release_dims)  # fmt: skip
    return head, tail


def _state_from_dat(layers: list[DatLayer]) -> dict[str, np.ndarray]:
    """Name the .dat's tensors as :class:`DlibPart` does, checking the layer sequence is this family's."""
    convs = [x for x in layers if x.kind == "con"]
    affines = [x for x in layers if x.kind == "affine"]
    fcs = [x for x in layers if x.kind == "fc"]
    if len(convs) != 1 + 2 * len(layout.UNITS) or len(affines) != len(convs) or len(fcs) != 1:
        raise UserError(f"the .dat holds {len(convs)} convolutions, {len(affines)} affines and {len(fcs)} fc "
                        f"layers, not dlib's face ResNet ({1 + 2 * len(layout.UNITS)}, the same, 1)")  # fmt: skip
    if not np.allclose(layers[0].arrays["mean"], layout.PIXEL_MEAN) or layers[0].ints["rows"] != layout.IMAGE_SIZE:
        raise UserError("the .dat's input layer is not dlib's 150x150 RGB input with the published means")
    names = ["stem.conv", *(f"res{i}.conv{j}" for i in range(1, len(layout.UNITS) + 1) for j in (1, 2))]
    state: dict[str, np.ndarray] = {}
    for name, conv, affine in zip(names, convs, affines, strict=True):
        state[f"{name}.weight"], state[f"{name}.bias"] = conv.arrays["weight"], conv.arrays["bias"]
        prefix = name.replace("conv", "affine")
        state[f"{prefix}.gamma"], state[f"{prefix}.beta"] = affine.arrays["gamma"], affine.arrays["beta"]
    state["embedding.weight"] = fcs[0].arrays["weight"]
    return state


def load_dat(parts: tuple[DlibPart, DlibPart], path: Path, *, seed: int) -> None:
    """Load the .dat's tensors into head and tail (every tensor placed exactly once, shapes checked); the
    tail's classifier gets small seeded normal weights and zero biases."""
    state = _state_from_dat(read_dat(path))
    placed: set[str] = set()
    gen = torch.Generator().manual_seed(seed)
    for part in parts:
        own = part.state_dict()
        new = {}
        for name, tensor in own.items():
            if name.startswith(f"{RELEASE_PROJECTION}."):
                new[name] = tensor  # set by the export from public faces
                continue
            if name.startswith("classifier."):
                new[name] = (torch.randn(tensor.shape, generator=gen) * tensor.shape[-1] ** -0.5
                             if name.endswith("weight") else torch.zeros_like(tensor))  # fmt: skip
                continue
            value = state[name]
            if tuple(value.shape) != tuple(tensor.shape):
                raise UserError(f"{name}: the .dat holds {value.shape}, the network expects {tuple(tensor.shape)}")
            new[name] = torch.from_numpy(np.ascontiguousarray(value))
            placed.add(name)
        part.load_state_dict(new)
    if placed != set(state):
        raise UserError(f"tensors of the .dat left unplaced: {sorted(set(state) - placed)}")


def project_parts(
    parts: tuple[DlibPart, DlibPart], cut: str, num_classes: int, basis: np.ndarray, centre: np.ndarray, seed: int
) -> tuple[DlibPart, DlibPart]:
    """``parts`` with the head ending in y = basis (a - centre) and a classifier over k dimensions (seeded); a
    mirrored head stays mirrored."""
    b = np.asarray(basis, dtype=np.float32)
    head, tail = build_parts(cut, num_classes=num_classes, release_dims=len(b), mirror=parts[0].mirror)
    head.load_state_dict({**head.state_dict(), **parts[0].state_dict()})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer = getattr(head, RELEASE_PROJECTION)
        layer.weight.copy_(torch.from_numpy(b))
        layer.bias.copy_(torch.from_numpy(-(b.astype(np.float64) @ np.ravel(centre)).astype(np.float32)))
        tail.classifier.weight.copy_(torch.randn(tail.classifier.weight.shape, generator=gen) * len(b) ** -0.5)
        tail.classifier.bias.zero_()
    return head, tail
