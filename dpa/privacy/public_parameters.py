"""The public parameters of one DP-A release, as a recorded view states them, and back.

The server knows these (the manifest and the protocol carry them); an auditor rebuilding the
mechanism from a recorded view must get exactly the noise and rescale the device used, so the
round trip is checked rather than trusted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dpa.contract.errors import UserError
from dpa.privacy.mechanism import DPConfig

__all__ = ["release_parameters", "config_from_parameters"]


def release_parameters(dp: DPConfig, elements: int) -> dict[str, Any]:
    """mechanism, clip, noise_std, noise_multiplier, release_scale, epsilon and delta of one release."""
    return {
        "mechanism": dp.mechanism.value,
        "clip": float(dp.clip),
        "noise_std": float(dp.noise_std),
        "noise_multiplier": float(dp.noise_multiplier),
        "release_scale": float(dp.release_scale(elements)),
        "epsilon": float(dp.epsilon),
        "delta": float(dp.delta),
        "normalize": bool(dp.normalize),
        # How sigma was set: from epsilon and delta per release, or from a whole-run noise multiplier.
        "calibrated_from": "epsilon" if dp.fixed_noise_multiplier is None else "noise_multiplier",
    }


def config_from_parameters(params: Mapping[str, Any], elements: int) -> DPConfig:
    """The DPConfig that reproduces ``params``; a clear error if the recorded figures do not agree."""
    try:
        eps = float(params["epsilon"])
        z = float(params["noise_multiplier"])
        dp = DPConfig(
            mechanism=params["mechanism"],
            clip=float(params["clip"]),
            epsilon=eps,
            delta=float(params["delta"]),
            normalize=bool(params.get("normalize", True)),
            fixed_noise_multiplier=z if params.get("calibrated_from") == "noise_multiplier" else None,
        )
        recorded = float(params["noise_std"]), float(params["release_scale"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"a release's public parameters are incomplete or malformed: {exc}") from None
    rebuilt = float(dp.noise_std), float(dp.release_scale(elements))
    if not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0) for a, b in zip(recorded, rebuilt, strict=True)):
        raise UserError(
            f"the recorded noise std and rescale {recorded} do not follow from the recorded mechanism "
            f"(they give {rebuilt})"
        )
    return dp
