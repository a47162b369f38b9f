"""--total-epsilon: the whole run stays within budget, survives --resume, and refuses to overspend."""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import replace

import pytest

from dpa.faces.synth import SynthConfig
from dpa.privacy.accountant import BudgetExceeded, calibrate_noise_multiplier, epsilon_spent
from dpa.privacy.mechanism import DPConfig, Mechanism
from runtime_client.config import ClientConfig
from runtime_client.head import HEAD_CHECKPOINT
from runtime_client.trainer import run_training

BUDGET = 8.0


def _run(cfg):  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return asyncio.run(run_training(cfg))


def test_total_budget_calibrates_tracks_and_refuses(small_export, start_server, tmp_path):
    server = start_server(small_export)
    cfg = ClientConfig(
        server=server.url,
        artifacts=small_export,
        epochs=2,
        batch_size=4,
        dp=DPConfig(clip=50.0, epsilon=None, delta=1e-5),  # planned from the budget
        synth=SynthConfig(identities=6, per_identity=8),
        max_steps_per_epoch=2,
        progress=False,
        state_dir=tmp_path / "client",
        report=tmp_path / "r.json",
        total_epsilon=BUDGET,
        seed=3,
        label_epsilon=float("inf"),  # the activations' budget alone (test_label_dp_run covers the labels')
    )
    report = _run(cfg)
    z = calibrate_noise_multiplier(mechanism=Mechanism.GAUSSIAN, total_epsilon=BUDGET, delta=1e-5, releases=2)
    privacy = report["privacy"]
    assert privacy["noise_multiplier"] == pytest.approx(z)  # calibrated for the whole run of 2 epochs
    assert privacy["noise_scale"] == pytest.approx(z * 2 * 50.0)
    spent_one = epsilon_spent(mechanism=Mechanism.GAUSSIAN, noise_multiplier=z, releases=1, delta=1e-5)
    assert privacy["epsilon_per_release"] == pytest.approx(spent_one)
    assert [e["epsilon_spent"] for e in report["epochs"]] == [pytest.approx(spent_one), privacy["total"]["epsilon"]]
    assert privacy["total"]["releases"] == 2
    assert BUDGET * 0.99 < privacy["total"]["epsilon"] <= BUDGET  # reached, not exceeded

    steps = server.state.tail.global_step
    checkpoint = (tmp_path / "client" / HEAD_CHECKPOINT).read_bytes()
    with pytest.raises(BudgetExceeded, match="budget"):
        _run(replace(cfg, epochs=3, resume=True))  # a third release of every example would overspend
    assert server.state.tail.global_step == steps  # nothing was sent
    assert (tmp_path / "client" / HEAD_CHECKPOINT).read_bytes() == checkpoint

    with pytest.raises(ValueError, match="started with a total budget of 8, not 4"):
        _run(replace(cfg, resume=True, total_epsilon=4.0))
    with pytest.raises(ValueError, match="total epsilon must be finite"):
        replace(cfg, total_epsilon=float("inf"))
