"""``dpa demo``: export, serve and train on synthetic faces, with and without DP noise."""

from __future__ import annotations

import json
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
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the runs' figures here as JSON.")] = None,
) -> None:
    """The whole pipeline in minutes: clean and private held-out accuracy with and without DP-A noise."""
    from dpa.contract.atomic import atomic_write_bytes
    from dpa.runs.demo import DemoConfig, demo_summary, run_demo

    warnings.filterwarnings("ignore", message=".*seed.*experiments.*")  # the demo's fixed seed is deliberate
    with user_errors():
        reports = run_demo(
            DemoConfig(workdir=workdir, epochs=epochs, epsilons=(float("inf"), epsilon)),
            say=lambda msg: console.print(f"[bold cyan]>[/] {msg}"),
        )
        summary = demo_summary(reports)
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(json_out, (json.dumps(summary, indent=2) + "\n").encode())
    table = Table(title="DP-A on synthetic faces (held-out accuracy)")
    for col in ("run", "cut", "ε whole run", "δ", "ε / release", "releases / example", "clean acc", "private acc"):
        table.add_column(col, justify="right")
    for run in summary["runs"]:
        table.add_row(
            run["name"],
            run["cut"],
            "-" if run["epsilon_total"] is None else _num(run["epsilon_total"]),
            "-" if run["delta"] is None else f"{run['delta']:g}",
            "-" if run["epsilon_per_release"] is None else _num(run["epsilon_per_release"]),
            str(run["releases_per_example"]),
            f"{run['clean_test_accuracy']:.3f}",
            f"{run['private_test_accuracy']:.3f}",
        )
    console.print(table)
    n = reports[0]["data"]["identities"]
    console.print(
        f"chance is {1 / n:.3f} ({n} identities). clean acc: the trained head + tail on clean inputs (on the "
        "device); private acc: held-out images released with the same noise and classified by the server. "
        "ε whole run composes every release of an example (dp-accounting PLD; inf above 1e5). Labels travel "
        "in clear. Reports and recorded views: " + ", ".join(str(workdir / d) for d in ("no-noise", f"eps{epsilon:g}"))
    )
    if json_out is not None:
        console.print(f"wrote {json_out}")


def _num(x: float | str) -> str:
    return x if isinstance(x, str) else f"{x:.3g}"
