"""Flower's deployment runtime for real, on loopback: a TLS SuperLink with SuperNode authentication, and
three edge servers, each a real ``dpa serve`` process with its devices and a SuperNode beside it, the app
started with ``flwr run`` (``dpa.runs.flower_deployment``). Against independent references: the simulation's
gallery of the same releases, FedAvg computed in torch of the tails the edge servers held, Flower's own
refusal of an unregistered key, and a SuperNode SIGKILLed mid-round."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from dpa.contract.architecture import ArchConfig
from dpa.contract.manifest import OptimizerConfig
from dpa.federation.config import FederationConfig
from dpa.runs.shipped_weights import SHIPPED_WEIGHTS

pytest.importorskip("flwr", reason="the deployment needs the [federate] extra (the README's test command installs it)")

EDGES = 3


def _export(root, classes: int, lr: float):  # type: ignore[no-untyped-def]
    from exporter.export import ExportConfig, export
    from exporter.pretrain import PRETRAIN_PIXEL_STD, public_faces

    export(
        ExportConfig(
            arch=ArchConfig(image_size=64, width=0.25, num_classes=classes, dropout=0.0),
            cut="fc7",
            optimizer=OptimizerConfig(lr=lr),
            out=root / "artifacts",
            weights=SHIPPED_WEIGHTS,
            pixel_std=PRETRAIN_PIXEL_STD,
            centre_faces=public_faces(root / "public", 6, 4, 64),
            seed=0,
        )
    )
    return root / "artifacts"


def _path() -> str:
    """PATH with this Python's scripts first: a SuperNode starts flower-superexec by name."""
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def _federation(root, **kw) -> FederationConfig:  # type: ignore[no-untyped-def]
    """Devices of 4 identities (one shared with other devices), 4 images each, on the 3 edge servers."""
    return FederationConfig(artifacts=root / "artifacts", state_dir=root / "state", identities_per_device=4,
                            shared_per_device=1, images_per_identity=4, edge_servers=EDGES, seed=0, **kw)  # fmt: skip


