"""onnxruntime's training API without torch.

``import onnxruntime.training.api`` runs ``onnxruntime/training/__init__.py``, which
imports ``artifacts`` -> ``onnxblock`` -> torch, and fails where torch is not
installed (upstream issue https://github.com/microsoft/onnxruntime/issues/22070).
The API's classes are thin wrappers over ``onnxruntime.capi._pybind_state`` and need
none of that. We register a bare ``onnxruntime.training`` package (no ``__init__``
code run) before importing onnxruntime, so the device client and the edge server load
on numpy + onnxruntime alone, and never import torch even where it is installed. If
the real package was already imported (the exporter imports it, with torch), that one
is used as is.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "CheckpointState",
    "Module",
    "Optimizer",
    "OrtValue",
    "SessionOptions",
    "session_options",
    "ort_version",
    "train_step_into",
]


def _import_api() -> types.ModuleType:
    import dpa.contract.ort_sessions  # noqa: F401  (registers the bare onnxruntime.training package first)

    if "onnxruntime.training" not in sys.modules:
        raise ImportError("onnxruntime-training is not installed: pip install onnxruntime-training-cpu==1.19.2")
    return importlib.import_module("onnxruntime.training.api")


_api = _import_api()

import onnxruntime  # noqa: E402
from onnxruntime.capi._pybind_state import OrtValueVector  # noqa: E402

# onnxruntime warns on every optimizer step that its own update flag's shape is {1}, not {}.
onnxruntime.set_default_logger_severity(3)

from dpa.contract.ort_sessions import session_options  # noqa: E402  (re-exported: the server's sessions)

CheckpointState = _api.CheckpointState
Module = _api.Module
Optimizer = _api.Optimizer
OrtValue = onnxruntime.OrtValue
SessionOptions = onnxruntime.SessionOptions


def ort_version() -> str:
    return str(onnxruntime.__version__)


def train_step_into(module: Any, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> None:
    """One training step (forward + backward, gradients accumulated) whose outputs are
    written straight into ``outputs``: preallocated, C-contiguous arrays of the graph's
    output shapes and dtypes, in the graph's output order.

    ``Module.__call__`` returns fresh numpy copies of its outputs; binding ours instead
    lets the edge server's tail write a 103 MB activation gradient directly into shared
    memory (``runtime_server.tail_worker``). The inputs are wrapped without a copy too.
    """
    feeds = OrtValueVector()
    fetches = OrtValueVector()
    for array in inputs:
        feeds.push_back(OrtValue.ortvalue_from_numpy(array)._ortvalue)
    for array in outputs:
        fetches.push_back(OrtValue.ortvalue_from_numpy(array)._ortvalue)
    module._model.train_step_with_ort_values(feeds, fetches)
