"""`dpa demo` over several seeds: the mean and range of every run's figures, as the README quotes them.

Usage: python scripts/demo_seeds.py [SEEDS] [WORKDIR] [JSON]
       (defaults: 3 runs/demo-seeds runs/demo-seeds.json)

Each seed is the whole demo (``dpa demo --seed S --workdir WORKDIR/seed-S``): its own public
pretraining (float32), exports, and the four runs on the same private faces. So the range covers
what a seed changes: initialisation, shuffling, noise. A newcomer's fresh `dpa demo` is seed 0.
Writes every seed's ``demo --json`` summary and the spread to JSON.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from statistics import mean

from rich.console import Console
from rich.table import Table

from dpa.runs.demo import DemoConfig, demo_summary, run_demo

_FIGURES = ("clean_test_accuracy", "share_of_nonprivate", "private_test_accuracy", "verification_auc", "epsilon_total")


def main() -> None:
    seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    workdir = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/demo-seeds")
    out = Path(sys.argv[3] if len(sys.argv) > 3 else "runs/demo-seeds.json")
    console = Console()
    warnings.simplefilter("ignore")  # fixed seeds and the non-private run warn by design
    summaries = []
    for seed in range(seeds):
        console.print(f"[bold cyan]>[/] seed {seed}")
        cfg = DemoConfig(workdir=workdir / f"seed-{seed}", seed=seed)  # the shipped weights: one public network
        summaries.append(demo_summary(run_demo(cfg, say=lambda msg: console.print(f"  {msg}"))))
    spread = {}
    for i, run in enumerate(summaries[0]["runs"]):
        values = {k: [s["runs"][i][k] for s in summaries] for k in _FIGURES}
        spread[run["name"]] = {k: None if any(x is None for x in v) else _spread(v) for k, v in values.items()}
    ref = next(i for i, r in enumerate(summaries[0]["runs"]) if r["epsilon_total"] is None)  # non-private
    recipes = {  # the reference's every recipe (class templates, head + tail, linear probe, fine-tune)
        name: _spread([s["runs"][ref]["recipes"][name] for s in summaries])
        for name in summaries[0]["runs"][ref]["recipes"]
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"seeds": summaries, "spread": spread, "recipes": recipes, "cpu": summaries[0]["cpu"]}, indent=1)
        + "\n"
    )
    table = Table(title=f"dpa demo over seeds 0-{seeds - 1} on {summaries[0]['cpu']['summary']}")
    for col in ("run", "clean acc: mean (range)", "share of non-private", "private acc", "verif. AUC", "ε whole run"):
        table.add_column(col, justify="right")
    for name, figs in spread.items():
        table.add_row(name, *(_cell(figs[k]) for k in _FIGURES))
    console.print(table)
    console.print("non-private recipes: " + ", ".join(f"{k} {_cell(v)}" for k, v in recipes.items()))
    console.print(f"wrote {out}")


def _spread(v: list[float]) -> dict:
    return {"mean": mean(v), "min": min(v), "max": max(v), "values": v}


def _cell(f: dict | None) -> str:
    return "-" if f is None else f"{f['mean']:.3f} ({f['min']:.3f}-{f['max']:.3f})"


if __name__ == "__main__":
    main()
