"""``dpa attack inversion`` and ``dpa attack membership``: privacy audits (they import torch/onnxruntime)."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from dpa.cli.errors import console, option_check, parse_epsilons, user_errors
from dpa.cli.tables import print_records
from dpa.privacy import checks

attack_app = typer.Typer(
    no_args_is_help=True, help="Privacy audits: what an honest-but-curious edge server can learn from DP-A releases."
)


def _write_json(path: Path, data: dict) -> None:
    from dpa.base.atomic import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


@attack_app.command("inversion")
def inversion_command(
    artifacts: Annotated[
        Path | None, typer.Option(help="Export folder; default: an untrained head from --image-size/--width/--cut.")
    ] = None,
    head_checkpoint: Annotated[
        Path | None, typer.Option(help="A trained head (client state dir or head_checkpoint file); needs --artifacts.")
    ] = None,
    epsilons: Annotated[
        str, typer.Option(help="Comma-separated epsilons per release; inf = no noise.")
    ] = "inf,1e5,1e3,8",
    clip: Annotated[
        float | None, typer.Option(help="Clip C, as the client's --clip (default: the export's public clip).")
    ] = None,
    delta: Annotated[float, typer.Option(help="delta per release.")] = 1e-5,
    epochs: Annotated[int, typer.Option(help="Decoder training epochs per epsilon.")] = 20,
    data: Annotated[str, typer.Option(help="'synthetic' or an LFW-layout folder.")] = "synthetic",
    aux_identities: Annotated[int, typer.Option(help="The attacker's identities (the first ones).")] = 16,
    victim_identities: Annotated[int, typer.Option(help="Victim identities (the next ones).")] = 4,
    per_identity: Annotated[int, typer.Option(help="Images per identity.")] = 16,
    image_size: Annotated[int, typer.Option(help="Image side without --artifacts.")] = 64,
    width: Annotated[float, typer.Option(help="Channel multiplier without --artifacts.")] = 0.25,
    cut: Annotated[str, typer.Option(help="Cut without --artifacts.")] = "conv1_1",
    batch_size: Annotated[int, typer.Option(help="Decoder batch size.")] = 16,
    lr: Annotated[float, typer.Option(help="Decoder learning rate (Adam).")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed of the decoder, the shuffling and both sides' noise.")] = 0,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Keep the synthetic faces here.")] = None,
    attacks: Annotated[str, typer.Option(help="Comma-separated attacks: decoder, map; the strongest is reported.")] = (
        "decoder,map"
    ),
    map_steps: Annotated[int, typer.Option(help="Adam steps of the MAP attack.")] = 100,
    record_view: Annotated[
        Path | None, typer.Option(help="Also write each epsilon's victim releases as a recorded view here.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Writes inversion.json and inversion.png here.")] = Path("runs/attack"),
) -> None:
    """Rebuild victims' faces from their DP-A releases: an inverse network and the white-box MAP attack."""

    from dpa.audit.config import InversionConfig
    from dpa.audit.inversion import run_inversion

    with user_errors():
        eps = parse_epsilons(epsilons)
        cfg = InversionConfig(
            artifacts=artifacts,
            head_checkpoint=head_checkpoint,
            image_size=image_size,
            width=width,
            cut=cut,
            epsilons=eps,
            clip=clip,
            delta=delta,
            data=data,
            aux_identities=aux_identities,
            victim_identities=victim_identities,
            images_per_identity=per_identity,
            cache_dir=cache_dir,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            threads=threads,
            attacks=tuple(a.strip() for a in attacks.split(",") if a.strip()),
            map_steps=map_steps,
            record_view=record_view,
        )
        report = _with_progress(lambda progress: run_inversion(cfg, progress=progress))
        _write_report(report, out)
    _print_report(report, out)


def _with_progress(run):  # type: ignore[no-untyped-def]
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("loading faces", total=None)
        return run(lambda text, done, total: progress.update(task, description=text, completed=done, total=total))


def _write_report(report, out: Path) -> None:  # type: ignore[no-untyped-def]
    from dpa.audit.figures import write_grid

    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "inversion.json", report.to_json())
    write_grid(report, out / "inversion.png")


def _print_report(report, out: Path) -> None:  # type: ignore[no-untyped-def]
    from dpa.audit.report import HE2019_NO_DEFENCE_PSNR_DB, HE2019_NO_DEFENCE_SSIM, HE2021_RECOGNISABLE_SSIM

    clip, delta = report.config.clip, report.config.delta

    names = ("epsilon", "strongest", "SNR/element", "PSNR dB", "SSIM", f"SSIM > {HE2021_RECOGNISABLE_SSIM:g}",
             "verdict")  # fmt: skip
    rows = [("mean aux face", "-", "-", f"{report.baseline_psnr_mean:.2f}", f"{report.baseline_ssim_mean:.3f}",
             f"{report.baseline_recognisable_fraction:.0%}", "prior only")]  # fmt: skip
    rows += [(f"{r.epsilon:g}", r.strongest_attack, f"{r.snr_per_element:.3g}", f"{r.psnr_mean:.2f}",
              f"{r.ssim_mean:.3f}", f"{r.recognisable_fraction:.0%}", r.verdict) for r in report.results]  # fmt: skip
    title = f"inversion at {report.cut} (clip {clip:g}, delta {delta:g}; {report.victim_images} victims)"
    print_records(console, title, names, rows, left=("verdict", "strongest"))
    console.print(
        f"literature: no-defence first-layer inversion {HE2019_NO_DEFENCE_PSNR_DB:g} dB / SSIM "
        f"{HE2019_NO_DEFENCE_SSIM:g} (He, Zhang and Lee, ACSAC 2019); SSIM > {HE2021_RECOGNISABLE_SSIM:g} "
        f"recognisable (He et al., IEEE IoT-J 2021)"
    )
    console.print(f"wrote {out / 'inversion.json'} and {out / 'inversion.png'} ({report.seconds:.0f} s)")


