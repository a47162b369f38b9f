"""``dpa federate``: class sums over Flower, many devices and several edge servers (dpa.federation)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Annotated

import typer

from dpa.cli.errors import console, user_errors
from dpa.cli.tables import print_records

_Deployment = Annotated[
    bool,
    typer.Option(
        "--deployment",
        help="Flower's deployment runtime instead, on this machine's loopback: a TLS SuperLink, and per edge "
        "server a dpa serve and an authenticated SuperNode, each its own process; flwr run (docs/federation.md).",
    ),
]


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
    splitfed: Annotated[
        bool,
        typer.Option(
            "--splitfed",
            help="SplitFed instead: per-example DP-A releases, one tail per edge server, "
            "FedAvg each round (the export classifies every identity).",
        ),
    ] = False,
    label_epsilon: Annotated[float, typer.Option(help="SplitFed: each label's epsilon, inside the budget.")] = 4.0,
    deployment: _Deployment = False,
) -> None:
    """Enrol many devices' class sums through Flower's simulation engine into one gallery (or run SplitFed)."""
    from dpa.federation.config import FederationConfig
    from dpa.federation.simulation import federate
    from dpa.federation.splitfed import splitfed as run_splitfed

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    warnings.filterwarnings("ignore", message=".*(deprecated|seed).*")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    with user_errors():
        cfg = FederationConfig(
            artifacts=artifacts, state_dir=state_dir, devices=devices, edge_servers=edge_servers,
            identities_per_device=identities_per_device(artifacts, devices, shared_per_device, splitfed),
            shared_per_device=shared_per_device, label_epsilon=label_epsilon,
            images_per_identity=images_per_identity, total_epsilon=total_epsilon, delta=delta, rounds=rounds,
            drop_devices=tuple(drop_device or ()), round_timeout_s=round_timeout_s, seed=seed, actors=actors,
        )  # fmt: skip
        if deployment:
            from dpa.cli.federate_deployment import run_deployment

            return run_deployment(cfg, splitfed)
        with console.status(f"Flower simulation: {devices} devices, {edge_servers} edge servers"):
            if splitfed:
                report = run_splitfed(cfg)
            else:
                report = federate(cfg, say=lambda msg: console.print(f"[bold cyan]>[/] {msg}"))
    if splitfed:
        losses = ", ".join(f"round {r}: {v:.3f}" for r, v in sorted(report["train_loss"].items()))
        console.print(f"SplitFed over Flower: {devices} devices, {edge_servers} edge servers, FedAvg of the tails; "
                      f"train loss {losses}; each device's whole-run epsilon <= {report['epsilon']:.4g} at delta "
                      f"{delta:g} (one release per example, labels at {label_epsilon:g} inside)")  # fmt: skip
        console.print(f"averaged tail: {report['tail']}")
        return
    rows = [(str(r["round"]), str(len(r["kept"])), str(len(r["replayed"])), str(len(r["refused"])),
             ", ".join(map(str, r["missing"])) or "-", f"{r['seconds']:.1f}") for r in report["rounds"]]  # fmt: skip
    print_records(console, f"class sums over Flower: {devices} devices, {edge_servers} edge servers",
                  ("round", "kept", "replayed (kept once)", "refused", "missing devices", "seconds"), rows)  # fmt: skip
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


def identities_per_device(artifacts: Path, devices: int, shared: int, splitfed: bool) -> int:
    """Class sums: the export classifies one device's identities. SplitFed: it classifies the whole gallery,
    devices x (k - shared) + the shared pool, so k is solved from its class count."""
    from dpa.contract.manifest import load_manifest
    from dpa.federation.config import FederationConfig

    classes = load_manifest(artifacts).num_classes
    if not splitfed:
        return classes
    for k in range(shared + 1, classes + 1):
        cfg = FederationConfig(artifacts=artifacts, devices=devices, identities_per_device=k, shared_per_device=shared)
        if cfg.identities == classes:
            return k
    raise typer.BadParameter(
        f"no identities per device make a gallery of the export's {classes} classes "
        f"with {devices} devices and {shared} shared each"
    )
