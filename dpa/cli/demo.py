"""``dpa demo``: export, serve and train on synthetic faces, with and without DP noise."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dpa.cli.errors import console, user_errors


def demo_command(
    workdir: Annotated[Path, typer.Option(help="Folder for the export, data and reports.")] = Path("runs/demo"),
    epochs: Annotated[int, typer.Option(help="Epochs per run.")] = 16,
    epsilon: Annotated[float, typer.Option(help="Per-release epsilon of the noisy run.")] = 3e6,
) -> None:
    """The whole pipeline in minutes: held-out accuracy with and without DP-A noise."""
    from dpa.runs.demo import DemoConfig, run_demo

    warnings.filterwarnings("ignore", message=".*seed.*experiments.*")  # the demo's fixed seed is deliberate
    with user_errors():
        reports = run_demo(
            DemoConfig(workdir=workdir, epochs=epochs, epsilons=(float("inf"), epsilon)),
            say=lambda msg: console.print(f"[bold cyan]>[/] {msg}"),
        )
    table = Table(title="DP-A on synthetic faces (held-out accuracy)")
    for col in (
        "epsilon / release",
        "delta",
        "noise sigma",
        "clip C",
        "noise multiplier",
        "SNR / element",
        "test accuracy",
    ):
        table.add_column(col, justify="right")
    for r in reports:
        p = r["privacy"]
        table.add_row(
            "inf (no noise)" if p["epsilon_per_release"] == float("inf") else f"{p['epsilon_per_release']:g}",
            f"{p['delta_per_release']:g}",
            f"{p['noise_scale']:.4g}",
            f"{p['clip']:g}",
            f"{p['noise_multiplier']:.4g}",
            f"{p['snr_per_element']:.3g}",
            f"{r['final_test_accuracy']:.3f}",
        )
    console.print(table)
    n = reports[0]["data"]["identities"]
    console.print(
        f"chance is {1 / n:.3f} ({n} identities). epsilon is per release; each epoch releases every training "
        "example once. Labels travel in clear. SNR / element = C / sqrt(d) / noise std: below ~1 the tail "
        "cannot learn from scratch in a few epochs. Reports: "
        + ", ".join(str(workdir / d / "report.json") for d in ("no-noise", f"eps{epsilon:g}"))
    )
