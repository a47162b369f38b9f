"""``dpa sweep``: the paper's experiment, one private training run per epsilon, and beyond it.

For each per-release epsilon the sweep trains a fresh tail and head through the real
server and client (loopback HTTP), records per-epoch train/test accuracy and loss,
the total epsilon spent over the run (dp-accounting's PLD accountant), and the
inversion attack's SSIM at that epsilon. It writes CSV + JSON and three PNG figures:
accuracy vs epoch, loss vs epoch (one curve per epsilon, like the seed's figures),
and a privacy-utility figure.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from rich.progress import Progress

from dpa.audit.config import InversionConfig
from dpa.audit.figures import write_grid
from dpa.audit.inversion import run_inversion
from dpa.contract.architecture import ArchConfig
from dpa.contract.atomic import atomic_write_bytes
from dpa.contract.devices import DeviceProfile
from dpa.contract.manifest import OptimizerConfig, OptimizerName, load_manifest
from dpa.faces.synth import SynthConfig, write_synthetic_faces
from dpa.privacy.accountant import epsilon_spent
from dpa.privacy.mechanism import DPConfig
from dpa.runs.loopback import serve_and_train
from exporter.export import ExportConfig, export
from runtime_client.config import ClientConfig

__all__ = ["SweepConfig", "run_sweep", "write_plots"]


@dataclass(frozen=True)
class SweepConfig:
    workdir: Path = Path("runs/sweep")  # export, per-run state, results and plots
    epsilons: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)  # per release, as the seed's figures
    epochs: int = 8
    data: str = "synthetic"  # or an LFW-layout folder
    identities: int = 10  # synthetic data set size
    per_identity: int = 40
    arch: ArchConfig = field(default_factory=lambda: ArchConfig(image_size=64, width=0.25, num_classes=10, dropout=0.0))
    cut: str = "conv1_1"
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name=OptimizerName.ADAMW, lr=1e-3))
    batch_size: int = 8
    clip: float = 100.0
    delta: float = 1e-5
    seed: int = 0
    attack: bool = True  # measure inversion SSIM per epsilon
    attack_epochs: int = 20  # decoder training epochs of the inversion attack
    attack_aux_identities: int = 16  # the attacker's own faces (identities disjoint from the victims)
    attack_victim_identities: int = 4
    attack_images_per_identity: int = 16
    max_steps_per_epoch: int | None = None  # cap for quick runs


def _tag(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def run_sweep(cfg: SweepConfig, *, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train one run per epsilon, attack each setting, write results; returns the results dict."""

    cfg.workdir.mkdir(parents=True, exist_ok=True)
    artifacts = cfg.workdir / "artifacts"
    data = cfg.data
    if data == "synthetic":  # drawn once, so every run trains and tests on the same images
        folder = cfg.workdir / "data"
        if not folder.is_dir():
            synth = SynthConfig(cfg.identities, cfg.per_identity, cfg.arch.image_size, cfg.seed)
            write_synthetic_faces(folder, synth)
        data = str(folder)
    if not _same_export(artifacts, cfg):
        say(f"exporting VGG-Face {cfg.arch.image_size}px width {cfg.arch.width}, cut {cfg.cut}")
        export(ExportConfig(arch=cfg.arch, cut=cfg.cut, optimizer=cfg.optimizer, out=artifacts, seed=cfg.seed))
    runs: list[dict[str, Any]] = []
    for eps in cfg.epsilons:
        run_dir = cfg.workdir / f"eps-{_tag(eps)}"
        dp = DPConfig(clip=cfg.clip, epsilon=eps, delta=cfg.delta)
        report = _finished_run(run_dir / "report.json", cfg, dp)
        client = ClientConfig(
            artifacts=artifacts,
            data=data,
            device=DeviceProfile.CPU,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            dp=dp,
            seed=cfg.seed,
            state_dir=cfg.workdir / "client" / _tag(eps),
            report=run_dir / "report.json",
            max_steps_per_epoch=cfg.max_steps_per_epoch,
        )
        if report is None:
            shutil.rmtree(run_dir, ignore_errors=True)
            say(f"training with epsilon = {_tag(eps)} per release")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the sweep's fixed seed and epsilon = inf are deliberate
                report = asyncio.run(serve_and_train(artifacts, run_dir / "server-state", client))
        else:
            say(f"epsilon = {_tag(eps)}: reusing the finished run in {run_dir}")
        total = (
            math.inf
            if math.isinf(eps)
            else epsilon_spent(
                mechanism=dp.mechanism, noise_multiplier=dp.noise_multiplier, releases=cfg.epochs, delta=cfg.delta
            )
        )
        runs.append(
            {
                "epsilon_per_release": eps,
                "total_epsilon": total,
                "delta": cfg.delta,
                "noise_multiplier": report["privacy"]["noise_multiplier"],
                "snr_per_element": report["privacy"]["snr_per_element"],
                "epochs": report["epochs"],
                "final_test_accuracy": report["final_test_accuracy"],
            }
        )
    baseline = None
    if cfg.attack:
        say("inversion attack per epsilon (head weights known, auxiliary identities)")
        ssim, baseline = _inversion_ssim(cfg, artifacts)
        for run in runs:
            run["inversion_ssim"] = ssim.get(run["epsilon_per_release"])
    results = {
        "config": {
            "epsilons": [_tag(e) for e in cfg.epsilons],
            "epochs": cfg.epochs,
            "data": cfg.data,
            "cut": cfg.cut,
            "image_size": cfg.arch.image_size,
            "width": cfg.arch.width,
            "clip": cfg.clip,
            "delta": cfg.delta,
            "optimizer": cfg.optimizer.name.value,
            "lr": cfg.optimizer.lr,
        },
        "runs": runs,
        # SSIM of the attacker's mean auxiliary face against the victims: what a guess without data scores.
        "inversion_baseline_ssim": baseline,
    }
    _write_results(cfg.workdir, results)
    write_plots(results, cfg.workdir)
    return results


