"""What a cut costs the device: FLOPs share and wire bytes (from the architecture), and measured
head step time and peak memory (onnxruntime, in a fresh process so the peak is the head's own)."""

from __future__ import annotations

import multiprocessing
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from dpa.base.memory import own_peak_rss_mb
from dpa.contract.architecture import ArchConfig, cut_info
from dpa.contract.devices import DeviceProfile, resolve_device
from dpa.contract.manifest import load_manifest
from runtime_client.head import HeadModel

__all__ = ["device_cost", "forward_cost"]


def _measure(artifacts: str, batch: int, repeats: int) -> dict[str, float]:
    """In the child: one head step = forward, backward with a unit upstream gradient, optimizer step."""
    manifest = load_manifest(Path(artifacts), verify=("head",))
    head = HeadModel(Path(artifacts), manifest, resolve_device(DeviceProfile.CPU))
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, *manifest.input_shape)).astype(np.float32)
    upstream = np.ones((batch, *manifest.activation_shape), dtype=np.float32)
    times = []
    for _ in range(repeats + 1):  # the first call warms onnxruntime up
        t0 = time.perf_counter()
        head.forward(images, keep=True)  # as the device's whole-batch step (runtime_client.split_step)
        head.backward_step(images, upstream)
        times.append(time.perf_counter() - t0)
    return {
        "head_step_ms": 1000 * statistics.median(times[1:]),
        "peak_rss_mb": own_peak_rss_mb(),
    }


def device_cost(artifacts: Path, *, batch: int, repeats: int = 5) -> dict[str, Any]:
    """FLOPs share, parameters share and wire bytes per example of the export's cut, and the
    measured head step (median of ``repeats``) and the device process's peak RSS."""
    m = load_manifest(artifacts)
    info = cut_info(ArchConfig(image_size=m.image_size, width=m.width, num_classes=m.num_classes), m.cut)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        measured = pool.apply(_measure, (str(artifacts), batch, repeats))
    return {
        "head_flops_share": info.head_flops_share,
        "head_params_share": info.head_params_share,
        "wire_bytes_per_example": info.bytes_per_example,
        **measured,
    }


def _measure_forward(artifacts: str, batch: int, repeats: int) -> dict[str, float]:
    """In the child: what a class-sum device runs per batch, the frozen head's forward."""
    manifest = load_manifest(Path(artifacts), verify=("head",))
    head = HeadModel(Path(artifacts), manifest, resolve_device(DeviceProfile.CPU), frozen=True)
    images = np.random.default_rng(0).standard_normal((batch, *manifest.input_shape)).astype(np.float32)
    times = []
    for _ in range(repeats + 1):  # the first call warms onnxruntime up
        t0 = time.perf_counter()
        head.forward(images)
        times.append(time.perf_counter() - t0)
    return {"forward_s": statistics.median(times[1:]),
            "peak_rss_mb": own_peak_rss_mb()}  # fmt: skip


def forward_cost(artifacts: Path, *, batch: int, repeats: int = 5) -> dict[str, float]:
    """The frozen head's forward per batch (median of ``repeats``) and the device process's peak RSS,
    measured in a fresh process: the class-sum recipe's whole cost on the device, beside a clip and a sum."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return dict(pool.apply(_measure_forward, (str(artifacts), batch, repeats)))
