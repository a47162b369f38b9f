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
    workdir: Annotated[Path, typer.Option(help="Folder for the pretrained weights, exports, data and reports.")] = Path(
        "runs/demo"
    ),
    total_epsilon: Annotated[float, typer.Option(help="Whole-run epsilon of the private runs (labels in it).")] = 8.0,
    label_epsilon: Annotated[float, typer.Option(help="Each release's label epsilon, inside that budget.")] = 4.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the runs' figures here as JSON.")] = None,
    seed: Annotated[
        int, typer.Option(help="Noise, shuffling and the tail's start (with --pretrain the public weights too).")
    ] = 0,
    pretrain: Annotated[
        bool, typer.Option("--pretrain", help="Pretrain the public network here instead of loading the shipped one.")
    ] = False,
    mixed_precision: Annotated[
        bool,
        typer.Option(
            "--mixed-precision",
            help="Pretrain in bfloat16 autocast (native-bf16 CPUs only): "
            "faster, but the figures then depend on the CPU.",
        ),
    ] = False,
) -> None:
    """The pipeline on built-in faces: public pretraining, then a non-private and three private runs."""
    from dpa.contract.atomic import atomic_write_bytes
    from dpa.runs.demo import DemoConfig, demo_summary, run_demo

    # The demo's fixed seed, and its non-private run (no noise, labels in clear), are deliberate; the table says so.
    for message in (".*seed.*experiments.*", ".*epsilon = inf.*", ".*label-epsilon inf.*"):
        warnings.filterwarnings("ignore", message=message)
    with user_errors():
        reports = run_demo(
            DemoConfig(
                workdir=workdir,
                total_epsilon=total_epsilon,
                label_epsilon=label_epsilon,
                seed=seed,
                pretrain=pretrain,
                mixed_precision=mixed_precision,
            ),
            say=lambda msg: console.print(f"[bold cyan]>[/] {msg}"),
        )
        summary = demo_summary(reports)
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(json_out, (json.dumps(summary, indent=2) + "\n").encode())
    table = Table(title="DP-A on built-in faces: held-out accuracy (chance 0.10)")
    columns = ("run", "cut", "device FLOPs", "ε whole run", "δ", "label ε", "releases", "clean acc", "private acc",
               "verif. AUC", "TAR@1e-3", "open-set rej.")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="right")
    for run in summary["runs"]:
        table.add_row(
            run["name"],
            run["cut"],
            f"{run['device_flops_share']:.1%}",
            "-" if run["epsilon_total"] is None else _num(run["epsilon_total"]),
            "-" if run["delta"] is None else f"{run['delta']:g}",
            _label(run["label_epsilon"]),
            str(run["releases_per_example"]),
            f"{run['clean_test_accuracy']:.3f}",
            "-" if run["private_test_accuracy"] is None else f"{run['private_test_accuracy']:.3f}",
            f"{run['verification_auc']:.3f}",
            f"{run['tar_at_far_1e-3']:.3f}",
            f"{run['open_set_rejection']:.2f}",
        )
    console.print(table)
    n = reports[0]["data"]["identities"]
    console.print(
        f"{n} identities. clean acc: the device classifying its clean held-out images (private runs: with the "
        "class templates the server learned from what it received; non-private: the best non-private recipe, "
        "below). private: the class sums released once (labels inside their guarantee); per-example: every "
        "example's activation and randomised label released once (DP-A). private acc: held-out images released "
        "with the same noise, classified by the server's tail (-: no tail trained). ε whole run composes every "
        "release of an example (dp-accounting PLD). verif. AUC / TAR@1e-3: pairs of held-out images of the device's "
        "identities (unseen in pretraining) by the cosine of their embeddings; open-set rej.: never-enrolled "
        "strangers rejected at the threshold that accepts 1% of public strangers. Recorded views: "
        + ", ".join(str(r["view"]) for r in summary["runs"])
    )
    for run in summary["runs"]:
        if run["epsilon_total"] is None:
            recipes = ", ".join(f"{k} {v:.3f}" for k, v in run["recipes"].items())
            console.print(f"non-private recipes ({run['name']}, hyperparameters chosen on public faces): {recipes}; "
                          f"the best, {run['clean_classifier']}, is the reference")  # fmt: skip
        elif run["share_of_nonprivate"] is not None:
            console.print(f"{run['name']}: {run['share_of_nonprivate']:.0%} of the non-private reference "
                          f"at whole-run epsilon {_num(run['epsilon_total'])}, delta {run['delta']:g}")  # fmt: skip
    console.print(f"verification ROC: {workdir / 'roc.png'}")
    pre = summary["pretraining"]
    console.print(
        f"seed {summary['seed']}; public pretraining in {pre['precision']} (train acc {pre['train_accuracy']:.2f}); "
        f"CPU: {summary['cpu']['summary']}"
    )
    if json_out is not None:
        console.print(f"wrote {json_out}")


def _label(eps: float | str | None) -> str:
    """The label column: clear, a per-release epsilon, or "in sums" (inside a class-sum release)."""
    if eps is None:
        return "clear"
    return "in sums" if isinstance(eps, str) else f"{eps:g}"


def _num(x: float | str) -> str:
    return x if isinstance(x, str) else f"{x:.3g}"
