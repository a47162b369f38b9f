"""``dpa federate``: class sums over Flower, many devices and several edge servers (dpa.federation)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dpa.cli.errors import console, user_errors


def federate_command(
    artifacts: Annotated[
        Path, typer.Option(help="A fc7 (or any) export with a public release clip: the devices' head.")
    ],
    state_dir: Annotated[Path, typer.Option(help="Devices' kept releases, edge servers' stores, report.")] = Path(
        "runs/federation"
    ),
    devices: Annotated[int, typer.Option(help="Devices (Flower SuperNodes in the simulation).")] = 20,
    edge_servers: Annotated[int, typer.Option(help="Edge servers; devices are assigned round-robin.")] = 2,
    shared_per_device: Annotated[int, typer.Option(help="Of each device's identities, those others enrol too.")] = 2,
    images_per_identity: Annotated[int, typer.Option(help="Images per identity per device (a quarter held out).")] = 8,
    total_epsilon: Annotated[float, typer.Option(help="Each device's whole-run epsilon (labels inside).")] = 8.0,
    delta: Annotated[float, typer.Option(help="Each device's delta.")] = 1e-5,
    rounds: Annotated[int, typer.Option(help="Enrolment rounds; later ones re-send kept releases (kept once).")] = 1,
    drop_device: Annotated[list[int] | None, typer.Option(help="A device that fails mid-round (fault drill).")] = None,
    round_timeout_s: Annotated[float, typer.Option(help="A round goes on without devices silent this long.")] = 600.0,
    seed: Annotated[int | None, typer.Option(help="Reproducible noise (experiments only).")] = None,
    actors: Annotated[int, typer.Option(help="ClientApps run at once (cores).")] = 2,
) -> None:
    """Enrol many devices' class sums through Flower's simulation engine into one gallery."""
    from dpa.contract.manifest import load_manifest
    from dpa.federation.config import FederationConfig
    from dpa.federation.simulation import federate

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    warnings.filterwarnings("ignore", message=".*(deprecated|seed).*")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    with user_errors():
        cfg = FederationConfig(
            artifacts=artifacts, state_dir=state_dir, devices=devices, edge_servers=edge_servers,
            identities_per_device=load_manifest(artifacts).num_classes, shared_per_device=shared_per_device,
            images_per_identity=images_per_identity, total_epsilon=total_epsilon, delta=delta, rounds=rounds,
            drop_devices=tuple(drop_device or ()), round_timeout_s=round_timeout_s, seed=seed, actors=actors,
        )  # fmt: skip
        with console.status(f"Flower simulation: {devices} devices, {edge_servers} edge servers"):
            report = federate(cfg, say=lambda msg: console.print(f"[bold cyan]>[/] {msg}"))
    table = Table(title=f"class sums over Flower: {devices} devices, {edge_servers} edge servers")
    for col in ("round", "kept", "replayed (kept once)", "refused", "missing devices", "seconds"):
        table.add_column(col, justify="right")
    for r in report["rounds"]:
        table.add_row(str(r["round"]), str(len(r["kept"])), str(len(r["replayed"])), str(len(r["refused"])),
                      ", ".join(map(str, r["missing"])) or "-", f"{r['seconds']:.1f}")  # fmt: skip
    console.print(table)
    eps = sorted({round(a["epsilon"], 6) for a in report["accounts"].values()})
    rec = report["recognition"]
    console.print(
        f"gallery: {report['gallery_identities']} of {report['identities']} identities enrolled from "
        f"{report['releases']} releases (per edge server {report['per_edge_server']}); each device's whole-run "
        f"epsilon {', '.join(map(str, eps))} at delta {delta:g} (one Gaussian release, labels inside, PLD); "
        f"recognition on the devices with the gallery's templates: "
        + (
            "-"
            if rec["accuracy"] is None
            else f"{rec['accuracy']:.3f} ({rec['correct']}/{rec['probes']} held-out images)"
        )
    )
    console.print(f"report: {state_dir / 'report.json'}; gallery: {report['gallery']}; {report['seconds']:.0f} s")
