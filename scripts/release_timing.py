"""Time one DP-A release (clip + noise + rescale) at paper size: 224x224 conv1_1, batch 8, 25.7 M elements.

Usage: python scripts/release_timing.py [REPEATS]. Prints the median and the spread of the release's
wall time with the request buffer reused, as the device does. Run it on two checkouts to compare.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from dpa.privacy.mechanism import DPActivations, DPConfig


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    rng = np.random.default_rng(0)
    activation = rng.standard_normal((8, 64, 224, 224), dtype=np.float32)
    out = np.empty_like(activation)
    dp = DPActivations(DPConfig(clip=100.0, epsilon=8.0), np.random.default_rng(1))
    dp.release(activation, out=out)  # warm: threads, pages
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dp.release(activation, out=out)
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4)
    median = statistics.median(times)
    print(f"release at paper size: median {median:.4f} s (quartiles {q[0]:.4f}-{q[2]:.4f}), {repeats} runs")


if __name__ == "__main__":
    main()
