"""The demo's private recipe at several cuts and seeds: how much of a difference between cuts is the noise's.

Usage: python scripts/seed_spread.py [WORKDIR] [LABEL_EPSILON] [CUTS] [SEEDS]
       (defaults: runs/demo 4 pool5,fc7 4; run `dpa demo` first: it pretrains and draws the faces)

Each run is the real pipeline on loopback (``dpa.runs.loopback.serve_and_train``): the pretrained head
frozen, exported at the cut with the demo's public centre and clip, each example released once, noise
and randomised labels within a whole-run epsilon of 8 (delta 1e-5), the server's class templates, and
the device's clean held-out accuracy with them. Only the seed changes (noise, labels, shuffling); the
train/test split stays the demo's. ``LABEL_EPSILON`` inf sends labels in clear (the whole budget then
goes to the activations). Prints each cut's accuracies, their mean and range.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import sys
import warnings
from pathlib import Path

from dpa.contract.devices import DeviceProfile
from dpa.contract.manifest import load_manifest
from dpa.privacy.mechanism import DPConfig
from dpa.privacy.release_clip import release_clip
from dpa.runs.demo import DemoConfig, _export, _private_faces
from dpa.runs.loopback import serve_and_train
from runtime_client.config import ClientConfig


def main() -> None:
    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
    label_epsilon = float(sys.argv[2]) if len(sys.argv) > 2 else 4.0
    cuts = (sys.argv[3] if len(sys.argv) > 3 else "pool5,fc7").split(",")
    seeds = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    cfg = DemoConfig(workdir=workdir)
    weights = workdir / "pretrained" / "weights.pt"
    if not weights.is_file():
        raise SystemExit(f"no pretrained weights at {weights}: run `dpa demo --workdir {workdir}` first")
    public = next((workdir / "pretrained" / "faces").iterdir())
    private = _private_faces(cfg)
    warnings.simplefilter("ignore")  # fixed seeds and labels in clear are the point here
    for cut in cuts:
        art = workdir / f"artifacts-{cut}"
        if not art.is_dir():
            _export(cfg, cut, weights, public)
        clip = release_clip(load_manifest(art), source=art)
        accs = []
        for seed in range(seeds):
            run = workdir / "seed-spread" / f"{cut}-{seed}"
            shutil.rmtree(run, ignore_errors=True)
            client = ClientConfig(
                artifacts=art, device=DeviceProfile.CPU, epochs=1, batch_size=cfg.batch_size,
                dp=DPConfig(clip=clip, epsilon=None, delta=cfg.delta), total_epsilon=cfg.total_epsilon,
                label_epsilon=label_epsilon, frozen_head=True, on_device_templates=True, data=str(private),
                seed=seed, state_dir=run / "client", progress=False,
            )  # fmt: skip
            report = asyncio.run(serve_and_train(art, run / "server", client, templates=True, clean=False))
            accs.append(report["on_device"]["test_accuracy"])
        labels = "in clear" if math.isinf(label_epsilon) else f"at epsilon {label_epsilon:g}"
        print(f"{cut}, labels {labels}: {', '.join(f'{a:.3f}' for a in accs)}; mean {sum(accs) / len(accs):.3f}, "
              f"range {min(accs):.3f}-{max(accs):.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