@attack_app.command("view")
def view_command(
    view: Annotated[Path, typer.Argument(help="A recorded view (dpa client --record-view DIR).")],
    max_examples: Annotated[int, typer.Option(help="Attack at most this many recorded examples.")] = 64,
    epochs: Annotated[int, typer.Option(help="Decoder training epochs.")] = 20,
    data: Annotated[str, typer.Option(help="The attacker's faces: 'synthetic' or an LFW-layout folder.")] = (
        "synthetic"
    ),
    data_seed: Annotated[
        int, typer.Option(help="Seed of the attacker's synthetic faces (the device's built-in set uses 0).")
    ] = 1,
    aux_identities: Annotated[int, typer.Option(help="The attacker's identities.")] = 16,
    per_identity: Annotated[int, typer.Option(help="The attacker's images per identity.")] = 16,
    attacks: Annotated[str, typer.Option(help="Comma-separated attacks: decoder, map.")] = "decoder,map",
    map_steps: Annotated[int, typer.Option(help="Adam steps of the MAP attack.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the attacker's decoder and noise.")] = 0,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Keep the synthetic faces here.")] = None,
    out: Annotated[Path, typer.Option(help="Writes inversion.json and inversion.png here.")] = Path("runs/attack"),
) -> None:
    """Attack what a real server received: the releases, head weights and public parameters of a recorded view
    (a class-sum view: each class's noisy mean, scored against the images summed into it and held out)."""
    from dpa.audit.class_sum_audit import audit_class_sum_view, is_class_sum_view, write_class_sum_grid
    from dpa.audit.config import InversionConfig
    from dpa.audit.view_audit import audit_view

    with user_errors():
        cfg = InversionConfig(
            data=data,
            data_seed=data_seed,
            aux_identities=aux_identities,
            victim_identities=1,
            images_per_identity=per_identity,
            epochs=epochs,
            attacks=tuple(a.strip() for a in attacks.split(",") if a.strip()),
            map_steps=map_steps,
            seed=seed,
            threads=threads,
            cache_dir=cache_dir,
        )
        if is_class_sum_view(view):
            result = _with_progress(lambda progress: audit_class_sum_view(view, cfg, progress=progress))
            _class_sum_report(result, out, write_class_sum_grid)
            return
        report = _with_progress(lambda progress: audit_view(view, cfg, max_examples=max_examples, progress=progress))
        _write_report(report, out)
    _print_report(report, out)


def _class_sum_report(result: dict[str, Any], out: Path, write_grid: Callable[[dict[str, Any], Path], Path]) -> None:
    """class_sums_attack.json (every figure) and class_sums_attack.png (the strongest attack's faces)."""
    from dpa.base.atomic import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    keep = {k: v for k, v in result.items() if k not in ("reconstructions", "members", "held_out", "prior")}
    atomic_write_bytes(out / "class_sums_attack.json", (json.dumps(keep, indent=2) + "\n").encode())
    write_grid(result, out / "class_sums_attack.png")
    held = result["held_out_ssim_mean"]
    console.print(
        f"class sums at {result['cut']} ({result['strongest_attack']} strongest, noise "
        f"{result['noise_std_on_a_mean']:.3g} per element of a class mean): SSIM to the images summed "
        f"{result['member_ssim_mean']:.3f}, to held-out "
        f"images of the same identities {'-' if held is None else f'{held:.3f}'}, no-data baseline (the attacker's "
        f"mean face) {result['baseline_ssim_mean']:.3f}; wrote {out / 'class_sums_attack.json'} and "
        f"{out / 'class_sums_attack.png'} ({result['seconds']:.0f} s)"
    )
    clean, mem = result["noiseless"], result["membership"]
    console.print(
        f"its power without noise (the same attacks on the same images' exact class means): SSIM to the images "
        f"summed {clean['member_ssim_mean']:.3f} ({clean['strongest_attack']}), baseline "
        f"{clean['baseline_ssim_mean']:.3f}"
    )
    noisy, exact = mem["noisy"], mem["noiseless"]
    console.print(
        f"membership test on the sums ({mem['members']} members against {mem['held_out']} held-out images of the "
        f"same identities): AUC {noisy['auc']:.3f} [{noisy['ci_low']:.3f}, {noisy['ci_high']:.3f}] (95% bootstrap); "
        f"without noise {exact['auc']:.3f} [{exact['ci_low']:.3f}, {exact['ci_high']:.3f}]; the mechanism allows at "
        f"most {mem['limit']:.3f} (noise multiplier {mem['noise_multiplier']:.3g}); chance 0.5"
    )


