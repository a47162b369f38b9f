"""Flower's deployment runtime against its simulation engine, the same work on one machine (issue 38). A
benchmark, not a test; its figures go to BENCHMARKS.md. From the repository root:

    python scripts/bench_deployment.py            # 100 devices x 4 edge servers (25 each), class sums

The deployment: 4 ``dpa serve`` processes (TLS, tokens), 100 devices releasing to them over HTTPS (in this
process, one after another), a TLS SuperLink with SuperNode authentication and 4 SuperNodes, the app run
twice with ``flwr run`` (the second run asks again and gets the same answers: a retried round). Memory is
each process tree's peak resident set (VmHWM of every process in it, summed), read before it stops. The
simulation: ``dpa federate`` with the same devices and edge servers (``scripts/bench_federation.py``'s run).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_federation import ROOT, _export, run_one  # noqa: E402

from dpa.federation.config import FederationConfig  # noqa: E402
from dpa.runs.flower_deployment import Deployment, DeploymentConfig  # noqa: E402


def _tree(root: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = [root], [root]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier and p not in tree]
        tree += frontier
    return tree


def _peak_mb(root: int) -> int:
    total = 0
    for pid in _tree(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return round(total / 2**20)


def deployment(devices: int, edges: int) -> dict:
    state = ROOT / f"deploy-{devices}x{edges}"
    if state.exists():
        import shutil

        shutil.rmtree(state)
    cfg = FederationConfig(artifacts=ROOT / "artifacts", state_dir=state, devices=devices, edge_servers=edges, seed=0)
    times = {}
    t = time.perf_counter()
    with Deployment(DeploymentConfig(cfg, round_timeout_s=120), say=lambda _m: None) as dep:
        dep.start_edge_servers()
        times["edge_servers_start_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        dep.enrol_devices()
        times["devices_enrol_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        dep.start_federation()
        times["flower_start_s"] = round(time.perf_counter() - t, 1)
        runs = []
        for _ in range(2):
            t = time.perf_counter()
            report = dep.run_app()
            runs.append({"flwr_run_s": round(time.perf_counter() - t, 1), "server_app_s": report["seconds"]})
        memory = {"superlink_mb": _peak_mb(dep.superlink.pid),  # type: ignore[union-attr]
                  "supernode_mb": [_peak_mb(e.supernode.pid) for e in dep.edges],  # type: ignore[union-attr]
                  "dpa_serve_mb": [_peak_mb(e.server.pid) for e in dep.edges]}  # type: ignore[union-attr]  # fmt: skip
    return {"devices": devices, "edge_servers": edges, **times, "runs": runs,
            "rounds_per_min": round(60 / runs[1]["server_app_s"], 1), **memory,
            "bytes_per_edge_server": report["bytes_per_edge_server"], "releases": report["releases"],
            "gallery_identities": report["gallery_identities"]}  # fmt: skip


if __name__ == "__main__":
    ROOT.mkdir(parents=True, exist_ok=True)
    _export(ROOT / "artifacts")
    results = {"deployment": deployment(100, 4), "simulation": run_one(100, 4)}
    print(json.dumps(results, indent=1))
    (ROOT / "deployment-results.json").write_text(json.dumps(results, indent=1) + "\n")
