"""``dpa federate --deployment``: the federation on Flower's deployment runtime, on this machine's loopback."""

from __future__ import annotations

import time

from dpa.cli.errors import console
from dpa.cli.tables import print_records
from dpa.federation.config import FederationConfig


def run_deployment(cfg: FederationConfig, splitfed: bool) -> None:
    """Start every process, let the devices enrol at their edge servers, run the app, stop everything."""
    from dpa.federation.deployment.keys import CLASS_SUMS, SPLITFED  # the CLI imports its floors when it runs
    from dpa.runs.flower_deployment import Deployment, DeploymentConfig

    recipe = SPLITFED if splitfed else CLASS_SUMS
    started = time.perf_counter()
    dep_cfg = DeploymentConfig(cfg, recipe=recipe, round_timeout_s=cfg.round_timeout_s)
    with Deployment(dep_cfg, say=lambda msg: console.print(f"[bold cyan]>[/] {msg}")) as dep:
        with console.status(f"{cfg.edge_servers} edge servers (dpa serve, TLS) on loopback"):
            dep.start_edge_servers()
        with console.status(f"{cfg.devices} devices release to their edge servers"):
            sent = dep.enrol_devices()
        with console.status("SuperLink (TLS, SuperNode authentication) and the SuperNodes"):
            dep.start_federation()
        with console.status("flwr run"):
            report = dep.run_app()
    seconds = time.perf_counter() - started
    epsilon = max(d["epsilon"] for d in sent.values())  # each device's accountant, the largest
    if splitfed:
        rows = [(str(r["round"]), ", ".join(f"{e}: {n}" for e, n in r["examples"].items()),
                 r["loaded_sha256"][0][:12]) for r in report["rounds"]]  # fmt: skip
        print_records(console, f"SplitFed on Flower's deployment runtime: {cfg.edge_servers} edge servers",
                      ("round", "examples per edge server", "average loaded"), rows)  # fmt: skip
        console.print(f"each device's whole-run epsilon <= {epsilon:.4g} at delta {cfg.delta:g} (one release per "
                      f"example, labels at {cfg.label_epsilon:g} inside); averaged tail: {report['tail']}; "
                      f"processes and logs: {dep.root}; {seconds:.0f} s")  # fmt: skip
        return
    rows = [(str(e), str(n)) for e, n in report["per_edge_server"].items()]
    print_records(console, f"class sums on Flower's deployment runtime: {cfg.devices} devices",
                  ("edge server", "releases"), rows)  # fmt: skip
    console.print(
        f"gallery: {report['gallery_identities']} of {cfg.identities} identities from {report['releases']} releases, "
        f"each counted once; each device's whole-run epsilon <= {epsilon:.4g} at delta {cfg.delta:g} (labels inside); "
        f"{report['gallery']}; processes and logs: {dep.root}; {seconds:.0f} s"
    )
