"""What a run releases and what it costs: the noise plan, the accountant, and how the report states them."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from dpa.contract.errors import UserError
from dpa.contract.manifest import Manifest
from dpa.privacy.accountant import PrivacyAccountant, calibrate_noise_multiplier, epsilon_spent
from dpa.privacy.mechanism import DPConfig
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
    """The release's noise and the run's accountant (restored from ``saved`` on --resume).

    With ``total_epsilon`` the noise multiplier is calibrated once, for ``epochs`` releases of
    each example, when the run starts. A resumed run keeps that noise and that budget (both
    saved with the head), so asking for more epochs than were planned runs into the budget
    and is refused, instead of being silently re-budgeted; other privacy settings than the
    saved ones are refused by the accountant.
    """
    dp = cfg.dp
    if not any(key.startswith("accountant.") for key in saved):
        budget = math.inf
        if cfg.total_epsilon is not None:
            z = calibrate_noise_multiplier(
                mechanism=dp.mechanism, total_epsilon=cfg.total_epsilon, delta=dp.delta, releases=cfg.releases,
                label_epsilon=cfg.label_epsilon,
            )  # fmt: skip
            dp = with_noise_multiplier(dp, z)
            budget = cfg.total_epsilon
        z = 0.0 if math.isinf(dp.epsilon) else dp.noise_multiplier
        return dp, PrivacyAccountant(
            mechanism=dp.mechanism, noise_multiplier=z, delta=dp.delta, budget_epsilon=budget,
            label_epsilon=cfg.label_epsilon,
        )  # fmt: skip
    saved_budget = float(saved.get("accountant.budget_epsilon", math.inf))
    asked_budget = math.inf if cfg.total_epsilon is None else cfg.total_epsilon
    if not math.isclose(saved_budget, asked_budget, rel_tol=1e-6) and saved_budget != asked_budget:
        raise UserError(f"--resume: the run was started with a total budget of {saved_budget:g}, not {asked_budget:g}")
    if cfg.total_epsilon is not None:
        dp = with_noise_multiplier(dp, float(saved["accountant.noise_multiplier"]))
    z = 0.0 if math.isinf(dp.epsilon) else dp.noise_multiplier
    accountant = PrivacyAccountant.from_state(
        saved, mechanism=dp.mechanism, noise_multiplier=z, delta=dp.delta, label_epsilon=cfg.label_epsilon
    )
    return dp, accountant


def with_noise_multiplier(dp: DPConfig, z: float) -> DPConfig:
    per_release = epsilon_spent(mechanism=dp.mechanism, noise_multiplier=z, releases=1, delta=dp.delta)
    return replace(dp, epsilon=per_release, fixed_noise_multiplier=z)


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
    if math.isinf(cfg.dp.epsilon):
        out.append("epsilon = inf: activations were sent without noise")
    if cfg.seed is not None:
        out.append("fixed --seed: noise is reproducible (experiments only)")
    return out
