"""Two devices train against one server at once: both finish and no update is lost."""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import replace

import pytest

from dpa.faces.synth import SynthConfig
from dpa.privacy.mechanism import DPConfig
from runtime_client.config import ClientConfig
from runtime_client.trainer import run_training


def test_two_clients_concurrently(small_export, start_server, tmp_path):
    server = start_server(small_export)
    base = ClientConfig(
        server=server.url,
        artifacts=small_export,
        epochs=2,
        batch_size=4,
        dp=DPConfig(clip=50.0, epsilon=16.0),
        synth=SynthConfig(identities=6, per_identity=8),
        max_steps_per_epoch=3,
        progress=False,
    )

    async def both():  # type: ignore[no-untyped-def]
        return await asyncio.gather(
            run_training(replace(base, state_dir=tmp_path / "a", seed=1)),
            run_training(replace(base, state_dir=tmp_path / "b", seed=2)),
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fixed seeds warn by design
        a, b = asyncio.run(both())
    assert len(a["epochs"]) == len(b["epochs"]) == 2
    assert server.state.tail.global_step == 2 * 2 * 3
    assert server.state.tail.examples_seen == 2 * 2 * 3 * 4
    assert server.state.sessions.sessions == {}  # both closed their sessions


def test_resume_continues_from_the_checkpoint(small_export, start_server, tmp_path):
    server = start_server(small_export)
    cfg = ClientConfig(
        server=server.url,
        artifacts=small_export,
        epochs=1,
        batch_size=4,
        dp=DPConfig(clip=50.0, epsilon=16.0),
        synth=SynthConfig(identities=6, per_identity=8),
        max_steps_per_epoch=2,
        progress=False,
        state_dir=tmp_path / "c",
        report=tmp_path / "r.json",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        asyncio.run(run_training(cfg))
        report = asyncio.run(run_training(replace(cfg, epochs=2, resume=True)))
    assert [e["epoch"] for e in report["epochs"]] == [1, 2]  # epoch 1 was not repeated
    assert server.state.tail.global_step == 4
    with pytest.raises(ValueError, match="--resume: no head checkpoint"):
        asyncio.run(run_training(replace(cfg, resume=True, state_dir=tmp_path / "empty")))