def _same_export(artifacts: Path, cfg: SweepConfig) -> bool:

    try:
        m = load_manifest(artifacts, verify=("head", "tail"))
    except ValueError:
        return False
    want = (
        cfg.cut,
        cfg.arch.image_size,
        cfg.arch.width,
        cfg.arch.num_classes,
        cfg.arch.dropout,
        cfg.optimizer,
        cfg.seed,
    )
    return (m.cut, m.image_size, m.width, m.num_classes, m.dropout, m.optimizer, m.seed) == want


def _finished_run(path: Path, cfg: SweepConfig, dp: Any) -> dict[str, Any] | None:
    """A report left by an earlier sweep of the same settings, so a re-run resumes where it stopped."""
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    privacy = report.get("privacy", {})
    same = (
        len(report.get("epochs", [])) == cfg.epochs
        and privacy.get("clip") == cfg.clip
        and privacy.get("noise_scale") == dp.noise_scale
        and report.get("training", {}).get("batch_size") == cfg.batch_size
    )
    return report if same else None


def _inversion_ssim(cfg: SweepConfig, artifacts: Path) -> tuple[dict[float, float], float]:
    """Mean victim SSIM of the inversion attack per epsilon, on the sweep's own export (head weights known)."""

    with Progress() as bar:
        task = bar.add_task("inversion attack", total=None)
        report = _run_attack(
            cfg, artifacts, lambda text, done, total: bar.update(task, description=text, completed=done, total=total)
        )
    write_grid(report, cfg.workdir / "inversion.png")
    atomic_write_bytes(cfg.workdir / "inversion.json", (json.dumps(report.to_json(), indent=2) + "\n").encode())
    return {r.epsilon: r.ssim_mean for r in report.results}, report.baseline_ssim_mean


