"""``InversionConfig``: one inversion audit, validated on construction; and the JSON helpers its report uses."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpa.contract.errors import UserError
from dpa.privacy import checks

__all__ = ["ATTACK_NAMES", "InversionConfig", "MapSettings", "jsonable", "json_number"]

#: The inversion attacks the audit has: the inverse network (decoder) and the white-box MAP optimisation.
ATTACK_NAMES = ("decoder", "map")


def json_number(x: float) -> float | str:
    """JSON has no inf or NaN: write them as strings."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return json_number(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class MapSettings:
    """How hard the MAP attack optimises. Validated on construction."""

    steps: int = 100  # Adam steps per image batch (more overfit the noise: 100 beat 150 and 300 at 1e5)
    lr: float = 0.1  # Adam, on pixels in [0, 1]
    # Candidate prior weights lambda; the attacker keeps the one that rebuilds its own faces best.
    tv_weights: tuple[float, ...] = (0.3, 3.0, 30.0)
    calibration_images: int = 6  # auxiliary faces the choice of lambda is made on
    batch_size: int = 64  # images optimised together (independent problems, one graph)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.calibration_images < 1 or self.batch_size < 1:
            raise UserError("MAP attack steps, calibration images and batch size must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"MAP attack learning rate must be a positive number, got {self.lr}")
        weights = tuple(float(w) for w in self.tv_weights)
        if not weights or any(not (math.isfinite(w) and w >= 0) for w in weights):
            raise UserError(f"MAP attack prior weights must be numbers >= 0, got {self.tv_weights}")
        object.__setattr__(self, "tv_weights", weights)


def _as_epsilons(values: object) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        values = (values,)
    out = tuple(float(v) for v in values)  # type: ignore[union-attr]
    if not out:
        raise UserError("give at least one epsilon")
    return tuple(checks.epsilon(eps, allow_inf=True) for eps in out)


@dataclass(frozen=True)
class InversionConfig:
    """One inversion audit. Validated on construction."""

    # Export folder: the head's architecture, cut, preprocessing and weights come from it.
    # None: an untrained head built from (image_size, width, cut, arch_seed), as `dpa export --seed` would.
    artifacts: Path | None = None
    # A trained head checkpoint (a client's state dir or its head_checkpoint file) instead of the export's.
    head_checkpoint: Path | None = None
    image_size: int = 64  # without artifacts
    width: float = 0.25  # without artifacts
    cut: str = "conv1_1"  # without artifacts
    arch_seed: int = 0  # init_weights seed, without artifacts
    epsilons: tuple[float, ...] = (math.inf, 1e5, 1e3, 8.0)  # per release; inf: clipping only
    # C, as the client's --clip. None: a recorded view's own, or for run_inversion the export's public clip
    # (dpa.privacy.release_clip's policy; refused without one).
    clip: float | None = None
    delta: float = 1e-5
    data: str = "synthetic"  # "synthetic" or an LFW-layout folder
    aux_identities: int = 16  # the attacker's faces: the first identities (sorted by folder name)
    victim_identities: int = 4  # the next ones: whose faces the attacker tries to rebuild
    images_per_identity: int = 16  # at most this many images of each identity (first by file name)
    data_seed: int = 0  # synthetic faces' seed
    cache_dir: Path | None = None  # keep the synthetic faces here; None: a temporary folder
    decoder_width: int = 32  # channels of the decoder's hidden layers
    epochs: int = 20  # decoder training epochs per epsilon
    batch_size: int = 16
    lr: float = 1e-3  # Adam
    seed: int = 0  # decoder init, shuffling, attacker's and victims' noise
    grid_columns: int = 8  # victim images shown in the grid
    threads: int | None = None  # torch intra-op threads during the run; None: leave as is
    # The attacks run on every setting; the report keeps the strongest (best mean SSIM).
    attacks: tuple[str, ...] = ("decoder", "map")
    map_steps: int = 100  # Adam steps of the MAP attack
    map_lr: float = 0.1
    map_tv_weights: tuple[float, ...] = (0.3, 3.0, 30.0)  # prior weights the attacker chooses from
    map_calibration_images: int = 6  # auxiliary faces it chooses on
    # Write each epsilon's victim releases as a recorded view here (docs/server_view.md); None: do not.
    record_view: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilons", _as_epsilons(self.epsilons))
        attacks = (self.attacks,) if isinstance(self.attacks, str) else tuple(self.attacks)
        unknown = [a for a in attacks if a not in ATTACK_NAMES]
        if not attacks or unknown or len(set(attacks)) != len(attacks):
            raise UserError(f"attacks must be distinct names among {', '.join(ATTACK_NAMES)}, got {attacks}")
        object.__setattr__(self, "attacks", attacks)
        object.__setattr__(self, "map_tv_weights", self.map_settings.tv_weights)  # validates the MAP settings
        for name in ("artifacts", "head_checkpoint", "cache_dir", "record_view"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        if self.clip is not None:
            checks.positive_finite("clip", self.clip)
        checks.delta(self.delta, allow_zero=False)
        for name in ("aux_identities", "victim_identities", "epochs", "batch_size", "decoder_width", "grid_columns"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.images_per_identity < 2:
            raise UserError(f"images per identity must be >= 2, got {self.images_per_identity}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"learning rate must be a positive number, got {self.lr}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"threads must be >= 1, got {self.threads}")

    @property
    def map_settings(self) -> MapSettings:
        return MapSettings(
            steps=self.map_steps,
            lr=self.map_lr,
            tv_weights=self.map_tv_weights,
            calibration_images=self.map_calibration_images,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = str(value) if isinstance(value, Path) else value
        out["epsilons"] = [json_number(e) for e in self.epsilons]
        out["attacks"] = list(self.attacks)
        out["map_tv_weights"] = list(self.map_tv_weights)
        return out


# --------------------------------------------------------------------------- results
