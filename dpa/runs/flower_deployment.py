"""Flower's deployment runtime on one machine's loopback: a TLS SuperLink with SuperNode authentication,
and per edge server a real ``dpa serve`` with a SuperNode beside it, each its own process (group).

``Deployment`` makes the credentials (``dpa.federation.deployment.credentials``), starts the edge servers,
lets the federation's devices enrol at their own edge server over dpa's protocol (class sums, or
per-example DP-A releases for SplitFed), starts the SuperLink, registers each SuperNode's public key
(``flwr supernode register``), starts the SuperNodes, and runs the app with ``flwr run``. The processes
and flags are those ``docs/federation.md`` gives an operator for separate machines; here every address
is 127.0.0.1. Tests and ``dpa federate --deployment`` use it, and the fault drills kill its processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpa.contract import messages
from dpa.contract.manifest import load_manifest, manifest_sha256
from dpa.federation.config import FederationConfig
from dpa.federation.deployment import credentials
from dpa.federation.deployment.keys import CLASS_SUMS, SPLITFED, Node, Run
from dpa.federation.deployment.server_app import REPORT
from dpa.federation.device_app import device_release
from dpa.federation.population import draw_faces
from dpa.federation.splitfed import device_releases
from dpa.runs.loopback import free_port
from runtime_client.edge import EdgeClient
from runtime_server.auth import add_token

__all__ = ["Deployment", "DeploymentConfig", "APP_DIR"]

APP_DIR = Path(__file__).resolve().parents[1] / "federation" / "deployment" / "flower_app"
_BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode and flwr beside this Python
_CONNECTION = "dpa"  # the SuperLink connection's name in the Flower configuration


@dataclass(frozen=True)
class DeploymentConfig:
    federation: FederationConfig  # devices, edge servers, budget, seed, the export (its state_dir holds devices)
    recipe: str = CLASS_SUMS  # or SPLITFED
    folder: Path | None = None  # processes' files (credentials, logs, stores); None: <state_dir>/deployment
    round_timeout_s: float = 60.0  # one attempt's wait for the edge servers (the ServerApp's)
    attempts: int = 3

    def __post_init__(self) -> None:
        if self.recipe not in (CLASS_SUMS, SPLITFED):
            raise ValueError(f"recipe must be {CLASS_SUMS!r} or {SPLITFED!r}, got {self.recipe!r}")

    @property
    def root(self) -> Path:
        return self.folder if self.folder is not None else self.federation.state_dir / "deployment"


@dataclass
class _Edge:
    number: int
    port: int
    folder: Path
    device_tokens: dict[int, str]
    server: subprocess.Popen | None = None  # type: ignore[type-arg]
    supernode: subprocess.Popen | None = None  # type: ignore[type-arg]
    supernode_port: int = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:  # type: ignore[type-arg]
    """A process in its own session (process group): a drill kills it with its children, as a machine would."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        path = f"{_BIN}{os.pathsep}{os.environ.get('PATH', '')}"  # Flower starts flower-superexec by name
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "PATH": path, **(env or {})}
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, wait_s: float = 30.0) -> None:  # type: ignore[type-arg]
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(wait_s)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(wait_s)


