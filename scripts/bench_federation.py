"""Class sums over Flower at scale: rounds per minute and peak memory for 20 / 100 devices, 1 / 4 edge
servers (issue 25). A benchmark, not a test; its figures go to BENCHMARKS.md. From the repository root:

    python scripts/bench_federation.py            # 20 and 100 devices x 1 and 4 edge servers

Each configuration runs in a fresh process (Flower's simulation engine and Ray start and stop with it): two
enrolment rounds (the first draws and releases, the second re-sends the kept releases, which every edge
server keeps once), then the gallery round. Peak memory is the largest resident set of the run's process
tree (the simulation driver and its Ray workers), sampled every 0.2 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path("runs/bench-federation")


def _export(out: Path) -> None:
    from dpa.contract.architecture import ArchConfig
    from dpa.contract.manifest import OptimizerConfig
    from dpa.runs.shipped_weights import SHIPPED_WEIGHTS
    from exporter.export import ExportConfig, export
    from exporter.pretrain import PRETRAIN_PIXEL_STD, public_faces

    if (out / "manifest.json").is_file():
        return
    centre = public_faces(ROOT / "public", 40, 10, 64)
    export(ExportConfig(arch=ArchConfig(image_size=64, width=0.25, num_classes=10, dropout=0.0), cut="fc7",
                        optimizer=OptimizerConfig(lr=0.01), out=out, weights=SHIPPED_WEIGHTS,
                        pixel_std=PRETRAIN_PIXEL_STD, centre_faces=centre, seed=0))  # fmt: skip


def _tree_rss(root: int) -> int:
    """Bytes resident in ``root`` and every process below it (Linux /proc)."""
    parents, rss = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            pid = int(stat.parent.name)
            parents[pid], rss[pid] = int(fields[1]), int(fields[21]) * 4096
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    return sum(rss.get(p, 0) for p in tree)


def run_one(devices: int, edges: int) -> dict:
    state = ROOT / f"state-{devices}x{edges}"
    subprocess.run(["rm", "-rf", str(state)], check=True)
    cmd = ["dpa", "federate", "--artifacts", str(ROOT / "artifacts"), "--state-dir", str(state), "--devices",
           str(devices), "--edge-servers", str(edges), "--rounds", "2", "--seed", "0"]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.2)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}")
    report = json.loads((state / "report.json").read_text())
    rounds = report["rounds"]
    return {"devices": devices, "edge_servers": edges, "wall_s": round(wall, 1),
            "round_1_s": rounds[0]["seconds"], "round_2_s": rounds[1]["seconds"],
            "rounds_per_min_first": round(60 / rounds[0]["seconds"], 2),
            "rounds_per_min_replay": round(60 / rounds[1]["seconds"], 2),
            "peak_rss_mb": round(peak / 2**20), "releases": report["releases"],
            "recognition": report["recognition"]["accuracy"]}  # fmt: skip


if __name__ == "__main__":
    ROOT.mkdir(parents=True, exist_ok=True)
    _export(ROOT / "artifacts")
    asked = [tuple(map(int, a.split("x"))) for a in sys.argv[1:]]  # e.g. 20x4
    configs = asked or [(20, 1), (20, 4), (100, 1), (100, 4)]
    results = [run_one(d, e) for d, e in configs]
    for r in results:
        print(json.dumps(r))
    (ROOT / "results.json").write_text(json.dumps(results, indent=1) + "\n")
