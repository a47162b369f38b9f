"""The device's head step on plain onnxruntime (the export's gradient graph and the numpy optimizer) against
onnxruntime-training's Module and Optimizer, in the same run: forward, backward and step of a batch of 8.

Usage: python scripts/head_step_plain.py   (about 2 min on 2 cores; BENCHMARKS.md's run Q)
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dpa.base.timing import median_seconds
from dpa.contract.architecture import ArchConfig
from dpa.contract.devices import resolve_device
from dpa.contract.manifest import ARTIFACT_FILES, OptimizerConfig, load_manifest
from dpa.contract.ort_training import CheckpointState, Module, Optimizer, session_options
from exporter.export import ExportConfig, export
from runtime_client.head import HeadModel

SMALL = ArchConfig(image_size=64, width=0.25, num_classes=10, dropout=0.0)
PAPER = ArchConfig(image_size=224, width=1.0, num_classes=10, dropout=0.0)
CASES = (("small", SMALL, "conv1_1", 30), ("small", SMALL, "pool3", 15), ("paper", PAPER, "conv1_1", 10))


def _steps(arch: ArchConfig, cut: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """(the training API's step, the plain one) on the same export and batch."""
    art = Path(tempfile.mkdtemp()) / "export"
    export(ExportConfig(arch=arch, cut=cut, optimizer=OptimizerConfig(lr=1e-3), out=art, verify=False))
    m, device = load_manifest(art), resolve_device("cpu")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, *m.input_shape)).astype(np.float32)
    u = rng.standard_normal((8, *m.activation_shape)).astype(np.float32)
    ours = HeadModel(art, m, device)
    head = art / "head"
    state = CheckpointState.load_checkpoint(str(head / ARTIFACT_FILES.checkpoint))
    module = Module(str(head / ARTIFACT_FILES.training), state, str(head / ARTIFACT_FILES.eval), device="cpu",
                    session_options=session_options(device.threads))  # fmt: skip
    optimizer = Optimizer(str(head / ARTIFACT_FILES.optimizer), module)

    def api() -> None:
        module.eval()
        module(x)
        module.train()
        module(x, u)
        optimizer.step()
        module.lazy_reset_grad()

    def plain() -> None:  # the release's forward keeps what the backward reads (exporter.saved_forward)
        ours.forward(x, keep=True)
        ours.backward_step(x, u)

    return api, plain


def main() -> None:
    for name, arch, cut, repeats in CASES:
        api, plain = _steps(arch, cut)
        pairs = [(median_seconds(api, repeats), median_seconds(plain, repeats)) for _ in range(3)]  # interleaved
        t_api, t_plain = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        print(f"{name} {cut}: training API {t_api * 1e3:.1f} ms, plain onnxruntime {t_plain * 1e3:.1f} ms, "
              f"ratio {t_plain / t_api:.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
