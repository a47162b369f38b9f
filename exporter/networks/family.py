"""What a network family gives the exporter: a builder of the split network, its cuts, its input."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from dpa.contract.architecture import ArchConfig
from dpa.contract.choices import NetworkName

__all__ = ["ExportSettings", "Family", "RELEASE_PROJECTION", "Split"]

#: The head's last layer on an export with a public release projection (``dpa export --release-dims``):
#: ``release_projection.weight`` (k, d) and ``.bias`` (k,), frozen, never trained; every family names it so.
RELEASE_PROJECTION = "release_projection"


class ExportSettings(Protocol):
    """What a family reads of the export's configuration (``exporter.export.ExportConfig``)."""

    arch: ArchConfig
    cut: str
    weights: Path | None
    seed: int
    pixel_std: float | None
    centre_faces: Path | None


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
    build: Callable[[ExportSettings], Split]
    # A frozen public projection ending the head (``--release-dims``): (cfg, split, basis (k, d), centre) ->
    # the projected split; None where the family does not offer one yet.
    project: Callable[[ExportSettings, Split, Any, Any], Split] | None = None
    # A network converted from another toolkit is checked against that toolkit's own output before anything
    # is published: (cfg, split) -> a line for the export's report; raises UserError when it disagrees.
    check: Callable[[ExportSettings, Split], str] | None = None
    # An untrained head of an export's structure, for loading recorded weights into (the audit rebuilds the
    # head that made a release): (cut, image_size, width, release_dims, mirror) -> the head module.
    head: Callable[[str, int, float, int | None, bool], nn.Module] | None = None
    # The split with a head that averages each image's output with its mirror image's (``--flip-average``),
    # the same weights; None where the family does not offer it.
    mirror: Callable[[ExportSettings, Split], Split] | None = None
