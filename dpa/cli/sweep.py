"""``dpa sweep``: accuracy, loss, total epsilon and inversion SSIM per epsilon, with plots."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dpa.cli.errors import console, parse_epsilons, user_errors


def sweep_command(
    epsilons: Annotated[str, typer.Option(help="Per-release epsilons, comma-separated ('inf' = no noise).")] = (
        "0.5,1,2,4,8,inf"
    ),
    epochs: Annotated[int, typer.Option(help="Epochs per run.")] = 8,
    data: Annotated[str, typer.Option(help="'synthetic' or an LFW-layout folder.")] = "synthetic",
    clip: Annotated[float, typer.Option(help="Per-example activation norm bound C.")] = 100.0,
    delta: Annotated[float, typer.Option(help="delta per release.")] = 1e-5,
    attack: Annotated[bool, typer.Option(help="Measure inversion SSIM per epsilon.")] = True,
    out: Annotated[Path, typer.Option(help="Work and results folder.")] = Path("runs/sweep"),
) -> None:
    """The paper's experiment: one private training run per epsilon through the real server and client."""
    from dpa.runs.sweep import SweepConfig, run_sweep

    with user_errors():
        cfg = SweepConfig(
            workdir=out,
            epsilons=parse_epsilons(epsilons),
            epochs=epochs,
            data=data,
            clip=clip,
            delta=delta,
            attack=attack,
        )
        results = run_sweep(cfg, say=lambda msg: console.print(f"[bold cyan]>[/] {msg}"))
    table = Table(title=f"DP-A sweep, cut {results['config']['cut']}, {epochs} epochs")
    for col in ("ε / release", "total ε (PLD)", "SNR / element", "final test acc", "inversion SSIM"):
        table.add_column(col, justify="right")
    for r in results["runs"]:
        ssim = r.get("inversion_ssim")
        table.add_row(
            "inf" if r["epsilon_per_release"] == float("inf") else f"{r['epsilon_per_release']:g}",
            "inf" if r["total_epsilon"] == float("inf") else f"{r['total_epsilon']:.3g}",
            f"{r['snr_per_element']:.3g}",
            f"{r['final_test_accuracy']:.3f}",
            "-" if ssim is None else f"{ssim:.3f}",
        )
    console.print(table)
    console.print(f"results: {out}/sweep.csv, sweep.json; plots: accuracy.png, loss.png, privacy_utility.png")
