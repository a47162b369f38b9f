"""The release plan: one call from a budget to one release's noise and the accountant, checked against
dp-accounting's own calibration and epsilon (``dpa.privacy.accountant``), and the two budgets exclusive."""

from __future__ import annotations

import math

import pytest

from dpa.contract.errors import UserError
from dpa.privacy.accountant import calibrate_noise_multiplier, epsilon_spent
from dpa.privacy.mechanism import DPConfig
from dpa.privacy.release_plan import plan_releases


def test_a_whole_run_budget_plans_the_noise_and_the_per_release_epsilon():
    plan = plan_releases(DPConfig(clip=2.0, epsilon=None), total_epsilon=8.0, releases=3, label_epsilon=math.inf)
    z = calibrate_noise_multiplier(mechanism="gaussian", total_epsilon=8.0, delta=1e-5, releases=3)
    assert plan.dp.noise_multiplier == z and plan.dp.noise_scale == pytest.approx(2 * 2.0 * z)
    assert plan.dp.epsilon == epsilon_spent(mechanism="gaussian", noise_multiplier=z, releases=1, delta=1e-5)
    assert plan.accountant.budget_epsilon == 8.0 and plan.accountant.noise_multiplier == z
    plan.accountant.record(3)
    assert plan.accountant.epsilon <= 8.0


def test_a_per_release_epsilon_has_no_budget():
    plan = plan_releases(DPConfig(clip=1.0, epsilon=2.0), total_epsilon=None, releases=4, label_epsilon=math.inf)
    assert plan.dp.epsilon == 2.0 and plan.dp.fixed_noise_multiplier is None
    assert math.isinf(plan.accountant.budget_epsilon)
    clear = plan_releases(DPConfig(clip=1.0, epsilon=math.inf), total_epsilon=None, releases=1, label_epsilon=1.0)
    assert clear.accountant.noise_multiplier == 0.0


def test_the_two_budgets_are_exclusive_and_one_is_needed():
    with pytest.raises(UserError, match="both given"):
        plan_releases(DPConfig(clip=1.0, epsilon=1.0), total_epsilon=8.0, releases=1, label_epsilon=math.inf)
    with pytest.raises(UserError, match="no privacy budget"):
        plan_releases(DPConfig(clip=1.0, epsilon=None), total_epsilon=None, releases=1, label_epsilon=math.inf)
    with pytest.raises(ValueError, match="no noise yet"):
        _ = DPConfig(clip=1.0, epsilon=None).noise_scale


def test_a_resumed_run_keeps_its_noise_and_refuses_another_budget():
    first = plan_releases(DPConfig(clip=1.0, epsilon=None), total_epsilon=8.0, releases=2, label_epsilon=math.inf)
    first.accountant.record(1)
    saved = first.accountant.to_state()
    again = plan_releases(DPConfig(clip=1.0, epsilon=None), total_epsilon=8.0, releases=5, label_epsilon=math.inf,
                          saved=saved)  # fmt: skip
    assert again.dp.noise_multiplier == first.dp.noise_multiplier and again.accountant.releases == 1
    with pytest.raises(UserError, match="started with a total budget of 8, not 4"):
        plan_releases(DPConfig(clip=1.0, epsilon=None), total_epsilon=4.0, releases=2, label_epsilon=math.inf,
                      saved=saved)  # fmt: skip
