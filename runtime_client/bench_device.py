"""The device half of ``dpa bench``'s memory figure: a device that takes ``steps`` DP-A steps against a running
server, then prints its own peak RSS as JSON.

Run as its own process (``python -m runtime_client.bench_device ARTIFACTS URL BATCH STEPS MICRO``), as a
phone would run it: its memory is then the device's alone, not the benchmark's (which has torch loaded). It
imports only the device's packages, and says whether torch came in anyway.
"""

from __future__ import annotations

import asyncio
import json
import sys
import warnings
from pathlib import Path

import numpy as np

from dpa.base.memory import own_peak_rss_mb
from dpa.contract.devices import resolve_device
from dpa.contract.manifest import load_manifest, manifest_sha256
from dpa.privacy.mechanism import DPActivations, DPConfig
from runtime_client.edge import EdgeClient
from runtime_client.head import HeadModel
from runtime_client.split_step import SplitTrainer

__all__ = ["run_steps"]

#: The bench's release: a clip above the random head's activations and a per-release epsilon (its figures
#: are of memory, not of accuracy).
BENCH_RELEASE = DPConfig(clip=100.0, epsilon=8.0)


async def run_steps(artifacts: Path, url: str, batch: int, steps: int, micro: int | None) -> None:
    """``steps`` DP-A steps of random images at the arm64 profile's thread setting (a phone's)."""
    m = load_manifest(artifacts)
    head = HeadModel(artifacts, m, resolve_device("arm64"))
    dp = DPActivations(BENCH_RELEASE, np.random.default_rng())
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, *m.input_shape), dtype=np.float32)
    labels = rng.integers(0, m.num_classes, batch)
    async with EdgeClient(url) as edge:
        s = await edge.open_session(manifest_sha256(artifacts))
        trainer = SplitTrainer(head, edge, s.session_id, dp, micro_batch=micro)
        for _ in range(steps):
            await trainer.step(images, labels)


def main(argv: list[str]) -> None:
    artifacts, url, batch, steps, micro = argv
    warnings.simplefilter("ignore")
    asyncio.run(run_steps(Path(artifacts), url, int(batch), int(steps), None if micro == "none" else int(micro)))
    print(json.dumps({"peak_rss_mb": own_peak_rss_mb(), "torch_loaded": "torch" in sys.modules}))


if __name__ == "__main__":
    main(sys.argv[1:])
