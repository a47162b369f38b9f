"""onnxruntime inference sessions as every part of dpa opens them: plain onnxruntime, no training API.

The device runs on plain onnxruntime (its head's forward and its gradient graph are inference graphs), so
this module must not import ``onnxruntime.training``: it is the piece of the onnxruntime set-up the device
and the server share.
"""

from __future__ import annotations

from typing import Any

import onnxruntime

__all__ = ["session_options", "providers_for", "inference_session"]


def session_options(threads: int | None) -> Any:
    """Options for every session we create: ``threads`` intra-op threads (None: all cores), not spinning.

    onnxruntime's pool threads spin-wait between (and after) kernels by default. At the small
    configuration the tail's two threads then burned 142 ms of CPU per 62 ms step (and kept
    spinning through the gap to the next one), while the second thread made the step only 1.3x
    faster: the spin took the core the server's event loop, its disk commit and a device on the
    same machine needed. Sleeping threads wake in microseconds, which a step of milliseconds does
    not notice (``dpa bench`` figures in BENCHMARKS.md).
    """
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def providers_for(ort_device: str) -> list[str]:
    """The execution providers for a device profile's onnxruntime device, in the order they are tried."""
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if ort_device == "cuda" else ["CPUExecutionProvider"]


def inference_session(model: str | bytes, threads: int | None, ort_device: str = "cpu") -> Any:
    """A plain onnxruntime session of ``model`` (a path or the serialised bytes) with dpa's options."""
    return onnxruntime.InferenceSession(model, session_options(threads), providers=providers_for(ort_device))
