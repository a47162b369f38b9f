"""``dpa federate``: class sums over Flower's simulation engine, many devices and several edge servers.

The ServerApp asks every node which device it is (``hello``), then runs the enrolment rounds: each device
answers with its release (``dpa.federation.device_app``), each edge server keeps its devices' releases
once (``dpa.federation.gallery``), and a round goes on without the devices that fail or do not answer
within the round's timeout, naming them. Then each enrolled device gets its identities' templates from
the combined gallery and recognises its held-out images locally. The report says who was kept, who
replayed, who was missing, each device's epsilon, and the gallery's figures.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from dpa.base.atomic import atomic_write_bytes
from dpa.contract.manifest import load_manifest
from dpa.federation.config import FederationConfig
from dpa.federation.device_app import ENROL, GALLERY, HELLO, device_app
from dpa.federation.gallery import Gallery, Refused
from dpa.federation.population import draw_faces

__all__ = ["federate"]

log = logging.getLogger(__name__)


def _ask(grid: Grid, nodes: list[int], what: str, timeout: float, extra: dict[int, RecordDict] | None = None):  # type: ignore[no-untyped-def]
    msgs = []
    for n in nodes:
        content = RecordDict({"do": ConfigRecord({"what": what})})
        for key, record in (extra or {}).get(n, RecordDict()).items():
            content[key] = record
        msgs.append(Message(content, dst_node_id=n, message_type="query"))
    return list(grid.send_and_receive(msgs, timeout=timeout))


def _wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return nodes


def _server_app(cfg: FederationConfig, report: dict[str, Any], say: Callable[[str], None]) -> ServerApp:
    manifest = load_manifest(cfg.artifacts)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        started = time.perf_counter()
        nodes = _wait_for_nodes(grid, cfg.devices, cfg.round_timeout_s)
        device_of: dict[int, int] = {}
        for reply in _ask(grid, nodes, HELLO, cfg.round_timeout_s):
            if not reply.has_error():
                device_of[reply.metadata.src_node_id] = int(reply.content["device"]["device"])
        gallery = Gallery(cfg, manifest)
        accounts: dict[int, dict[str, float]] = {}
        identities: dict[int, list[int]] = {}
        rounds = []
        for r in range(1, cfg.rounds + 1):
            t0 = time.perf_counter()
            kept, replayed, refused, answered, errors = [], [], [], set(), {}
            for reply in _ask(grid, nodes, ENROL, cfg.round_timeout_s):
                node = reply.metadata.src_node_id
                if reply.has_error():  # the device failed: its reason, in one line, for the report
                    lines = [ln.strip() for ln in str(reply.error.reason).splitlines() if ln.strip()]
                    errors[str(device_of.get(node, -1))] = (lines[-1] if lines else "failed")[:300]
                    continue
                info = reply.content["device"]
                device, body = int(info["device"]), reply.content["release"]["body"].numpy().tobytes()
                answered.add(node)
                if hashlib.sha256(body).hexdigest() != info["sha256"]:
                    refused.append({"device": device, "why": "the release's bytes do not match its digest"})
                    continue
                try:
                    new = gallery.keep(device, list(info["identities"]), body)
                except Refused as exc:
                    refused.append({"device": device, "why": str(exc)})
                    continue
                (kept if new else replayed).append(device)
                identities[device] = [int(g) for g in info["identities"]]
                accounts[device] = {"epsilon": float(info["epsilon"]), "delta": float(info["delta"]),
                                    "noise_multiplier": float(info["noise_multiplier"])}  # fmt: skip
            missing = sorted(device_of.get(n, -1) for n in nodes if n not in answered)
            rounds.append({"round": r, "kept": sorted(kept), "replayed": sorted(replayed), "refused": refused,
                           "missing": missing, "errors": errors,
                           "seconds": round(time.perf_counter() - t0, 3)})  # fmt: skip
            say(f"round {r}: {len(kept)} releases kept, {len(replayed)} replays kept once, {len(refused)} refused, "
                f"missing devices {missing or 'none'}")  # fmt: skip
        templates, counts = gallery.templates()
        back = {n: RecordDict({"gallery": ArrayRecord({
            "templates": Array(np.ascontiguousarray(templates[identities[d]])),
            "counts": Array(np.ascontiguousarray(counts[identities[d]]))})})
            for n, d in device_of.items() if d in identities}  # fmt: skip
        correct = probes = 0
        for reply in _ask(grid, list(back), GALLERY, cfg.round_timeout_s, back):
            if not reply.has_error():
                correct += int(reply.content["recognition"]["correct"])
                probes += int(reply.content["recognition"]["probes"])
        report.update({
            "devices": cfg.devices, "edge_servers": cfg.edge_servers, "identities": cfg.identities,
            "releases": gallery.releases, "per_edge_server": [len(s) for s in gallery.stores],
            "rounds": rounds, "accounts": {str(d): a for d, a in sorted(accounts.items())},
            "identities_of": {str(d): ids for d, ids in sorted(identities.items())},
            "gallery_identities": int((counts > 0).sum()),
            "recognition": {"correct": correct, "probes": probes, "accuracy": correct / probes if probes else None},
            "seconds": round(time.perf_counter() - started, 3),
        })  # fmt: skip
        gallery_file = cfg.state_dir / "gallery.npz"
        buf = io.BytesIO()
        np.savez(buf, templates=templates, counts=counts)
        atomic_write_bytes(gallery_file, buf.getvalue())
        report["gallery"] = str(gallery_file)

    return app


def federate(cfg: FederationConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the federation in Flower's simulation engine; the report (also ``<state_dir>/report.json``)."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    draw_faces(cfg, load_manifest(cfg.artifacts).image_size)
    report: dict[str, Any] = {}
    backend = {"client_resources": {"num_cpus": 1},
               "init_args": {"num_cpus": cfg.actors, "include_dashboard": False, "log_to_driver": False,
                             "logging_level": logging.ERROR}}  # fmt: skip
    run_simulation(_server_app(cfg, report, say), device_app(cfg), num_supernodes=cfg.devices, backend_config=backend)
    if not report:
        raise RuntimeError("the Flower ServerApp ended without a report (see Flower's log above)")
    atomic_write_bytes(cfg.state_dir / "report.json", (json.dumps(report, indent=1) + "\n").encode())
    return report
