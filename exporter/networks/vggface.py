"""The VGG-Face family: the seed's network, from a seeded initialisation or a layer-named state dict."""

from __future__ import annotations

from typing import Any

from torch import nn

from dpa.contract.architecture import ArchConfig, cut_info, cut_names
from dpa.contract.choices import NetworkName
from dpa.contract.errors import UserError
from exporter.networks.family import ExportSettings, Family, Split
from exporter.networks.vgg_parts import build_parts, init_weights, load_weights, project_parts

__all__ = ["FAMILY", "VGGFACE_MEAN", "FROM_SCRATCH_STD"]

#: VGG-Face's training mean (RGB, 0..255), from the published model; images are centred on it.
VGGFACE_MEAN = (129.186279296875, 104.76238250732422, 93.59396362304688)
#: Scale for training from scratch: brings pixels to roughly unit variance for He initialisation.
#: Published VGG-Face weights expect no scaling (std 1), which --weights selects.
FROM_SCRATCH_STD = 64.0


def _build(cfg: ExportSettings) -> Split:
    parts = build_parts(cfg.arch, cfg.cut)
    if cfg.weights is not None:
        load_weights(parts, cfg.weights, seed=cfg.seed)
        std = 1.0 if cfg.pixel_std is None else cfg.pixel_std
    else:
        init_weights(parts, cfg.seed)
        std = FROM_SCRATCH_STD if cfg.pixel_std is None else cfg.pixel_std
    return Split(
        head=parts[0],
        tail=parts[1],
        image_size=cfg.arch.image_size,
        width=cfg.arch.width,
        dropout=cfg.arch.dropout,
        activation_shape=cut_info(cfg.arch, cfg.cut).activation_shape,
        pixel_mean=VGGFACE_MEAN,
        pixel_std=(std, std, std),
        alignment=None,
        seed=None if cfg.weights is not None else cfg.seed,
        weights=None if cfg.weights is None else str(cfg.weights),
    )


def _project(cfg: ExportSettings, split: Split, basis: Any, centre: Any) -> Split:
    head, tail = project_parts(cfg.arch, cfg.cut, (split.head, split.tail), basis, centre, cfg.seed)  # type: ignore[arg-type]
    return Split(**{**split.__dict__, "head": head, "tail": tail, "activation_shape": (len(basis),)})


def _head(cut: str, image_size: int, width: float, release_dims: int | None, mirror: bool) -> nn.Module:
    if mirror:
        raise UserError("a vggface head has no mirrored form (--flip-average is dlib-resnet's)")
    arch = ArchConfig(image_size=image_size, width=width, num_classes=2, dropout=0.0)
    return build_parts(arch, cut, release_dims=release_dims)[0]


FAMILY = Family(name=NetworkName.VGGFACE, cuts=cut_names, build=_build, project=_project, head=_head)
