"""``dpa evaluate lfw``: LFW's View 2 verification figure through the device's own pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress

from dpa.cli.errors import console, user_errors

evaluate_app = typer.Typer(no_args_is_help=True, help="The field's benchmarks, run through the device's pipeline.")


@evaluate_app.command("lfw")
def lfw_command(
    faces: Annotated[Path, typer.Argument(help="LFW: identity folders, or the folder holding lfw-deepfunneled/.")],
    pairs: Annotated[
        Path | None, typer.Option(help="View 2's pairs.txt (default: beside the images).", dir_okay=False)
    ] = None,
    artifacts: Annotated[
        Path | None,
        typer.Option("--export", help="An export whose head ends in an embedding (default: dlib-resnet, exported)."),
    ] = None,
    workdir: Annotated[Path, typer.Option(help="Aligned chips (cached) and the default export.")] = Path("runs/lfw"),
    flip: Annotated[bool, typer.Option(help="Test-time flip: embed each image and its mirror.")] = True,
    workers: Annotated[int, typer.Option(min=1, help="Alignment processes.")] = 2,
    roc: Annotated[Path | None, typer.Option(help="ROC plot (PNG); default WORKDIR/lfw-roc.png.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """LFW View 2: 10 folds, each threshold chosen on the other nine; mean and std, ROC AUC, a ROC plot."""
    from dpa.runs.lfw_eval import LfwEvalConfig, evaluate_lfw, summary_lines, write_lfw_roc

    with user_errors():
        cfg = LfwEvalConfig(faces=faces, pairs=pairs, artifacts=artifacts, workdir=workdir, flip=flip, workers=workers)
        say = (lambda _m: None) if as_json else (lambda m: console.print(m, highlight=False))
        with Progress(console=console, transient=True, disable=as_json) as bar:
            task = bar.add_task("aligning", total=None)
            report = evaluate_lfw(cfg, say=say, progress=lambda i, n: bar.update(task, completed=i, total=n))
        path = write_lfw_roc(report, roc or workdir / "lfw-roc.png")
    if as_json:
        print(json.dumps({k: v for k, v in report.items() if k != "roc"} | {"roc_png": str(path)}, indent=2))
        return
    for line in summary_lines(report):
        console.print(line, highlight=False)
    console.print(f"ROC plot: {path}", highlight=False)
