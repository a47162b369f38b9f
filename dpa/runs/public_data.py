"""What the orchestration derives from PUBLIC faces only, so that choosing it spends no privacy."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from dpa.runs.shipped_weights import shipped_weights
from exporter.pretrain import PretrainConfig, pretrain, public_faces, sidecar

__all__ = ["PublicWeights", "pretrained_weights", "public_weights"]


@dataclass(frozen=True)
class PublicWeights:
    """Where a run's public network comes from: the shipped file (``dpa.runs.shipped_weights``) where it fits
    the input size and width, unless ``pretrain``; else pretrained in the work folder (the pretrain_* fields)."""

    image_size: int
    width: float
    pretrain: bool = False
    centre_identities: int = 40  # with the shipped weights: public faces for the export's centre and clip
    centre_per_identity: int = 10
    pretrain_identities: int = 40
    pretrain_per_identity: int = 40
    pretrain_epochs: int = 10
    seed: int = 0
    mixed_precision: bool = False


def public_weights(workdir: Path, cfg: PublicWeights, say: Callable[[str], None] = print) -> tuple[Path, Path]:
    """(public weights, public faces for the export's centre and clip): the shipped ones where they fit, else
    pretrained once under ``workdir / "pretrained"`` (``pretrained_weights``). ``dpa demo`` and ``dpa sweep``
    both take theirs from here."""
    shipped = None if cfg.pretrain else shipped_weights(cfg.image_size, cfg.width)
    if shipped is not None:
        say(f"loading the shipped public weights {shipped.name} (dpa pretrain at scale; command in its sidecar)")
        faces = public_faces(workdir / "public", cfg.centre_identities, cfg.centre_per_identity, cfg.image_size)
        return shipped, faces
    return pretrained_weights(
        workdir / "pretrained", identities=cfg.pretrain_identities, per_identity=cfg.pretrain_per_identity,
        image_size=cfg.image_size, width=cfg.width, epochs=cfg.pretrain_epochs, seed=cfg.seed,
        mixed_precision=cfg.mixed_precision, say=say,
    )  # fmt: skip


def pretrained_weights(
    folder: Path, *, identities: int, per_identity: int, image_size: int, width: float, epochs: int, seed: int,
    mixed_precision: bool = False, say: Callable[[str], None] = print,
) -> tuple[Path, Path]:  # fmt: skip
    """(weights, the public faces they were trained on): pretrained once in ``folder`` (``dpa pretrain``),
    reused while the settings are the same."""
    pcfg = PretrainConfig(
        out=folder / "weights.pt", identities=identities, per_identity=per_identity, image_size=image_size,
        width=width, epochs=epochs, seed=seed, cache_dir=folder / "faces",
        mixed_precision=mixed_precision,
    )  # fmt: skip
    faces = public_faces(folder / "faces", identities, per_identity, image_size)
    where = ("out", "cache_dir")  # a copied folder is the same pretraining
    want = {k: v for k, v in asdict(pcfg).items() if k not in where}
    try:
        saved = json.loads(sidecar(pcfg.out).read_text())["config"]
        done = {k: v for k, v in saved.items() if k not in where} == want and pcfg.out.is_file()
    except (OSError, ValueError, KeyError):
        done = False
    if done:
        say(f"reusing the public pretrained weights in {pcfg.out}")
    else:
        say(f"pretraining on public faces ({identities} identities, disjoint from the devices')")
        pretrain(pcfg)
    return pcfg.out, faces
