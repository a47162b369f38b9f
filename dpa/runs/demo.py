"""``dpa demo``: the whole pipeline on the built-in data, in a few minutes on a laptop CPU.

Exports a small VGG-Face (64x64, width 0.25) cut after conv1_1, starts the edge
server on a free loopback port, and trains one device client twice, without noise
and with DP-A noise, each against a fresh tail, then prints held-out accuracy and the
privacy parameters of each run.
"""

from __future__ import annotations

import asyncio
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpa.contract.architecture import ArchConfig
from dpa.contract.devices import DeviceProfile
from dpa.contract.manifest import OptimizerConfig, OptimizerName
from dpa.privacy.mechanism import DPConfig
from dpa.runs.loopback import serve_and_train
from exporter.export import ExportConfig, export
from runtime_client.config import ClientConfig

__all__ = ["DemoConfig", "demo_summary", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path = Path("runs/demo")  # everything the demo writes
    arch: ArchConfig = field(
        default_factory=lambda: ArchConfig(image_size=64, width=0.25, num_classes=10, dropout=0.0)
    )  # small enough for 2 CPU cores
    cut: str = "conv1_1"  # the seed's cut
    optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(name=OptimizerName.ADAMW, lr=1e-3)
    )  # from scratch, AdamW gets VGG off the ground in a few epochs where SGD needs dozens
    epochs: int = 16
    batch_size: int = 8  # the seed's batch size
    # No noise, then DP-A. At conv1_1 a release has d = 65,536 elements at 64x64: the tail learns from
    # scratch only once the noise per element is well below the signal (see README). At 1e6 (SNR 2.75)
    # 2 of 4 seeds learned in 12 epochs; at 3e6 (SNR 4.8) 3 of 3 did.
    epsilons: tuple[float, ...] = (float("inf"), 3e6)
    clip: float = 100.0  # below the median activation norm at initialisation (~170): most examples are clipped
    delta: float = 1e-5
    seed: int = 0  # reproducible demo (the client warns that fixed seeds are for experiments)
    label_epsilon: float = 4.0  # the private run's labels, randomised per release (RRWithPrior)
    view_releases: int = 8  # training releases of each run recorded as the server's view (docs/server_view.md)


def run_demo(cfg: DemoConfig, say: Any = print) -> list[dict[str, Any]]:

    artifacts = cfg.workdir / "artifacts"
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    say(f"exporting VGG-Face {cfg.arch.image_size}x{cfg.arch.image_size} width {cfg.arch.width}, cut {cfg.cut}")
    export(ExportConfig(arch=cfg.arch, cut=cfg.cut, optimizer=cfg.optimizer, out=artifacts, seed=cfg.seed))
    reports = []
    for eps in cfg.epsilons:
        tag = "no-noise" if eps == float("inf") else f"eps{eps:g}"
        run_dir = cfg.workdir / tag
        shutil.rmtree(run_dir / "server-state", ignore_errors=True)
        client = ClientConfig(
            artifacts=artifacts,
            device=DeviceProfile.CPU,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            dp=DPConfig(clip=cfg.clip, epsilon=eps, delta=cfg.delta),
            label_epsilon=cfg.label_epsilon if math.isfinite(eps) else math.inf,
            seed=cfg.seed,
            state_dir=cfg.workdir / "client",  # shares the synthetic-data cache between runs
            report=run_dir / "report.json",
            record_view=run_dir / "view",
            record_view_limit=cfg.view_releases,
        )
        shutil.rmtree(run_dir / "view", ignore_errors=True)
        say(f"training with epsilon = {eps:g} per release (server on loopback, fresh tail)")
        reports.append(asyncio.run(serve_and_train(artifacts, run_dir / "server-state", client)))
    return reports


def demo_summary(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """``dpa demo --json``: one entry per run, whole-run epsilon from the accountant (null: no noise)."""
    runs = []
    for r in reports:
        p = r["privacy"]
        noisy = p["noise_scale"] > 0
        total = p["total"]["epsilon"]
        runs.append(
            {
                "name": "private" if noisy else "non-private",
                "epsilon_total": (total if math.isfinite(total) else "inf") if noisy else None,
                "delta": p["total"]["delta"] if noisy else None,
                "epsilon_per_release": p["epsilon_per_release"] if noisy else None,
                "releases_per_example": p["total"]["releases"],
                "clean_test_accuracy": r["clean_test_accuracy"],
                "private_test_accuracy": r["private_test_accuracy"],
                "chance": 1 / r["data"]["identities"],
                "label_epsilon": None if math.isinf(p["label_epsilon_per_release"]) else p["label_epsilon_per_release"],
                "cut": r["cut"],
                "view": r["view"],
            }
        )
    return {"runs": runs}