def _run_until(deployment, marker) -> tuple[threading.Thread, dict]:  # type: ignore[no-untyped-def]
    """``run_app`` in a thread, returned once the bridge has written ``marker`` (it is answering, paused):
    the thread, and what the run ends with (``report``, or ``why`` it failed)."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["report"] = deployment.run_app()
        except RuntimeError as exc:
            outcome["why"] = str(exc)

    runner = threading.Thread(target=run)
    runner.start()
    deadline = time.monotonic() + 120
    while not marker.is_file():
        assert time.monotonic() < deadline, f"the bridge never wrote {marker.name}"
        time.sleep(0.2)
    return runner, outcome


@pytest.fixture(scope="module")
def class_sums(tmp_path_factory):  # type: ignore[no-untyped-def]
    """The simulation's gallery first, then the same devices' kept releases through the deployment."""
    from dpa.federation.simulation import federate
    from dpa.runs.flower_deployment import Deployment, DeploymentConfig

    root = tmp_path_factory.mktemp("deployment")
    cfg = _federation(root, devices=6, round_timeout_s=120)
    _export(root, 4, 0.01)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        simulated = federate(cfg, say=lambda _msg: None)
    deployment = Deployment(DeploymentConfig(cfg, round_timeout_s=15, attempts=8))  # 8 x 15 s > a restart
    try:
        deployment.start_edge_servers()
        sent = deployment.enrol_devices()
        deployment.start_federation()
        report = deployment.run_app()
        yield cfg, simulated, deployment, sent, report
    finally:
        deployment.stop()


def test_the_deployed_gallery_is_the_simulations_of_the_same_releases(class_sums):
    cfg, simulated, _, sent, report = class_sums
    assert {d["edge"] for d in sent.values()} == set(range(EDGES)) and not any(d["retry"] for d in sent.values())
    assert report["releases"] == cfg.devices and report["attempts"][0]["answered"] == list(range(EDGES))
    assert report["per_edge_server"] == {str(k): cfg.devices // EDGES for k in range(EDGES)}
    with np.load(report["gallery"]) as got, np.load(simulated["gallery"]) as want:
        assert np.array_equal(got["counts"], want["counts"])
        # The same float32 releases summed in float64, in another order (per edge server, then across them).
        np.testing.assert_allclose(got["templates"], want["templates"], rtol=1e-6, atol=1e-7)


def test_a_supernode_with_an_unregistered_key_is_refused(class_sums):
    from dpa.federation.deployment.credentials import make_node_key

    _, _, deployment, _, _ = class_sums
    intruder, _ = make_node_key(deployment.root / "keys", "intruder")
    from dpa.runs.loopback import free_port

    cmd = deployment.supernode_command(0, private_key=intruder, port=free_port()) + ["--max-retries", "1"]
    log = deployment.root / "intruder.log"
    with open(log, "wb") as out:  # a file, not a pipe: the SuperNode's SuperExec child would hold a pipe open
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "FLWR_HOME": str(deployment.root / "intruder-home"), "PATH": _path()},
        )
        try:
            assert proc.wait(120) != 0
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "Failed to activate SuperNode" in log.read_text()
    assert "No SuperNode found with the given public key" in (deployment.root / "superlink.log").read_text()


@pytest.mark.long  # two minutes: the SuperLink lets the killed SuperNode in again after two missed heartbeats
def test_a_supernode_killed_mid_round_is_asked_again_and_nothing_is_counted_twice(class_sums):
    cfg, _, deployment, _, first = class_sums
    marker = deployment.edges[1].folder / "bridge" / "answering.class-sums"
    marker.unlink(missing_ok=True)
    deployment.kill_supernode(1)
    deployment.start_supernode(1, drill_pause_s=60)  # it answers after a minute: it is killed before that
    runner, result = _run_until(deployment, marker)
    deployment.kill_supernode(1)  # SIGKILL, mid-answer
    deployment.start_supernode(1)  # let in again once the SuperLink has seen it miss its heartbeats
    runner.join(300)
    report = result["report"]
    attempts = report["attempts"]
    assert len(attempts) >= 2 and 1 not in attempts[0]["answered"] and attempts[-1]["answered"] == [0, 1, 2]
    assert report["releases"] == cfg.devices  # every release once: the retried edge server's replaced, not added
    assert report["gallery_sha256"] == first["gallery_sha256"]


def test_splitfed_averages_the_edge_servers_tails_as_fedavg_in_torch(tmp_path):
    import torch

    from dpa.runs.flower_deployment import Deployment, DeploymentConfig

    # 7 devices on 3 edge servers: 3, 2 and 2 devices, so that FedAvg's weights differ (36, 24, 24 examples).
    cfg = _federation(tmp_path, devices=7, batch_size=4)
    _export(tmp_path, cfg.identities, 0.05)
    with Deployment(DeploymentConfig(cfg, recipe="splitfed", round_timeout_s=15)) as deployment:
        deployment.start_edge_servers()
        deployment.enrol_devices()  # each edge server's tail trained by its devices' DP-A steps
        before = deployment.tails()
        deployment.start_federation()
        report = deployment.run_app()
        after = deployment.tails()
    weights = [meta["examples_seen"] for _, meta in before]
    assert [report["rounds"][0]["examples"][str(k)] for k in range(EDGES)] == weights == [36, 24, 24]
    names = sorted(before[0][0])
    changed = any(not np.array_equal(before[0][0][k], before[1][0][k]) for k in names)
    assert changed, "the edge servers' tails must differ, or any average would pass"
    with np.load(report["tail"]) as z:
        averaged = {k: z[k] for k in z.files}
    for name in names:
        tails = torch.stack([torch.from_numpy(params[name]).double() for params, _ in before])
        w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *([1] * (tails.dim() - 1)))
        fedavg = ((tails * w).sum(0) / w.sum()).numpy()
        np.testing.assert_allclose(averaged[name], fedavg, rtol=1e-6, atol=1e-7, err_msg=name)
        for params, _ in after:  # every edge server holds the average now, at the step it was read at
            assert np.array_equal(params[name], averaged[name])
    assert [meta["global_step"] for _, meta in after] == [meta["global_step"] for _, meta in before]


@pytest.mark.long  # two minutes and more: a killed SuperNode is let in again after two missed heartbeats
def test_a_superlink_killed_mid_run_fails_clearly_and_a_restarted_one_gives_the_same_gallery(class_sums):
    from dpa.runs.flower_deployment import _stop

    cfg, _, deployment, _, first = class_sums
    marker = deployment.edges[1].folder / "bridge" / "answering.class-sums"
    marker.unlink(missing_ok=True)
    deployment.kill_supernode(1)
    deployment.start_supernode(1, drill_pause_s=60)
    runner, failed = _run_until(deployment, marker)
    _stop(deployment.superlink, signal.SIGKILL)  # the SuperLink and its ServerApp, mid-run
    runner.join(300)
    assert "the SuperLink is not running" in failed["why"] and "run again" in failed["why"]
    deployment.start_superlink()  # the same database: the registered keys survive, the SuperNodes reconnect
    deployment.kill_supernode(1)
    deployment.start_supernode(1)
    again = deployment.run_app()
    assert again["releases"] == cfg.devices and again["gallery_sha256"] == first["gallery_sha256"]


@pytest.mark.long  # the SuperLink killed between a round's loads, then a SuperNode let in again: 3 minutes
def test_a_round_cut_between_its_loads_is_finished_with_the_same_average(tmp_path):
    """Edge servers 0 and 1 have loaded the round's average when the SuperLink dies; edge server 2 has not.
    The next run loads that same average into edge server 2 (and again, the same state, into 0 and 1) before
    anything else: every edge server ends on FedAvg of the three tails, as computed in torch, not on an
    average of edge server 2's old tail alone (0 and 1 would weigh 0 examples in a new round)."""
    import torch

    from dpa.runs.flower_deployment import Deployment, DeploymentConfig, _stop

    cfg = _federation(tmp_path, devices=7, batch_size=4)
    _export(tmp_path, cfg.identities, 0.05)
    with Deployment(DeploymentConfig(cfg, recipe="splitfed", round_timeout_s=15, attempts=8)) as deployment:
        deployment.start_edge_servers()
        deployment.enrol_devices()
        before = deployment.tails()
        deployment.start_superlink()
        for k in range(EDGES):
            deployment.register(f"edge-{k}", deployment.node_key(k)[1])
            deployment.start_supernode(k, drill_pause_s=60 if k == 2 else 0, drill_at="load-tail")
        marker = deployment.edges[2].folder / "bridge" / "answering.load-tail"
        runner, failed = _run_until(deployment, marker)
        time.sleep(3)  # edge servers 0 and 1 load meanwhile (milliseconds)
        _stop(deployment.superlink, signal.SIGKILL)
        runner.join(300)
        assert "the SuperLink is not running" in failed["why"]
        mid = deployment.tails()
        deployment.start_superlink()
        deployment.kill_supernode(2)
        deployment.start_supernode(2)
        report = deployment.run_app()
        after = deployment.tails()
    weights = [meta["examples_seen"] for _, meta in before]
    for name in before[0][0]:
        tails = torch.stack([torch.from_numpy(params[name]).double() for params, _ in before])
        w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *([1] * (tails.dim() - 1)))
        fedavg = ((tails * w).sum(0) / w.sum()).numpy()
        assert np.array_equal(mid[2][0][name], before[2][0][name]), "edge server 2 must not have loaded yet"
        np.testing.assert_allclose(mid[0][0][name], fedavg, rtol=1e-6, atol=1e-7)
        for params, _ in after:
            np.testing.assert_allclose(params[name], fedavg, rtol=1e-6, atol=1e-7, err_msg=name)
    assert "resumed" in report and report["rounds"][0].get("skipped") == "nothing new"
