"""Named recipes build the device's config: what is released, whether the head trains, the budget planned
(no per-release epsilon beside a whole-run one), and a non-private run in clear."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dpa.contract.errors import UserError
from runtime_client.config import ReleaseKind
from runtime_client.recipes import Budget, Recipe


@pytest.mark.parametrize(
    ("recipe", "release", "frozen", "epochs"),
    [(Recipe.SCRATCH, ReleaseKind.EXAMPLES, False, 5), (Recipe.PUBLIC, ReleaseKind.EXAMPLES, True, 1),
     (Recipe.CLASS_SUMS, ReleaseKind.CLASS_SUMS, True, 1)],
)  # fmt: skip
def test_each_recipe_builds_its_device(recipe, release, frozen, epochs):
    cfg = recipe.client_config(artifacts=Path("a"), clip=2.0, budget=Budget(8.0, label_epsilon=4.0), seed=3)
    assert (cfg.release, cfg.frozen_head, cfg.on_device_templates, cfg.epochs) == (release, frozen, frozen, epochs)
    assert cfg.dp.epsilon is None and cfg.total_epsilon == 8.0 and cfg.label_epsilon == 4.0 and cfg.dp.clip == 2.0
    assert cfg.seed == 3 and cfg.releases == (epochs if recipe is Recipe.SCRATCH else 1)
    clear = recipe.client_config(artifacts=Path("a"), clip=2.0, budget=None, delta=1e-6, epochs=3)
    assert math.isinf(clear.dp.epsilon) and clear.total_epsilon is None and math.isinf(clear.label_epsilon)
    assert clear.dp.delta == 1e-6 and clear.epochs == 3


def test_what_a_run_reports():
    report = {"on_device": {"test_accuracy": 0.9}, "clean_test_accuracy": 0.5}
    assert Recipe.CLASS_SUMS.clean_accuracy(report) == 0.9 and Recipe.SCRATCH.clean_accuracy(report) == 0.5
    assert Recipe.PUBLIC.classifier == "class templates on the device" and Recipe.SCRATCH.classifier == "head + tail"
    assert Recipe.parse("Class-Sums") is Recipe.CLASS_SUMS
    with pytest.raises(UserError, match="unknown recipe 'dp'"):
        Recipe.parse("dp")
    with pytest.raises(UserError, match="total epsilon must be finite"):
        Budget(math.inf)
