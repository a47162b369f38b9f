"""What dlib's face network costs the device at its real size (150x150 chips, batch 8): the device's head in
onnxruntime beside the same network in torch and dlib's own ``compute_face_descriptor``, in one run.

Each contender runs in a fresh spawned process, so its peak RSS (VmHWM) is its own; each times the forward of
the same batch of 8 chips (rendered faces: the cost does not depend on who is in them), median of
``repeats`` after one warm-up call.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dpa.base.memory import own_peak_rss_mb
from dpa.base.timing import median_seconds
from dpa.contract import dlib_resnet as layout
from dpa.faces.chips import preprocess_chips, rendered_chips

__all__ = ["dlib_device_cost"]


def _timed(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    return {"forward_ms": 1000 * median_seconds(fn, repeats), "peak_rss_mb": own_peak_rss_mb()}


def _ours(artifacts: str, batch: int, repeats: int) -> dict[str, Any]:
    from dpa.contract.devices import DeviceProfile, resolve_device
    from dpa.contract.manifest import load_manifest
    from runtime_client.head import HeadModel

    manifest = load_manifest(Path(artifacts), verify=("head",))
    head = HeadModel(Path(artifacts), manifest, resolve_device(DeviceProfile.CPU), frozen=True)
    x = preprocess_chips(rendered_chips(batch))
    # The device's own process: its memory is the device's only if nothing pulled torch in.
    return _timed(lambda: head.forward(x), repeats) | {"torch_loaded": "torch" in sys.modules}


def _torch(batch: int, repeats: int, mirror: bool = False) -> dict[str, float]:
    import torch

    from exporter.networks.dlib import default_dat
    from exporter.networks.dlib_resnet import build_parts, load_dat

    head, tail = build_parts("embedding", num_classes=2, mirror=mirror)
    load_dat((head, tail), default_dat(), seed=0)
    head.eval()
    x = torch.from_numpy(preprocess_chips(rendered_chips(batch)))

    def run() -> None:
        with torch.no_grad():
            head(x)

    return _timed(run, repeats)


def _dlib(batch: int, repeats: int) -> dict[str, float]:
    import dlib

    from dpa.faces.align import model_file

    model = dlib.face_recognition_model_v1(str(model_file("dlib_face_recognition_resnet_model_v1.dat")))
    chips = [np.ascontiguousarray(c) for c in rendered_chips(batch)]
    return _timed(lambda: model.compute_face_descriptor(chips), repeats)


def dlib_device_cost(
    artifacts: Path, *, flipped: Path | None = None, batch: int = 8, repeats: int = 7
) -> dict[str, Any]:  # fmt: skip
    """{"ours", "torch", "dlib"}: forward ms per batch and peak RSS, and ours / theirs ratios. With ``flipped``
    (an export whose head averages each image with its mirror, ``--flip-average``) also "ours_flip" against
    the same mirrored head in torch ("torch_flip")."""
    ctx = multiprocessing.get_context("spawn")
    out: dict[str, Any] = {"batch": batch, "image_size": layout.IMAGE_SIZE, "repeats": repeats}
    jobs = {"ours": (_ours, (str(artifacts), batch, repeats)), "torch": (_torch, (batch, repeats)),
            "dlib": (_dlib, (batch, repeats))}  # fmt: skip
    if flipped is not None:
        jobs |= {"ours_flip": (_ours, (str(flipped), batch, repeats)), "torch_flip": (_torch, (batch, repeats, True))}
    for name, (fn, args) in jobs.items():
        with ctx.Pool(1) as pool:
            out[name] = pool.apply(fn, args)
    pairs = [("ours", "torch"), ("ours", "dlib")] + ([("ours_flip", "torch_flip")] if flipped is not None else [])
    for ours, peer in pairs:
        suffix = "_flip" if ours == "ours_flip" else ""
        out[f"forward_ratio{suffix}_vs_{peer}"] = out[ours]["forward_ms"] / out[peer]["forward_ms"]
        out[f"rss_ratio{suffix}_vs_{peer}"] = out[ours]["peak_rss_mb"] / out[peer]["peak_rss_mb"]
    return out
