"""``dpa demo``: export, serve and train on synthetic faces, with and without DP noise."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from dpa.cli.errors import console, user_errors
from dpa.cli.tables import print_records

# demo_command's longer options, named here so that the command reads as its signature and its body.
_Seed = Annotated[
    int, typer.Option(help="Noise, shuffling and the tail's start (with --pretrain the public weights too).")
]
_Pretrain = Annotated[
    bool, typer.Option("--pretrain", help="Pretrain the public network here instead of loading the shipped one.")
]
_MixedPrecision = Annotated[
    bool,
    typer.Option(
        "--mixed-precision",
        help="Pretrain in bfloat16 autocast (native-bf16 CPUs only): faster, but the figures then depend on the CPU.",
    ),
]
_Faces = Annotated[
    Path | None,
    typer.Option(
        help="Real photographs in LFW layout (e.g. ../shared/data/lfw): run the recipes on dlib's public "
        "face network instead of the built-in synthetic faces (needs 'dpa[faces]').",
    ),
]
_Runs = Annotated[
    str,
    typer.Option(
        help="With --faces: which experiments, comma-separated: main (75% enrolled), few (5 photos "
        "each), per-example (DP-A at an early cut, then the attacks)."
    ),
]


# demo_command's longer options, named here so that the command reads as its signature and its body.


def demo_command(
    workdir: Annotated[Path, typer.Option(help="Folder for the pretrained weights, exports, data and reports.")] = Path(
        "runs/demo"
    ),
    total_epsilon: Annotated[float, typer.Option(help="Whole-run epsilon of the private runs (labels in it).")] = 8.0,
    label_epsilon: Annotated[float, typer.Option(help="Each release's label epsilon, inside that budget.")] = 4.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the runs' figures here as JSON.")] = None,
    seed: _Seed = 0,
    pretrain: _Pretrain = False,
    mixed_precision: _MixedPrecision = False,
    faces: _Faces = None,
    runs: _Runs = "main,few",
) -> None:
    """The pipeline on built-in (synthetic) faces, or on real photographs with --faces."""
    from dpa.base.atomic import atomic_write_bytes
    from dpa.runs.demo import DemoConfig, demo_summary, run_demo

    if faces is not None:
        _real_faces(faces, workdir / "real-faces", seed, json_out, tuple(r.strip() for r in runs.split(",")))
        return

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
    print_summary(console, summary, reports[0]["data"]["identities"], workdir, json_out)


def print_summary(out: Console, summary: dict[str, Any], identities: int, workdir: Path, json_out: Path | None) -> None:
    """The demo's table (a block per run where it does not fit) and the sentences that say what its figures are."""
    columns = ("run", "cut", "device FLOPs", "ε whole run", "δ", "label ε", "releases", "clean acc", "share",
               "private acc", "verif. AUC", "TAR@1e-3", "open-set rej.")  # fmt: skip
    rows = [
        (
            run["name"], run["cut"], f"{run['device_flops_share']:.1%}",
            "-" if run["epsilon_total"] is None else _num(run["epsilon_total"]),
            "-" if run["delta"] is None else f"{run['delta']:g}", _label(run["label_epsilon"]),
            str(run["releases_per_example"]), f"{run['clean_test_accuracy']:.3f}",
            "-" if run["share_of_nonprivate"] is None else f"{run['share_of_nonprivate']:.1%}",
            "-" if run["private_test_accuracy"] is None else f"{run['private_test_accuracy']:.3f}",
            f"{run['verification_auc']:.3f}", f"{run['tar_at_far_1e-3']:.3f}", f"{run['open_set_rejection']:.2f}",
        )
        for run in summary["runs"]
    ]  # fmt: skip
    chance = summary["runs"][0]["chance"]
    print_records(out, f"DP-A on built-in faces: held-out accuracy (chance {chance:.2f})", columns, rows,
                  left=("cut",))  # fmt: skip
    n = identities
    out.print(
        f"{n} identities. clean acc: the device classifying its clean held-out images (private runs: with the "
        "class templates the server learned from what it received; non-private: the best non-private recipe, "
        "below). private: the class sums released once (labels inside their guarantee); per-example: every "
        "example's activation and randomised label released once (DP-A). private acc: held-out images released "
        "with the same noise, classified by the server's tail (-: no tail trained). ε whole run composes every "
        "release of an example (dp-accounting PLD). verif. AUC / TAR@1e-3: pairs of held-out images of the device's "
        "identities (unseen in pretraining) by the cosine of their embeddings; open-set rej.: never-enrolled "
        "strangers rejected at the threshold that lets at most 1% of public strangers past (95% confidence). "
        "Recorded views: " + ", ".join(str(r["view"]) for r in summary["runs"])
    )
    for run in summary["runs"]:
        if run["epsilon_total"] is None:
            recipes = ", ".join(f"{k} {v:.3f}" for k, v in run["recipes"].items())
            out.print(f"non-private recipes ({run['name']}, hyperparameters chosen on public faces): {recipes}; "
                          f"the best, {run['clean_classifier']}, is the reference")  # fmt: skip
        elif run["share_of_nonprivate"] is not None:
            out.print(f"{run['name']}: {run['share_of_nonprivate']:.0%} of the non-private reference "
                          f"at whole-run epsilon {_num(run['epsilon_total'])}, delta {run['delta']:g}")  # fmt: skip
    out.print(f"verification ROC: {workdir / 'roc.png'}")
    pre = summary["pretraining"]
    out.print(
        f"seed {summary['seed']}; public pretraining in {pre['precision']} (train acc {pre['train_accuracy']:.2f}); "
        f"CPU: {summary['cpu']['summary']}"
    )
    if json_out is not None:
        out.print(f"wrote {json_out}")


