"""Validation of tensor requests: everything is checked before the tail is touched.

A request that fails here changes nothing on the server; each failure has its own code
(``docs/protocol.md``, errors table).
"""

from __future__ import annotations

import numpy as np

from dpa.base.finite import all_finite
from dpa.contract import messages, wire
from dpa.contract.manifest import GraphNames, Manifest
from runtime_server.errors import ApiError

__all__ = ["validate_train", "validate_eval", "validate_class_sums", "step_number"]

_RELEASE_DTYPES = {d.numpy for d in wire.ReleaseDtype}  # the tail widens float16 to float32


def step_number(message: wire.Message) -> int:
    """The session step number a train request carries in its metadata (``{"step": n}``, n >= 1)."""
    step = messages.step_of(message)
    if step is None:
        raise ApiError(
            422, "missing_step", 'a train request needs meta {"step": n}: its session step number, 1 for the first'
        )
    return step


def _check_activation(manifest: Manifest, max_batch: int, message: wire.Message, expected: set[str]) -> np.ndarray:
    names = set(message.tensors)
    if names != expected:
        raise ApiError(422, "wrong_tensors", f"expected tensors {sorted(expected)}, got {sorted(names)}")
    act = message.tensors[GraphNames.ACTIVATION]
    if act.dtype not in _RELEASE_DTYPES:
        raise ApiError(422, "wrong_dtype", f"activation must be float32 or float16, got {act.dtype}")
    want = tuple(manifest.activation_shape)
    if act.ndim != 1 + len(want) or tuple(act.shape[1:]) != want:
        raise ApiError(
            422, "wrong_shape", f"activation must have shape (batch, {', '.join(map(str, want))}), got {act.shape}"
        )
    if not 1 <= act.shape[0] <= max_batch:
        raise ApiError(422, "wrong_batch", f"batch size must be 1..{max_batch}, got {act.shape[0]}")
    return act


def validate_train(manifest: Manifest, max_batch: int, message: wire.Message) -> tuple[np.ndarray, np.ndarray]:
    act = _check_activation(manifest, max_batch, message, set(messages.TRAIN_REQUEST))
    labels = message.tensors[GraphNames.LABELS]
    if labels.dtype != np.int64:
        raise ApiError(422, "wrong_dtype", f"labels must be int64, got {labels.dtype}")
    if labels.shape != (act.shape[0],):
        raise ApiError(422, "wrong_shape", f"labels must have shape ({act.shape[0]},), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= manifest.num_classes):
        raise ApiError(422, "label_out_of_range", f"labels must be in 0..{manifest.num_classes - 1}")
    _check_finite(act)
    return act, labels


def validate_eval(manifest: Manifest, max_batch: int, message: wire.Message) -> np.ndarray:
    act = _check_activation(manifest, max_batch, message, set(messages.EVAL_REQUEST))
    _check_finite(act)
    return act


def _check_finite(act: np.ndarray) -> None:
    if not all_finite(act):
        raise ApiError(422, "non_finite", "activation contains NaN or infinity")


def validate_class_sums(manifest: Manifest, message: wire.Message) -> tuple[np.ndarray, np.ndarray]:
    """A class-sum release's (sums (classes, d) float32, counts (classes,) float32), checked whole."""
    names, expected = set(message.tensors), set(messages.CLASS_SUMS_REQUEST)
    if names != expected:
        raise ApiError(422, "wrong_tensors", f"expected tensors {sorted(expected)}, got {sorted(names)}")
    sums, counts = message.tensors[messages.CLASS_SUMS], message.tensors[messages.CLASS_COUNTS]
    for name, t in ((messages.CLASS_SUMS, sums), (messages.CLASS_COUNTS, counts)):
        if t.dtype != np.float32:
            raise ApiError(422, "wrong_dtype", f"{name} must be float32, got {t.dtype}")
    k, want = manifest.num_classes, tuple(manifest.activation_shape)
    if sums.shape != (k, *want):
        raise ApiError(422, "wrong_shape", f"class_sums must have shape {(k, *want)}, got {sums.shape}")
    if counts.shape != (k,):
        raise ApiError(422, "wrong_shape", f"counts must have shape ({k},), got {counts.shape}")
    if not (all_finite(sums) and all_finite(counts)):
        raise ApiError(422, "non_finite", "class sums or counts contain NaN or infinity")
    return sums.reshape(k, -1), counts
