"""A --seed reproduces a noisy run exactly (AES counter-mode streams, the saved generator state); no seed never does."""

from __future__ import annotations

import asyncio
import warnings

import numpy as np

from dpa.faces.synth import SynthConfig
from dpa.privacy.mechanism import DPConfig
from runtime_client.config import ClientConfig
from runtime_client.head import HEAD_CHECKPOINT, load_head_checkpoint
from runtime_client.trainer import run_training


def _train(small_export, server, state_dir, seed):  # type: ignore[no-untyped-def]
    cfg = ClientConfig(
        server=server.url,
        artifacts=small_export,
        epochs=1,
        batch_size=4,
        dp=DPConfig(clip=10.0, epsilon=1e4),  # noise that moves the weights, yet learns
        synth=SynthConfig(identities=6, per_identity=8),
        max_steps_per_epoch=3,
        progress=False,
        state_dir=state_dir,
        seed=seed,
        split_seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixed seed warns, as it should
        report = asyncio.run(run_training(cfg))
    return report, load_head_checkpoint(state_dir / HEAD_CHECKPOINT)[0]


def test_a_seed_reproduces_a_noisy_run_and_no_seed_does_not(small_export, start_server, tmp_path):
    runs = [
        _train(small_export, start_server(small_export), tmp_path / f"run{i}", seed)
        for i, seed in enumerate((5, 5, None))
    ]
    (r1, w1), (r2, w2), (_, w3) = runs
    assert r1["epochs"][0]["train_loss"] == r2["epochs"][0]["train_loss"]
    for name in w1:
        np.testing.assert_array_equal(w1[name], w2[name], err_msg=name)
    assert any(not np.array_equal(w1[name], w3[name]) for name in w1)  # fresh OS entropy: other noise
