"""What a network family gives the exporter: a builder of the split network, its cuts, its input."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from dpa.contract.choices import NetworkName

if TYPE_CHECKING:
    from exporter.export import ExportConfig

__all__ = ["Family", "Split"]


@dataclass(frozen=True)
class Split:
    """A network split at a cut, weights loaded, with what the manifest says about its input."""

    head: nn.Module
    tail: nn.Module
    image_size: int  # input side in pixels
    width: float  # channel multiplier (VGG-Face's; 1.0 for a published network)
    dropout: float  # the tail's dropout
    activation_shape: tuple[int, ...]  # per example, at the cut
    pixel_mean: tuple[float, float, float]  # RGB, 0..255, subtracted first
    pixel_std: tuple[float, float, float]  # then divided by
    alignment: str | None  # the chip the network expects (``dpa.faces.align.ALIGNMENT``); None: a centre crop
    seed: int | None  # initialisation seed when no weights file gave the weights
    weights: str | None  # the weights file used (its sha256 goes in the manifest)


@dataclass(frozen=True)
class Family:
    name: NetworkName
    cuts: Callable[[], list[str]]  # the names a user may cut after, forward order
    build: Callable[[ExportConfig], Split]
    # A frozen public projection ending the head (``--release-dims``): (cfg, split, basis (k, d), centre) ->
    # the projected split; None where the family does not offer one yet.
    project: Callable[[ExportConfig, Split, Any, Any], Split] | None = None
    # A network converted from another toolkit is checked against that toolkit's own output before anything
    # is published: (cfg, split) -> a line for the export's report; raises UserError when it disagrees.
    check: Callable[[ExportConfig, Split], str] | None = None
    # An untrained head of an export's structure, for loading recorded weights into (the audit rebuilds the
    # head that made a release): (cut, image_size, width, release_dims) -> the head module.
    head: Callable[[str, int, float, int | None], nn.Module] | None = None