def _run_attack(cfg: SweepConfig, artifacts: Path, progress: Callable[[str, int, int], None]) -> Any:

    return run_inversion(
        InversionConfig(
            artifacts=artifacts,
            epsilons=cfg.epsilons,
            clip=cfg.clip,
            delta=cfg.delta,
            aux_identities=cfg.attack_aux_identities,
            victim_identities=cfg.attack_victim_identities,
            images_per_identity=cfg.attack_images_per_identity,
            epochs=cfg.attack_epochs,
            seed=cfg.seed,
            cache_dir=cfg.workdir / "attack-data",
        ),
        progress=progress,
    )


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _write_results(workdir: Path, results: dict[str, Any]) -> None:
    atomic_write_bytes(workdir / "sweep.json", (json.dumps(_json_safe(results), indent=2) + "\n").encode())
    rows = [
        ["epsilon_per_release", "total_epsilon", "epoch", "train_loss", "train_accuracy", "test_accuracy"],
    ]
    for run in results["runs"]:
        for e in run["epochs"]:
            rows.append(
                [
                    _tag(run["epsilon_per_release"]),
                    _tag(run["total_epsilon"]),
                    e["epoch"],
                    f"{e['train_loss']:.6f}",
                    f"{e['train_accuracy']:.6f}",
                    f"{e['test_accuracy']:.6f}",
                ]
            )

    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    atomic_write_bytes(workdir / "sweep.csv", buf.getvalue().encode())


def write_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """accuracy.png and loss.png (vs epoch, one curve per epsilon) and privacy_utility.png."""

    runs = results["runs"]
    paths = []
    for key, ylabel, name in (
        ("test_accuracy", "held-out accuracy", "accuracy.png"),
        ("train_loss", "training loss", "loss.png"),
    ):
        fig = Figure(figsize=(6, 4), dpi=120)
        ax = fig.subplots()
        for run in runs:
            xs = [e["epoch"] for e in run["epochs"]]
            ax.plot(
                xs, [e[key] for e in run["epochs"]], marker="o", ms=3, label=f"ε = {_tag(run['epsilon_per_release'])}"
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(f"DP-A, cut {results['config']['cut']}: {ylabel} (ε per release)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path)
        paths.append(path)

    fig = Figure(figsize=(10, 4), dpi=120)
    ax1, ax2 = fig.subplots(1, 2)
    labels = [_tag(r["epsilon_per_release"]) for r in runs]
    xs = range(len(runs))
    ax1.bar(xs, [r["final_test_accuracy"] for r in runs], color="tab:blue")
    ax1.set_xticks(list(xs), labels)
    ax1.set_xlabel("ε per release")
    ax1.set_ylabel("final held-out accuracy")
    ax1.set_title("utility")
    for x, r in zip(xs, runs, strict=True):
        total = f"{r['total_epsilon']:.3g}" if math.isfinite(r["total_epsilon"]) else "inf"
        ax1.annotate(f"total ε\n{total}", (x, r["final_test_accuracy"]), ha="center", va="bottom", fontsize=7)
    ax1.set_ylim(0, max(r["final_test_accuracy"] for r in runs) * 1.25 + 0.01)
    ssim = [r.get("inversion_ssim") for r in runs]
    ax2.bar(xs, [s if s is not None else 0.0 for s in ssim], color="tab:red")
    ax2.axhline(0.3, color="k", ls="--", lw=1, label="recognisable (SSIM 0.3, He et al. 2021)")
    if results.get("inversion_baseline_ssim") is not None:
        ax2.axhline(
            results["inversion_baseline_ssim"],
            color="tab:gray",
            ls=":",
            lw=1.5,
            label="attacker's mean face, no data (baseline)",
        )
    ax2.set_xticks(list(xs), labels)
    ax2.set_xlabel("ε per release")
    ax2.set_ylabel("inversion SSIM (mean over victims)")
    ax2.set_title("privacy (lower is better)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "privacy_utility.png"
    fig.savefig(path)
    paths.append(path)
    return paths