@attack_app.command("labels")
def labels_command(
    view: Annotated[Path, typer.Argument(help="A recorded view of every training release (dpa client --record-view).")],
    artifacts: Annotated[Path, typer.Option(help="The export the run used.")] = Path("artifacts"),
    server_state: Annotated[Path, typer.Option(help="The server's state dir or tail_checkpoint file.")] = Path(
        "artifacts/server-state"
    ),
    out: Annotated[Path, typer.Option(help="Writes labels.json here.")] = Path("runs/attack"),
) -> None:
    """The server's best guess of each training example's identity, from the labels and from everything it saw."""

    from dpa.audit.label_attack import attack_labels

    with user_errors():
        report = attack_labels(view, artifacts, server_state)
        _write_json(out / "labels.json", report.to_json())
    r = report
    rows = [("labels alone", f"{r.accuracy_labels_only:.3f}", f"{r.bound_labels_only:.3f}",
             f"{r.label_epsilon_total:.3g}", f"{r.chance:.3f}"),
            ("everything", f"{r.accuracy_everything:.3f}", f"{r.bound_everything:.3f}", f"{r.combined_epsilon:.3g}",
             f"{r.chance:.3f}")]  # fmt: skip
    print_records(console, f"label inference: {r.examples} training examples, {r.classes} identities",
                  ("from", "accuracy", "bound (DP)", "epsilon", "chance"), rows)  # fmt: skip
    console.print(
        f"label epsilon {r.label_epsilon_per_release:g} per release, {r.releases_per_example:g} releases per "
        f"example; bound: (e^eps + (k-1) delta) / (e^eps + k - 1) at delta {r.delta:g} (0 for labels alone). "
        "'everything' adds the server's own tail on each release: with a large activation epsilon it is high by "
        f"design (the tail is an identity classifier). wrote {out / 'labels.json'}"
    )


@attack_app.command("membership")
def membership_command(
    artifacts: Annotated[Path, typer.Option(help="Export folder (manifest.json, head/, tail/).")] = Path("artifacts"),
    server_state: Annotated[
        Path | None,
        typer.Option(help="The server's state dir or tail_checkpoint file (default <artifacts>/server-state)."),
    ] = None,
    client_state: Annotated[
        Path, typer.Option(help="The client's state dir (head_checkpoint and synthetic-data cache).")
    ] = Path("runs/client"),
    data: Annotated[
        str, typer.Option(help="'synthetic' or the LFW-layout folder the client trained on.")
    ] = "synthetic",
    identities: Annotated[int, typer.Option(help="Synthetic identities (as the client's).")] = 10,
    per_identity: Annotated[int, typer.Option(help="Synthetic images per identity (as the client's).")] = 40,
    min_faces_per_person: Annotated[int, typer.Option(help="As the client's.")] = 2,
    epsilon: Annotated[
        float,
        typer.Option(
            help="The client's --epsilon (sets the public scale and the noise).",
            callback=option_check(partial(checks.epsilon, allow_inf=True)),
        ),
    ] = 8.0,
    clip: Annotated[float | None, typer.Option(help="The client's --clip (default: the export's public clip).")] = None,
    delta: Annotated[float, typer.Option(help="The client's --delta.")] = 1e-5,
    seed: Annotated[int | None, typer.Option(help="Seed of the noise of the deployed-pipeline row.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    out: Annotated[Path, typer.Option(help="Writes membership.json here.")] = Path("runs/attack"),
) -> None:
    """Loss-threshold membership inference (Yeom et al. 2018) on the client's train/test split."""

    from dpa.audit.membership_run import MembershipConfig, run_membership

    with user_errors():
        cfg = MembershipConfig(
            artifacts=artifacts, server_state=server_state, client_state=client_state, data=data,
            identities=identities, per_identity=per_identity, min_faces_per_person=min_faces_per_person,
            epsilon=epsilon, clip=clip, delta=delta, seed=seed, batch_size=batch_size,
        )  # fmt: skip
        report = run_membership(cfg, out)
    rows = report["results"]
    table = [
        (name, f"{r['auc']:.3f}", f"{r['advantage']:.3f}",
         r["threshold"] if isinstance(r["threshold"], str) else f"{r['threshold']:.4g}",
         f"{r['member_loss_mean']:.4f}", f"{r['nonmember_loss_mean']:.4f}")
        for name, r in rows.items()
    ]  # fmt: skip
    title = f"membership inference: {report['members']} members, {report['nonmembers']} non-members"
    columns = ("model", "AUC", "advantage", "threshold", "loss (members)", "loss (non-members)")
    print_records(console, title, columns, table)
    console.print("AUC 0.5 and advantage 0 are chance; the threshold is chosen in hindsight (an upper bound).")
    console.print(f"wrote {out / 'membership.json'}")
