"""What a run releases and what it costs: the noise plan, the accountant, and how the report states them."""

from __future__ import annotations

import math
from typing import Any

from dpa.contract.manifest import Manifest
from dpa.privacy.accountant import PrivacyAccountant
from dpa.privacy.mechanism import DPConfig
from dpa.privacy.release_plan import plan_releases
from runtime_client.config import ClientConfig, ReleaseKind

__all__ = ["THREAT_MODEL", "privacy_plan", "privacy_summary", "run_warnings"]

THREAT_MODEL = (
    "The edge server sees, per training step, each example's clipped activation plus noise calibrated to "
    "(epsilon, delta) for ONE release, and the example's identity label randomised on the device at "
    "label_epsilon per release (RRWithPrior; in clear with --label-epsilon inf). It never sees images. "
    "Each epoch releases every training example once more (and its evaluation every held-out image, "
    "without a label), so the privacy loss composes over releases: privacy.total is that composition, of "
    "both mechanisms (dp-accounting PLD, no amplification by sampling claimed); with labels in clear it "
    "covers the activations only and the labels are not protected."
)


def privacy_summary(dp: DPConfig, releases: int, elements: int) -> dict[str, Any]:
    """The release's parameters, and its signal-to-noise ratio per element.

    A clipped activation has RMS per element at most C / sqrt(d); the noise adds std per
    element. Their ratio says how much of the signal the server's network can still see.
    """
    std = dp.noise_std
    return {
        "mechanism": dp.mechanism.value,
        "clip": dp.clip,
        "epsilon_per_release": dp.epsilon,
        "delta_per_release": dp.delta if dp.mechanism.value == "gaussian" else 0.0,
        "noise_scale": dp.noise_scale,
        "noise_multiplier": dp.noise_multiplier if math.isfinite(dp.epsilon) else 0.0,
        "sensitivity": dp.sensitivity,
        "releases_per_training_example": releases,
        "elements_per_release": elements,
        "snr_per_element": math.inf if std == 0 else dp.clip / math.sqrt(elements) / std,
        "accounting": "epsilon_per_release is one release; 'total' composes all releases so far (PLD)",
    }


def privacy_plan(cfg: ClientConfig, saved: dict[str, Any]) -> tuple[DPConfig, PrivacyAccountant]:
    """The release's noise and the run's accountant for this run (restored from ``saved`` on --resume):
    ``dpa.privacy.release_plan`` owns the calibration; this only says what the run releases."""
    plan = plan_releases(cfg.dp, total_epsilon=cfg.total_epsilon, releases=cfg.releases,
                         label_epsilon=cfg.label_epsilon, saved=saved)  # fmt: skip
    return plan.dp, plan.accountant


#: Said when a frozen head has no pretrained weights: it would release random features.
RANDOM_FROZEN_HEAD = (
    "the head is frozen but the export has no pretrained weights (exported without --weights): its features "
    "are random; pretrain (dpa pretrain) and export with --weights --centre-from, or train it (--train-head)"
)


def run_warnings(cfg: ClientConfig, manifest: Manifest | None = None) -> list[str]:
    class_sums = cfg.release is ReleaseKind.CLASS_SUMS  # labels inside the class sums, never sent one by one
    out = ["labels are sent to the server in clear"] if math.isinf(cfg.label_epsilon) and not class_sums else []
    if cfg.frozen_head and manifest is not None and manifest.weights_sha256 is None:
        out.append(RANDOM_FROZEN_HEAD)
    if cfg.dp.epsilon is not None and math.isinf(cfg.dp.epsilon):
        out.append("epsilon = inf: activations were sent without noise")
    if cfg.seed is not None:
        out.append("fixed --seed: noise is reproducible (experiments only)")
    return out
