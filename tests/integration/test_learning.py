"""DP-A training learns on the built-in synthetic faces, and noise costs accuracy.

The earlier demo's configuration (64x64 VGG-Face, width 0.25, cut conv1_1, 10 identities, from scratch),
run through the real server on loopback, without noise and with noise at SNR 4.8 per
element (epsilon 3e6 per release; README explains why conv1_1 needs it this large).
Fixed seeds make the run repeatable; the figures are printed.

Whether a noisy run from scratch takes off within 12 epochs, and when, depends on the
seed and even on float rounding: after the tail's conv gradients changed kernels (same
gradients to 1e-6), seed 1 stayed at chance for 12 epochs while seeds 0 and 2 learned,
and seed 0's held-out accuracy reached 0.15-0.25 over its last epochs where it had
ended at 0.35. So "learns" is asserted on the training loss against the chance loss
ln(10), and on the held-out accuracy averaged over the last epochs, not on one epoch.
"""

from __future__ import annotations

import asyncio
import math
import warnings

import numpy as np

from dpa.contract.architecture import ArchConfig
from dpa.contract.manifest import OptimizerConfig, OptimizerName
from dpa.privacy.mechanism import DPConfig
from dpa.runs.loopback import serve_and_train
from exporter.export import ExportConfig, export
from runtime_client.config import ClientConfig

EPOCHS = 12


def _run(tmp_path, artifacts, epsilon):  # type: ignore[no-untyped-def]
    """The earlier demo's from-scratch run: clip 100, AdamW, labels in clear, per-release epsilon."""
    tag = f"{epsilon:g}"
    cfg = ClientConfig(
        artifacts=artifacts, epochs=EPOCHS, batch_size=8, dp=DPConfig(clip=100.0, epsilon=epsilon, delta=1e-5),
        label_epsilon=float("inf"), seed=0, state_dir=tmp_path / "client", progress=False,
    )  # fmt: skip
    return asyncio.run(serve_and_train(artifacts, tmp_path / f"server-{tag}", cfg))


def test_noisy_and_clean_runs_learn(tmp_path):
    artifacts = tmp_path / "artifacts"
    arch = ArchConfig(image_size=64, width=0.25, num_classes=10, dropout=0.0)
    export(ExportConfig(arch=arch, cut="conv1_1", optimizer=OptimizerConfig(name=OptimizerName.ADAMW, lr=1e-3),
                        out=artifacts, seed=0))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fixed seed and epsilon = inf warn by design
        clean, noisy = _run(tmp_path, artifacts, float("inf")), _run(tmp_path, artifacts, 3e6)
    chance = 1 / clean["data"]["identities"]
    acc = {name: [e["test_accuracy"] for e in r["epochs"]] for name, r in (("clean", clean), ("noisy", noisy))}
    loss = {name: r["epochs"][-1]["train_loss"] for name, r in (("clean", clean), ("noisy", noisy))}
    print(f"held-out accuracy per epoch (chance {chance:.2f}): {acc}; final train loss {loss}")
    assert noisy["privacy"]["noise_scale"] > 0 and clean["privacy"]["noise_scale"] == 0
    # Guessing gives a cross-entropy of ln(10) = 2.30 at best; a run stuck at chance stays there.
    assert loss["noisy"] < math.log(clean["data"]["identities"]) - 0.3
    # 100 held-out images: one epoch's accuracy at chance (0.10) has a standard deviation of 0.03.
    assert np.mean(acc["noisy"][-4:]) >= chance + 0.07
    # Without noise it learns too. Which of the two ends lower depends on the noise draw at SNR 4.8: with
    # PCG64 streams the clean run ended 0.1 lower; with the AES-CTR streams and snapping of issue 15, the
    # noisy one did (1.25 vs 1.28, held-out 0.33 vs 0.31 over the last epochs). So no order is asserted.
    assert loss["clean"] < math.log(clean["data"]["identities"]) - 0.3
    assert np.mean(acc["clean"][-4:]) >= chance + 0.07
    # Both accuracies, measured two ways: private split inference through the server's tail, and the
    # trained head + tail run offline on clean activations. Without noise the two paths see the same
    # inputs and must agree exactly; with noise on they differ.
    print(f"clean / private: no noise {clean['clean_test_accuracy']} / {clean['private_test_accuracy']}, "
          f"noisy {noisy['clean_test_accuracy']} / {noisy['private_test_accuracy']}")  # fmt: skip
    assert clean["clean_test_accuracy"] == clean["private_test_accuracy"] == acc["clean"][-1]
    assert noisy["private_test_accuracy"] == acc["noisy"][-1]
    assert noisy["clean_test_accuracy"] != noisy["private_test_accuracy"]
