"""onnxruntime inference sessions as every part of dpa opens them: plain onnxruntime, no training API.

The device runs on plain onnxruntime (its head's forward and its gradient graph are inference graphs), so
this module must not import ``onnxruntime.training``: it is the piece of the onnxruntime set-up the device
and the server share.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from typing import Any


def _without_torch() -> None:
    """Where onnxruntime is the training build, ``import onnxruntime`` probes ``onnxruntime.training.ortmodule``
    (torch's ORTModule), and that probe imports all of torch. Register a bare ``onnxruntime.training`` package
    (its ``__init__`` never runs) with ``ortmodule`` marked absent first, so the probe's ImportError branch runs.
    Plain onnxruntime has no training package: nothing to do (``dpa.contract.ort_training`` relies on this)."""
    name = "onnxruntime.training"
    if name in sys.modules or "onnxruntime" in sys.modules:
        return
    spec = importlib.util.find_spec("onnxruntime")  # locates the package without importing it
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("onnxruntime is not installed: pip install onnxruntime")
    paths = [f"{loc}/training" for loc in spec.submodule_search_locations]
    if not any(os.path.isdir(p) for p in paths):
        return
    bare = types.ModuleType(name)
    bare.__path__ = paths
    sys.modules[name] = bare
    sys.modules.setdefault(f"{name}.ortmodule", None)  # type: ignore[arg-type]


_without_torch()

import onnxruntime  # noqa: E402

__all__ = ["session_options", "inference_session"]


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


def inference_session(
    model: str | bytes, threads: int | None, providers: tuple[str, ...] = ("CPUExecutionProvider",)
) -> Any:
    """A plain onnxruntime session of ``model`` (a path or the serialised bytes) with dpa's options and these
    execution providers in order (``ResolvedDevice.providers``); ``session.get_providers()`` says what runs."""
    return onnxruntime.InferenceSession(model, session_options(threads), providers=list(providers))
