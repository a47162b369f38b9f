"""The dlib family: dlib's public face ResNet (``face-recognition-models``, CC0), read from its .dat file.

``--weights`` names the .dat file; without it, the one ``face-recognition-models`` installs. The network
is dlib's to the last tensor; only the tail's classifier over the device's identities is new (seeded).
Its input is dlib's aligned 150x150 chip (``dpa.faces.align``), so the manifest names that alignment.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import nn

from dpa.contract import dlib_resnet as layout
from dpa.contract.choices import NetworkName
from dpa.contract.errors import UserError
from dpa.faces.align import model_file
from exporter.networks.dlib_resnet import build_parts, load_dat, project_parts
from exporter.networks.dlib_twin import MAX_ELEMENT_SHARE, MIN_COSINE, compare_with_dlib
from exporter.networks.family import ExportSettings, Family, Split

__all__ = ["FAMILY", "DAT_FILE"]

#: The face network's file in ``face-recognition-models``.
DAT_FILE = "dlib_face_recognition_resnet_model_v1.dat"


def default_dat() -> Path:
    return model_file(DAT_FILE)


def _build(cfg: ExportSettings) -> Split:
    dat = Path(cfg.weights) if cfg.weights is not None else default_dat()
    head, tail = build_parts(cfg.cut, num_classes=cfg.arch.num_classes)
    load_dat((head, tail), dat, seed=cfg.seed)
    return Split(
        head=head,
        tail=tail,
        image_size=layout.IMAGE_SIZE,
        width=1.0,
        dropout=0.0,  # dlib's network has none
        activation_shape=layout.stage_cut(cfg.cut)[0][-1].out_shape,
        pixel_mean=layout.PIXEL_MEAN,
        pixel_std=layout.PIXEL_STD,
        alignment="dlib-5pt-150",
        seed=cfg.seed,  # the classifier's; the rest is the .dat's
        weights=str(dat),
    )


def _check(cfg: ExportSettings, split: Split) -> str:
    """The torch twin against dlib's ``compute_face_descriptor`` (:mod:`exporter.networks.dlib_twin`)."""
    report = compare_with_dlib(split.head, split.tail, Path(str(split.weights)), cfg.centre_faces)
    line = (
        f"matches dlib's compute_face_descriptor on {report.chips} chips of {report.source}: max element "
        f"error {report.max_element_share:.1e} of the descriptors' scale, min cosine {report.min_cosine:.8f}"
    )
    if not report.passed:
        raise UserError(
            f"the converted network does not match dlib's: {line.split(': ', 1)[1]} "
            f"(allowed {MAX_ELEMENT_SHARE:g} and {MIN_COSINE})"
        )
    return line


def _project(cfg: ExportSettings, split: Split, basis: object, centre: object) -> Split:
    head, tail = project_parts((split.head, split.tail), cfg.cut, cfg.arch.num_classes, basis, centre, cfg.seed)  # type: ignore[arg-type]
    return replace(split, head=head, tail=tail, activation_shape=(len(basis),))  # type: ignore[arg-type]


def _mirror(cfg: ExportSettings, split: Split) -> Split:
    head, tail = build_parts(cfg.cut, num_classes=cfg.arch.num_classes, mirror=True)
    head.load_state_dict(split.head.state_dict())
    tail.load_state_dict(split.tail.state_dict())
    return replace(split, head=head, tail=tail)


def _head(cut: str, _image_size: int, _width: float, release_dims: int | None, mirror: bool) -> nn.Module:
    return build_parts(cut, num_classes=2, release_dims=release_dims, mirror=mirror)[0]


FAMILY = Family(name=NetworkName.DLIB_RESNET, cuts=layout.cut_names, build=_build, check=_check, project=_project,
                head=_head, mirror=_mirror)  # fmt: skip
