"""The device's recovery paths, each forced deterministically (the kill test hits them by chance).

- The device dies after the server applied a step, before the device saved it: on
  ``--resume`` it fetches the stored reply instead of sending the batch again, and the
  run ends with the weights of an uninterrupted run.
- The server lost steps (``checkpoint_every > 1`` and a crash): the device renumbers the
  same release, sends it again, and counts the rollback.
"""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import replace

import numpy as np
import pytest

from dpa.contract.devices import resolve_device
from dpa.contract.manifest import load_manifest, manifest_sha256
from dpa.faces.synth import SynthConfig
from dpa.privacy.mechanism import DPActivations, DPConfig
from runtime_client.config import ClientConfig
from runtime_client.edge import EdgeClient
from runtime_client.head import HEAD_CHECKPOINT, HeadModel, load_head_checkpoint
from runtime_client.split_step import SplitTrainer
from runtime_client.trainer import run_training


class DeviceDied(BaseException):
    """Stands for SIGKILL: raised from inside the run, caught by nobody but the test."""


def _train(cfg: ClientConfig) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return asyncio.run(run_training(cfg))


def _head_weights(path) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    return load_head_checkpoint(path)[0]


def test_device_killed_between_server_step_and_its_own_save(small_export, start_server, tmp_path, monkeypatch):
    base = ClientConfig(
        artifacts=small_export,
        epochs=2,
        batch_size=4,
        dp=DPConfig(clip=50.0, epsilon=2.0),  # real noise: the replay must also restore the noise stream
        synth=SynthConfig(identities=6, per_identity=6),
        max_steps_per_epoch=3,
        progress=False,
        seed=5,
    )
    reference_server = start_server(small_export, state_dir=tmp_path / "ref-server")
    _train(replace(base, server=reference_server.url, state_dir=tmp_path / "ref"))
    want_tail = reference_server.state.tail.parameters()
    want_head = _head_weights(tmp_path / "ref" / HEAD_CHECKPOINT)

    server = start_server(small_export, state_dir=tmp_path / "server")
    cfg = replace(base, server=server.url, state_dir=tmp_path / "device")
    saves = {"n": 0}
    original = HeadModel.save

    def dying_save(self, path):  # type: ignore[no-untyped-def]
        saves["n"] += 1
        if saves["n"] == 4:  # 1: session opened, 2-3: steps 1-2; the 4th would record step 3
            raise DeviceDied
        original(self, path)

    monkeypatch.setattr(HeadModel, "save", dying_save)
    with pytest.raises(DeviceDied):
        _train(cfg)
    assert server.state.tail.global_step == 3  # the server applied step 3; the device never saved it
    monkeypatch.setattr(HeadModel, "save", original)
    report = _train(replace(cfg, resume=True))
    assert server.state.tail.global_step == 6 and server.state.metrics.replayed_steps == 0
    assert report["resilience"]["session_steps"] == 6
    for name, value in want_tail.items():
        np.testing.assert_array_equal(server.state.tail.parameters()[name], value, err_msg=name)
    got_head = _head_weights(tmp_path / "device" / HEAD_CHECKPOINT)
    for name, value in want_head.items():
        np.testing.assert_array_equal(got_head[name], value, err_msg=name)


@pytest.mark.parametrize("micro_batch", [None, 1], ids=["whole-batch", "streamed-micro-batch"])
def test_device_renumbers_its_release_when_the_server_rolled_back(small_export, start_server, micro_batch):
    server = start_server(small_export)
    manifest = load_manifest(small_export)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, *manifest.input_shape), dtype=np.float32)
    labels = np.array([0, 1], np.int64)

    async def run() -> tuple[int, int, int]:
        head = HeadModel(small_export, manifest, resolve_device("cpu"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dp = DPActivations(DPConfig(clip=50.0, epsilon=4.0), np.random.default_rng(1))
        async with EdgeClient(server.url) as edge:
            session = await edge.open_session(manifest_sha256(small_export))
            trainer = SplitTrainer(head, edge, session.session_id, dp, micro_batch=micro_batch)
            for _ in range(3):
                await trainer.step(images, labels)
            server.state.sessions.sessions[session.session_id].step = 1  # as if it restarted from step 1
            result = await trainer.step(images, labels)
            return trainer.step_number, trainer.rollbacks, result.global_step

    step, rollbacks, global_step = asyncio.run(run())
    assert (step, rollbacks, global_step) == (2, 1, 4)
