"""The release plan: a run's budget in; the noise of one release and the run's accountant out, in one call.

A run states its privacy in one of two ways:

- a whole-run budget (``total_epsilon``, the recommended way): the noise multiplier z is calibrated once with
  dp-accounting so that ``releases`` releases of each example (and their labels, at ``label_epsilon`` each)
  stay within it; the DPConfig it returns carries z, and what one release at z costs (for display);
- a per-release epsilon (``DPConfig.epsilon``), with no budget: the noise is calibrated per release and the
  accountant only counts.

The two are exclusive: a DPConfig whose epsilon is ``None`` says "planned from the budget", so no caller holds
a DPConfig with a number it knows will be overwritten. A resumed run passes its saved account: it keeps the
noise and the budget it started with (asking for more epochs than were planned then runs into the budget and
is refused, instead of being silently re-budgeted).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from dpa.contract.errors import UserError
from dpa.privacy.accountant import PrivacyAccountant, calibrate_noise_multiplier, epsilon_spent
from dpa.privacy.mechanism import DPConfig

__all__ = ["ReleasePlan", "plan_releases", "check_budget"]


@dataclass(frozen=True)
class ReleasePlan:
    """One release's calibrated mechanism, and the run's accountant (nothing recorded yet, or as saved)."""

    dp: DPConfig
    accountant: PrivacyAccountant


def check_budget(dp: DPConfig, total_epsilon: float | None) -> None:
    """Exactly one of a per-release epsilon (``dp.epsilon``) and a whole-run budget; refused otherwise."""
    if total_epsilon is None and dp.epsilon is None:
        raise UserError("no privacy budget: give a whole-run epsilon (--total-epsilon) or a per-release one")
    if total_epsilon is not None and dp.epsilon is not None and dp.fixed_noise_multiplier is None:
        raise UserError(
            f"a per-release epsilon ({dp.epsilon:g}) and a whole-run budget ({total_epsilon:g}) were both given: "
            "the budget calibrates each release, so give one of them"
        )


def plan_releases(
    dp: DPConfig, *, total_epsilon: float | None, releases: int, label_epsilon: float,
    saved: Mapping[str, Any] | None = None,
) -> ReleasePlan:  # fmt: skip
    """The plan for ``releases`` releases of each example (``saved``: a resumed run's ``accountant.*`` state)."""
    check_budget(dp, total_epsilon)
    if saved and any(key.startswith("accountant.") for key in saved):
        return _resumed(dp, total_epsilon, label_epsilon, saved)
    budget = math.inf
    if total_epsilon is not None:
        z = calibrate_noise_multiplier(
            mechanism=dp.mechanism, total_epsilon=total_epsilon, delta=dp.delta, releases=releases,
            label_epsilon=label_epsilon,
        )  # fmt: skip
        dp, budget = _at_noise_multiplier(dp, z), total_epsilon
    accountant = PrivacyAccountant(
        mechanism=dp.mechanism, noise_multiplier=_z(dp), delta=dp.delta, budget_epsilon=budget,
        label_epsilon=label_epsilon,
    )  # fmt: skip
    return ReleasePlan(dp, accountant)


def _resumed(dp: DPConfig, total_epsilon: float | None, label_epsilon: float, saved: Mapping[str, Any]) -> ReleasePlan:
    saved_budget = float(saved.get("accountant.budget_epsilon", math.inf))
    asked_budget = math.inf if total_epsilon is None else total_epsilon
    if not math.isclose(saved_budget, asked_budget, rel_tol=1e-6) and saved_budget != asked_budget:
        raise UserError(f"--resume: the run was started with a total budget of {saved_budget:g}, not {asked_budget:g}")
    if total_epsilon is not None:
        dp = _at_noise_multiplier(dp, float(saved["accountant.noise_multiplier"]))
    accountant = PrivacyAccountant.from_state(
        dict(saved), mechanism=dp.mechanism, noise_multiplier=_z(dp), delta=dp.delta, label_epsilon=label_epsilon
    )
    return ReleasePlan(dp, accountant)


def _at_noise_multiplier(dp: DPConfig, z: float) -> DPConfig:
    """``dp`` at noise multiplier z, its epsilon what one release at z costs (for display)."""
    per_release = epsilon_spent(mechanism=dp.mechanism, noise_multiplier=z, releases=1, delta=dp.delta)
    return replace(dp, epsilon=per_release, fixed_noise_multiplier=z)


def _z(dp: DPConfig) -> float:
    assert dp.epsilon is not None  # planned
    return 0.0 if math.isinf(dp.epsilon) else dp.noise_multiplier