class Deployment:
    def __init__(self, cfg: DeploymentConfig, say: Callable[[str], None] = print) -> None:
        self.cfg, self.say = cfg, say
        self.root = cfg.root.resolve()  # Flower's configuration and every node config take absolute paths
        self.tls = credentials.make_tls(self.root / "tls")
        self.flwr_home = self.root / "flwr-home"  # the operator's machine: flwr's SuperLink connection
        self.superlink_port = free_port()
        self.superlink: subprocess.Popen | None = None  # type: ignore[type-arg]
        self.edges: list[_Edge] = []
        self._ssl = ssl.create_default_context(cafile=str(self.tls.ca))

    # ------------------------------------------------------------------ edge servers and their devices

    def start_edge_servers(self) -> None:
        fed = self.cfg.federation
        for k in range(fed.edge_servers):
            folder = self.root / f"edge-{k}"
            tokens = folder / "tokens.txt"
            if not tokens.is_file():
                operator = add_token(tokens, credentials.BRIDGE)
                (folder / "bridge.token").write_text(operator + "\n")
                os.chmod(folder / "bridge.token", 0o600)
                for d in range(fed.devices):
                    if fed.edge_of(d) == k:
                        (folder / f"device-{d:04d}.token").write_text(add_token(tokens, f"device-{d:04d}") + "\n")
            devices = {d: (folder / f"device-{d:04d}.token").read_text().strip()
                       for d in range(fed.devices) if fed.edge_of(d) == k}  # fmt: skip
            self.edges.append(_Edge(k, free_port(), folder, devices))
        for edge in self.edges:
            self.start_edge_server(edge.number)
        for edge in self.edges:
            self._wait_healthy(edge)

    def start_edge_server(self, k: int) -> None:
        edge = self.edges[k]
        cmd = [sys.executable, "-m", "dpa.cli.app", "serve", "--artifacts", str(self.cfg.federation.artifacts),
               "--port", str(edge.port), "--device", "cpu", "--state-dir", str(edge.folder / "state"),
               "--tokens", str(edge.folder / "tokens.txt"), "--operator", credentials.BRIDGE,
               "--gallery-size", str(self.cfg.federation.identities), "--tls-cert", str(self.tls.cert),
               "--tls-key", str(self.tls.key), "--log-format", "text", "--session-rate", "1000",
               "--session-burst", "1000"]  # fmt: skip
        edge.server = _spawn(cmd, edge.folder / "serve.log")

    def _wait_healthy(self, edge: _Edge, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(edge.url + messages.route(messages.Route.HEALTH), timeout=2, context=self._ssl)
                return
            except OSError:
                assert edge.server is not None
                if edge.server.poll() is not None or time.monotonic() > deadline:
                    log = (edge.folder / "serve.log").read_text()[-2000:]
                    raise RuntimeError(f"edge server {edge.number} did not start:\n{log}") from None
                time.sleep(0.2)

    def enrol_devices(self) -> dict[str, Any]:
        """Every device releases to its own edge server over dpa's protocol (TLS, its token); what each sent."""
        fed = self.cfg.federation
        draw_faces(fed, load_manifest(fed.artifacts).image_size)
        digest = manifest_sha256(fed.artifacts)
        sent: dict[str, Any] = {}

        async def device(d: int) -> None:
            edge = self.edges[fed.edge_of(d)]
            async with EdgeClient(edge.url, token=edge.device_tokens[d], ca=self.tls.ca) as client:
                if self.cfg.recipe == CLASS_SUMS:
                    body, data, plan = device_release(fed, d)
                    labels = {"mechanism": messages.LabelMechanism.IN_CLASS_SUMS}
                    sid = (await client.open_session(digest, labels=labels, gallery_rows=data.identities)).session_id
                    answer = await client.class_sums(sid, body)
                    sent[str(d)] = {
                        "edge": edge.number,
                        "retry": answer["retry"],
                        "identities": list(data.identities),
                        "epsilon": float(plan.accountant.summary()["epsilon"]),
                    }
                    return
                act, labels_sent, account = device_releases(fed, d)
                sid = (await client.open_session(digest, labels=messages.labels_field(fed.label_epsilon))).session_id
                for step, start in enumerate(range(0, len(labels_sent), fed.batch_size), 1):
                    rows = slice(start, start + fed.batch_size)
                    await client.train(sid, step, act[rows], labels_sent[rows])
                sent[str(d)] = {"edge": edge.number, "examples": len(labels_sent), "epsilon": account["epsilon"]}

        async def all_devices() -> None:
            for d in range(fed.devices):  # one device at a time per edge server: the order its tail trains in
                await device(d)

        asyncio.run(all_devices())
        return sent

    # ------------------------------------------------------------------ Flower's processes

    def _flwr_env(self) -> dict[str, str]:
        return {"FLWR_HOME": str(self.flwr_home)}

    def start_superlink(self) -> None:
        home = self.flwr_home
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{_CONNECTION}"\n\n[superlink.{_CONNECTION}]\n'
            f'address = "127.0.0.1:{self.superlink_port}"\nroot-certificates = "{self.tls.ca}"\n'
        )
        cmd = [str(_BIN / "flower-superlink"), "--ssl-ca-certfile", str(self.tls.ca), "--ssl-certfile",
               str(self.tls.cert), "--ssl-keyfile", str(self.tls.key), "--enable-supernode-auth",
               "--disable-runtime-dependency-installation", "--database", str(self.root / "superlink.db"),
               "--host", "127.0.0.1", "--port", str(self.superlink_port)]  # fmt: skip
        log = self.root / "superlink.log"
        offset = log.stat().st_size if log.is_file() else 0  # a restart appends to the first start's log
        self.superlink = _spawn(cmd, log, self._flwr_env())
        deadline = time.monotonic() + 60
        while "Uvicorn running" not in log.read_text()[offset:]:
            if self.superlink.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the SuperLink did not start:\n{(self.root / 'superlink.log').read_text()[-2000:]}")
            time.sleep(0.2)

    def flwr(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
        return subprocess.run([str(_BIN / "flwr"), *args], capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, **self._flwr_env(), "COLUMNS": "200"})  # fmt: skip

    def register(self, name: str, public_key: Path) -> None:
        done = self.flwr("supernode", "register", str(public_key), _CONNECTION, "--name", name)
        if done.returncode != 0:
            raise RuntimeError(f"flwr supernode register {public_key} failed:\n{done.stdout}{done.stderr}")

    def node_key(self, k: int) -> tuple[Path, Path]:
        private = self.root / "keys" / f"edge-{k}"
        return (private, private.with_suffix(".pub")) if private.is_file() else credentials.make_node_key(
            self.root / "keys", f"edge-{k}")  # fmt: skip

    def supernode_command(
        self, k: int, drill_pause_s: float = 0.0, private_key: Path | None = None, port: int | None = None,
        drill_at: str = "",
    ) -> list[str]:  # fmt: skip
        """``flower-supernode`` for edge server k: TLS to the SuperLink, its key, and where its edge server is;
        another key and port: a second SuperNode claiming to stand beside it (a test's intruder)."""
        edge = self.edges[k]
        edge.supernode_port = edge.supernode_port or free_port()
        artifacts = self.cfg.federation.artifacts.resolve()
        node = {Node.EDGE_ID: k, Node.EDGE_URL: edge.url, Node.EDGE_CA: str(self.tls.ca),
                Node.EDGE_STATE: str(edge.folder / "state"), Node.ARTIFACTS: str(artifacts),
                Node.OPERATOR_TOKEN: str(edge.folder / "bridge.token"), Node.BRIDGE_STATE: str(edge.folder / "bridge"),
                Node.DRILL_PAUSE_S: float(drill_pause_s), Node.DRILL_AT: drill_at}  # fmt: skip
        config = " ".join(f"{key}={json.dumps(value)}" for key, value in node.items())
        return [str(_BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.superlink_port}",
                "--root-certificates", str(self.tls.ca), "--auth-supernode-private-key",
                str(private_key or self.node_key(k)[0]), "--node-config", config, "--host", "127.0.0.1",
                "--port", str(port or edge.supernode_port)]  # fmt: skip

    def start_supernode(
        self, k: int, drill_pause_s: float = 0.0, patience_s: float = 150.0, drill_at: str = ""
    ) -> None:
        """Start edge server k's SuperNode and wait until the SuperLink has activated it.

        After a crash the SuperLink holds the node online until two missed heartbeats (Flower's fixed 30 s
        interval: up to 60 s) and refuses to activate it again meanwhile (the SuperNode exits, code 305).
        So this starts it again every few seconds until it is let in, as systemd's ``Restart=on-failure``
        does (``docs/federation.md``)."""
        edge = self.edges[k]
        home = {"FLWR_HOME": str(edge.folder / "flwr-home")}  # its own machine's Flower folder
        log = edge.folder / "supernode.log"
        deadline = time.monotonic() + patience_s
        while True:
            offset = log.stat().st_size if log.is_file() else 0
            edge.supernode = _spawn(self.supernode_command(k, drill_pause_s, drill_at=drill_at), log, home)
            while edge.supernode.poll() is None:
                with open(log, "rb") as f:
                    f.seek(offset)
                    if b"SuperNode ID:" in f.read():
                        return
                time.sleep(0.2)
            if time.monotonic() > deadline:
                raise RuntimeError(f"SuperNode {k} was not let in within {patience_s:g} s:\n{log.read_text()[-2000:]}")
            time.sleep(3.0)

    def start_federation(self) -> None:
        """SuperLink, every SuperNode's key registered, every SuperNode started."""
        self.start_superlink()
        for k in range(len(self.edges)):
            self.register(f"edge-{k}", self.node_key(k)[1])
            self.start_supernode(k)

    def kill_supernode(self, k: int) -> None:
        """SIGKILL the SuperNode's whole process group (its SuperExec and ClientApp too), as a machine's crash."""
        _stop(self.edges[k].supernode, signal.SIGKILL)

    def run_app(self, **run_config: Any) -> dict[str, Any]:
        """``flwr run`` the app to the end; the ServerApp's report (RuntimeError with its reason if it failed)."""
        fed = self.cfg.federation
        out = self.root / "out"
        report_file = out / REPORT
        report_file.unlink(missing_ok=True)
        rc = {Run.RECIPE: self.cfg.recipe, Run.EDGE_SERVERS: fed.edge_servers, Run.GALLERY_SIZE: fed.identities,
              Run.OUT: str(out), Run.ROUNDS: fed.rounds, Run.ROUND_TIMEOUT_S: float(self.cfg.round_timeout_s),
              Run.ATTEMPTS: self.cfg.attempts, **run_config}  # fmt: skip
        overrides = " ".join(f"{key}={json.dumps(value)}" for key, value in rc.items())
        timeout = 120 + self.cfg.attempts * self.cfg.round_timeout_s * (2 * fed.rounds + 1)
        done = self.flwr("run", str(APP_DIR), _CONNECTION, "--run-config", overrides, "--stream", timeout_s=timeout)
        (self.root / "flwr-run.log").write_text(done.stdout + done.stderr)
        if self.superlink is None or self.superlink.poll() is not None:
            raise RuntimeError(
                "the SuperLink is not running (it stopped before or during the run; its log: "
                f"{self.root / 'superlink.log'}): start it again (its --database keeps the registered SuperNodes, "
                "which reconnect by themselves) and run again; every answer is recomputed from the edge servers' "
                "stores, so nothing is counted twice"
            )
        if not report_file.is_file():
            raise RuntimeError(f"the run left no report; flwr run said:\n{(done.stdout + done.stderr)[-3000:]}")
        report = json.loads(report_file.read_text())
        if "error" in report:
            raise RuntimeError(f"the ServerApp stopped: {report['error']}")
        return report

    def tails(self) -> list[tuple[dict[str, np.ndarray], dict[str, Any]]]:
        """Each edge server's tail and meta, read as its bridge reads it (GET /v1/tail, operator token)."""

        async def read(edge: _Edge) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
            token = (edge.folder / "bridge.token").read_text().strip()
            async with EdgeClient(edge.url, token=token, ca=self.tls.ca) as client:
                return await client.tail()

        return [asyncio.run(read(edge)) for edge in self.edges]

    def stop(self) -> None:
        for edge in self.edges:
            _stop(edge.supernode)
        _stop(self.superlink)
        for edge in self.edges:
            _stop(edge.server)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
