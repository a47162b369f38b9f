"""``dpa sweep``: the privacy-utility frontier over whole-run epsilons, cuts and data sizes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from dpa.cli.errors import console, parse_dims_list, parse_epsilons, parse_positive_list, user_errors
from dpa.cli.tables import print_records
from dpa.contract.errors import UserError


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.split(","):
        try:
            ids, per = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise UserError(f"a data size is IDENTITIESxIMAGES (e.g. 10x40), got {part.strip()!r}") from None
        out.append((ids, per))
    return tuple(out)


def _field_figures(p: dict[str, Any]) -> tuple[str, str, str]:
    """A public point's verification AUC, TAR at FAR 1e-3 and open-set rejection, as the table shows them."""
    if "verification_auc" not in p:
        return ("-", "-", "-")
    return f"{p['verification_auc']:.3f}", f"{p['tar_at_far_1e-3']:.3f}", f"{p['open_set_rejection']:.2f}"


# sweep_command's longer options, named here so that the command reads as its signature and its body.
_Recipe = Annotated[
    str,
    typer.Option(
        help="scratch (all layers trained from initialisation), public (pretrained, centred, frozen "
        "head, one release of each example, class templates on the device) or class-sums (the same, with "
        "the class sums released once instead)."
    ),
]
_LabelEpsilon = Annotated[
    float, typer.Option(help="Randomise the private runs' labels at this epsilon per release (in the budget).")
]
_ClipScales = Annotated[
    str,
    typer.Option(
        help="Each run's clip as multiples of the public clip (the export's release_clip), comma-separated "
        "(a lever chosen on public data; each gets its own non-private run)."
    ),
]
_ReleaseDims = Annotated[
    str,
    typer.Option(
        help="Public recipes: project each export's release on this many public principal directions, "
        "comma-separated (0: none; each gets its own non-private run)."
    ),
]
_Pretrain = Annotated[
    bool, typer.Option(help="Public recipes: pretrain here instead of loading the shipped public weights.")
]


def sweep_command(
    epsilons: Annotated[str, typer.Option(help="Whole-run epsilons, comma-separated (a non-private run is added).")] = (
        "8,64,1e3,1e5"
    ),
    cuts: Annotated[str, typer.Option(help="Cuts, comma-separated.")] = "conv1_1,pool1,pool2,pool3",
    sizes: Annotated[str, typer.Option(help="Private data sizes IDENTITIESxIMAGES, comma-separated.")] = "10x40",
    epochs: Annotated[int, typer.Option(help="Epochs (releases of each example) per run.")] = 8,
    delta: Annotated[float, typer.Option(help="delta of the whole run.")] = 1e-5,
    attack: Annotated[bool, typer.Option(help="Attack each run's recorded view (decoder and MAP).")] = True,
    attack_epochs: Annotated[int, typer.Option(help="The decoder attack's training epochs.")] = 10,
    max_steps: Annotated[int | None, typer.Option(help="Cap on steps per epoch (quick runs).")] = None,
    recipe: _Recipe = "scratch",
    label_epsilon: _LabelEpsilon = float("inf"),
    clip_scales: _ClipScales = "1",
    release_dims: _ReleaseDims = "0",
    pretrain: _Pretrain = False,
    out: Annotated[Path, typer.Option(help="Work and results folder (re-running resumes).")] = Path("runs/sweep"),
) -> None:
    """The frontier: clean accuracy vs whole-run epsilon per cut and data size, with attack SSIM and device cost."""
    from dpa.runs.sweep import SweepConfig, run_sweep

    with user_errors():
        eps = parse_epsilons(epsilons)
        if any(e == float("inf") for e in eps):
            raise UserError("whole-run epsilons must be finite: the non-private run is always added")
        cfg = SweepConfig(
            workdir=out,
            total_epsilons=eps,
            cuts=tuple(c.strip() for c in cuts.split(",") if c.strip()),
            sizes=_sizes(sizes),
            epochs=epochs,
            delta=delta,
            attack=attack,
            attack_epochs=attack_epochs,
            max_steps_per_epoch=max_steps,
            label_epsilon=label_epsilon,
            recipe=recipe,
            clip_scales=parse_positive_list("clip scale", clip_scales),
            release_dims=parse_dims_list(release_dims),
            pretrain=pretrain,
        )
        results = run_sweep(cfg, say=lambda msg: console.print(f"[bold cyan]>[/] {msg}"))
    releases = "the class sums released once" if recipe == "class-sums" else f"{epochs} releases per example"
    print_frontier(console, results, f"DP-A frontier ({releases}, delta {delta:g})", out)


def print_frontier(out_console: Console, results: dict[str, Any], title: str, out: Path) -> None:
    """The frontier's table (a block per point where it does not fit) and the smallest epsilons."""
    from dpa.runs.frontier import lever_name  # matplotlib: only when a frontier is printed

    field = any("verification_auc" in p for p in results["points"])
    columns = ("cut", "data", "clip x", "dims", "ε whole run", "clean", "/ non-private", "private",
               *(("verif. AUC", "TAR@FAR 1e-3", "open-set rej.") if field else ()), "attack SSIM", "baseline",
               "FLOPs on device", "head step ms", "peak MB", "wire KiB/ex")  # fmt: skip
    rows = [_point_row(p, field) for p in results["points"]]
    print_records(out_console, title, columns, rows)
    for row in results["smallest_epsilon_at"]:
        e80, e50 = row["epsilon_for_80pct"], row["epsilon_for_50pct"]
        scale = lever_name(row.get("clip_scale", 1.0), row.get("release_dims", 0)).replace(",", "")
        out_console.print(
            f"{row['cut']} {row['identities']}x{row['per_identity']}{scale}: 80% of non-private at ε "
            f"{'not reached' if e80 is None else f'{e80:g}'}; 50% at ε {'not reached' if e50 is None else f'{e50:g}'}"
        )
    out_console.print(f"results: {out}/frontier.csv, frontier.json, frontier.png")


def _point_row(p: dict[str, Any], field: bool) -> tuple[str, ...]:
    """One point of the frontier as the table shows it."""
    rel = p["relative_clean_accuracy"]
    return (
        p["cut"], f"{p['identities']}x{p['per_identity']}", f"{p.get('clip_scale', 1.0):g}",
        str(p.get("release_dims", 0) or "-"),
        "none" if p["epsilon_budget"] is None else f"{p['epsilon_total']:.3g}", f"{p['clean_test_accuracy']:.3f}",
        "-" if rel is None else f"{rel:.2f}",
        "-" if p["private_test_accuracy"] is None else f"{p['private_test_accuracy']:.3f}",
        *(_field_figures(p) if field else ()),
        f"{p['attack_ssim']:.3f}" if "attack_ssim" in p else "-",
        f"{p['baseline_ssim']:.3f}" if "baseline_ssim" in p else "-",
        f"{p['head_flops_share']:.1%}", f"{p['head_step_ms']:.1f}", f"{p['peak_rss_mb']:.0f}",
        f"{p['wire_bytes_per_example'] / 1024:.0f}",
    )  # fmt: skip