def _label(eps: float | str | None) -> str:
    """The label column: clear, a per-release epsilon, or "in sums" (inside a class-sum release)."""
    if eps is None:
        return "clear"
    return "in sums" if isinstance(eps, str) else f"{eps:g}"


def _num(x: float | str) -> str:
    return x if isinstance(x, str) else f"{x:.3g}"


def _real_faces(faces: Path, workdir: Path, seed: int, json_out: Path | None, runs: tuple[str, ...]) -> None:
    """``dpa demo --faces``: dpa.runs.real_faces, printed in blocks that fit 80 columns."""
    from rich.progress import Progress

    from dpa.base.atomic import atomic_write_bytes
    from dpa.runs.real_faces import RealFacesConfig, run_real_faces

    for message in (".*seed.*experiments.*", ".*epsilon = inf.*"):
        warnings.filterwarnings("ignore", message=message)
    with user_errors():
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("aligning", total=None)
            out = run_real_faces(
                RealFacesConfig(faces=faces, workdir=workdir, seed=seed, runs=runs),
                say=lambda msg: console.print(f"[bold cyan]>[/] {msg}", highlight=False),
                progress=lambda i, n: bar.update(task, completed=i, total=n),
            )
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(json_out, (json.dumps(out, indent=2, default=str) + "\n").encode())
    for line in real_faces_lines(out):
        console.print(line, highlight=False)
    if json_out is not None:
        console.print(f"wrote {json_out}")


def real_faces_lines(out: dict) -> list[str]:  # type: ignore[type-arg]
    """The real-face report as lines of at most 80 characters: a block per experiment."""
    lines = []
    for key, title in (("main", "75% of each person's photos enrolled"), ("few_photos", "few photos each")):
        if key not in out:
            continue
        e = out[key]
        lines += ["", f"{title}: {e['identities']} people, {e['enrolled']} enrolled, {e['probes']} probes",
                  "  non-private: " + ", ".join(f"{k} {v:.3f}" for k, v in e["nonprivate"].items())
                  + f" (best {e['best_nonprivate']:.3f})",
                  f"  {'run':<36}{'ident.':>7}{'share':>7}{'open-set':>9}{'rejects':>9}"]  # fmt: skip
        for r in e["runs"]:
            name = r["name"].replace("private class sums, epsilon", "private sums, eps")
            lines.append(f"  {name:<36}{r['identification_accuracy']:>7.3f}{r['share_of_nonprivate']:>7.0%}"
                         f"{r.get('open_set_identification_rate', float('nan')):>9.2f}"
                         f"{r.get('open_set_rejection', float('nan')):>9.2f}")  # fmt: skip
        for r in e["runs"]:
            if r["epsilon_total"] is not None:
                lines.append(f"  eps {r['epsilon_total']:.3g}: whole run, delta {r['delta']:g}, {r['adjacency']} "
                             f"(replace-one: {r['epsilon_replace_one']:.3g})")  # fmt: skip
    lines += ["", "ident.: identification of the probes; share: of the best non-private recipe;",
              "open-set: probes accepted as the right person at the threshold that lets at most",
              "1% of public faces past (95% confidence); rejects: strangers (never enrolled)",
              "rejected there. Labels are inside every epsilon; thresholds and hyperparameters",
              "come from public people."]  # fmt: skip
    return lines
