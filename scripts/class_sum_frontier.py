"""Clean on-device accuracy against the whole run's epsilon: class sums against per-example releases.

Usage: python scripts/class_sum_frontier.py [WORKDIR] [SEEDS]   (defaults: runs/demo 3; run `dpa demo` first)

Each point is the real pipeline on loopback (``dpa.runs.loopback.serve_and_train``) on the demo's private
faces (10 identities, 75 training and 25 held-out images each), the demo's pretrained head frozen and
exported at the cut with its public centre and clip, the device classifying its clean held-out images with
the server's templates. Two recipes at each whole-run epsilon (delta 1e-5):

* class sums (``--release class-sums``): one release of the per-class sums, labels inside it;
* per-example (``--release examples``): each example's activation released once, its label randomised
  at label epsilon min(4, epsilon / 2) inside the same budget.

The non-private reference is the demo's (head + tail, no noise). Only the seed changes between repeats
(the noise and the labels' randomisation). Writes ``class_sum_frontier.json`` and ``.png`` in WORKDIR and
prints a table; about 6 minutes on 2 cores.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np

from dpa.contract.devices import DeviceProfile
from dpa.contract.manifest import load_manifest
from dpa.privacy.mechanism import DPConfig
from dpa.privacy.release_clip import release_clip
from dpa.runs.demo import DemoConfig, _export, _private_faces
from dpa.runs.loopback import serve_and_train
from runtime_client.config import ClientConfig, ReleaseKind

CUTS = ("conv1_1", "fc7")
EPSILONS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
PER_EXAMPLE_EPSILONS = (1.0, 8.0, 64.0)


def _run(art: Path, run: Path, clip: float, private: Path, seed: int, eps: float, release: ReleaseKind) -> float:
    shutil.rmtree(run, ignore_errors=True)
    noisy = math.isfinite(eps)
    label_eps = min(4.0, eps / 2) if noisy and release is ReleaseKind.EXAMPLES else math.inf
    client = ClientConfig(
        artifacts=art, device=DeviceProfile.CPU, epochs=1, batch_size=8,
        dp=DPConfig(clip=clip, epsilon=None if noisy else math.inf), total_epsilon=eps if noisy else None,
        label_epsilon=label_eps, frozen_head=True, on_device_templates=True, release=release, data=str(private),
        seed=seed, state_dir=run / "client", progress=False,
    )  # fmt: skip
    report = asyncio.run(serve_and_train(art, run / "server", client, templates=True, clean=False))
    return float(report["on_device"]["test_accuracy"])


def main() -> None:
    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
    seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    cfg = DemoConfig(workdir=workdir)
    weights = workdir / "pretrained" / "weights.pt"
    if not weights.is_file():
        raise SystemExit(f"no pretrained weights at {weights}: run `dpa demo --workdir {workdir}` first")
    reference = json.loads((workdir / "non-private" / "report.json").read_text())
    nonprivate = max(reference["clean_test_accuracy"], reference["on_device"]["test_accuracy"])
    public = next((workdir / "pretrained" / "faces").iterdir())
    private = _private_faces(cfg)
    warnings.simplefilter("ignore")  # fixed seeds are the point here
    points = []
    for cut in CUTS:
        art = workdir / f"artifacts-{cut}"
        if not art.is_dir():
            _export(cfg, cut, weights, public)
        clip = release_clip(load_manifest(art), source=art)
        plan = [(ReleaseKind.CLASS_SUMS, e) for e in EPSILONS] + [
            (ReleaseKind.EXAMPLES, e) for e in PER_EXAMPLE_EPSILONS
        ]
        for release, eps in plan:
            accs = [_run(art, workdir / "cs-frontier" / "run", clip, private, s, eps, release)
                    for s in range(seeds if math.isfinite(eps) else 1)]  # fmt: skip
            points.append({"cut": cut, "release": release.value, "epsilon_total": None if math.isinf(eps) else eps,
                           "delta": 1e-5, "accuracy_mean": float(np.mean(accs)), "accuracies": accs,
                           "share_of_nonprivate": float(np.mean(accs)) / nonprivate})  # fmt: skip
            p = points[-1]
            print(f"{cut} {release.value:10s} eps {eps:>6g}: {p['accuracy_mean']:.3f} ({min(accs):.3f}-{max(accs):.3f})"
                  f", {p['share_of_nonprivate']:.0%} of non-private {nonprivate:.3f}", flush=True)  # fmt: skip
    out = {"nonprivate_clean_accuracy": nonprivate, "chance": 0.1, "seeds": seeds, "points": points}
    (workdir / "class_sum_frontier.json").write_text(json.dumps(out, indent=2) + "\n")
    _plot(out, workdir / "class_sum_frontier.png")
    print(f"wrote {workdir / 'class_sum_frontier.json'} and {workdir / 'class_sum_frontier.png'}")


def _plot(out: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.4, 4.0), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    for cut, colour in zip(CUTS, ("tab:orange", "tab:blue"), strict=True):
        for release, style in (("class-sums", "-o"), ("examples", "--s")):
            pts = [p for p in out["points"] if p["cut"] == cut and p["release"] == release and p["epsilon_total"]]
            if pts:
                ax.plot([p["epsilon_total"] for p in pts], [p["accuracy_mean"] for p in pts], style, color=colour,
                        label=f"{cut}, {'class sums' if release == 'class-sums' else 'per-example'}")  # fmt: skip
        clear = [p for p in out["points"] if p["cut"] == cut and p["epsilon_total"] is None]
        if clear:
            ax.axhline(clear[0]["accuracy_mean"], color=colour, lw=0.8, ls=":", label=f"{cut}, class sums, no noise")
    ax.axhline(out["nonprivate_clean_accuracy"], color="black", lw=1, label="non-private (head + tail)")
    ax.axhline(0.8 * out["nonprivate_clean_accuracy"], color="grey", lw=0.8, ls="--", label="80% of non-private")
    ax.axhline(out["chance"], color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("whole-run epsilon (delta 1e-5, labels included)")
    ax.set_ylabel("clean held-out accuracy on the device")
    ax.set_title("Built-in faces, 10 identities x 75 training images", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
