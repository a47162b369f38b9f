"""The tail in a child process, so the server's event loop never waits for a step.

onnxruntime-training's Python step holds the GIL for the whole step (measured: a
thread running a tail step starves the main thread for the step's duration). On a
worker thread that froze the event loop: ``/v1/health`` waited for whole steps. Here the
tail lives in one spawned process and the server talks to it
through a one-worker process pool; the calling thread waits with the GIL released.
A step's tensors cross in shared memory (``shared_arrays``), not through the pipe.

The child ignores SIGINT and SIGTERM: Ctrl-C reaches the whole process group, and the
parent must still be able to ask the child to save the tail before both exit. It asks the
kernel to SIGKILL it when the parent dies (Linux ``PR_SET_PDEATHSIG``): a server killed
with SIGKILL must not leave a child behind that finishes a checkpoint under the feet of
the restarted server.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dpa.contract import messages
from dpa.contract.devices import ResolvedDevice
from dpa.contract.manifest import GraphNames, Manifest
from runtime_server.shared_arrays import SharedStep, StepLayout
from runtime_server.tail import StepOutputs, TailModel, TrainResult
from runtime_server.templates import ClassTemplates

__all__ = ["TailWorker"]

log = logging.getLogger(__name__)

_TAIL: TailModel | None = None  # the child's tail
_SHARED: SharedStep | None = None  # the child's view of the step segment, if the server made one


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)


def _init(
    artifacts: Path,
    manifest: Manifest,
    device: ResolvedDevice,
    state_dir: Path,
    parent: int,
    shared: tuple[str, StepLayout] | None,
) -> None:
    global _TAIL, _SHARED
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if shared is not None:
        _SHARED = SharedStep(shared[1], name=shared[0])
    _TAIL = TailModel(artifacts, manifest, device, state_dir)


def _tail() -> TailModel:
    assert _TAIL is not None, "tail worker not initialised"
    return _TAIL


def _info() -> dict[str, Any]:
    t = _tail()
    return {
        "resumed": t.resumed,
        "global_step": t.global_step,
        "examples_seen": t.examples_seen,
        "sessions": t.committed_sessions,
    }


def _train(activation: np.ndarray, labels: np.ndarray) -> tuple[TrainResult, int]:
    t = _tail()
    return t.train_step(activation, labels), t.examples_seen


def _train_shared(batch: int) -> tuple[float, int, int]:
    """A step on the first ``batch`` rows of the shared arrays; its outputs land there too."""
    assert _SHARED is not None
    a = _SHARED.arrays
    out = StepOutputs(a[messages.LOSS], a[GraphNames.LOGITS][:batch], a[GraphNames.ACTIVATION_GRADIENT][:batch])
    result = _tail().train_step(a[GraphNames.ACTIVATION][:batch], a[GraphNames.LABELS][:batch], out)
    return result.loss, result.global_step, _tail().examples_seen


def _eval(activation: np.ndarray) -> np.ndarray:
    return _tail().eval_step(activation)


def _eval_shared(batch: int) -> np.ndarray:
    assert _SHARED is not None
    return _tail().eval_step(_SHARED.arrays[GraphNames.ACTIVATION][:batch])


def _parameters() -> dict[str, np.ndarray]:
    return _tail().parameters()


def _load(values: dict[str, np.ndarray]) -> None:
    _tail().load_parameters(values)


def _save(sessions: dict[str, list[int]] | None) -> Path:
    return _tail().save(sessions)


class TailWorker:
    """TailModel's interface, run in a child process. Calls block the calling thread only."""

    def __init__(
        self, artifacts: Path, manifest: Manifest, device: ResolvedDevice, state_dir: Path, max_batch: int,
        templates: bool | None = False,
    ) -> None:  # fmt: skip
        # Outputs are bound to host memory, so a GPU tail keeps to pickling (its copies are the device's anyway).
        layout = StepLayout(max_batch, tuple(manifest.activation_shape), manifest.num_classes)
        self._shared = SharedStep.create(layout) if device.ort_device == "cpu" else None
        shared = None if self._shared is None else (self._shared.name, layout)
        self._pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),  # no inherited threads, sessions or sockets
            initializer=_init,
            initargs=(artifacts, manifest, device, state_dir, os.getpid(), shared),
        )
        info = self._pool.submit(_info).result()
        self.resumed: bool = info["resumed"]
        self.global_step: int = info["global_step"]
        self.examples_seen: int = info["examples_seen"]
        self.committed_sessions: dict[str, list[int]] = info["sessions"]
        self._saved_step = self.global_step
        self._state_dir = state_dir
        # Class templates (runtime_server.templates): kept beside the tail, saved and restored with it.
        # None: kept when they fit (at paper size, conv1_1's 2,622 x 3.2 M would take 67 GB).
        if templates is None:
            templates = ClassTemplates.fit(manifest.num_classes, tuple(manifest.activation_shape))
            if not templates:
                log.info("no class templates: they would not fit", extra={"fields": {"cut": manifest.cut}})
        self.templates = (
            ClassTemplates.restore(state_dir, manifest.num_classes, tuple(manifest.activation_shape), self.global_step)
            if templates
            else None
        )

    def _fits(self, activation: np.ndarray) -> bool:
        # A journal written under a larger --max-batch replays through the pipe.
        return self._shared is not None and activation.shape[0] <= self._shared.layout.max_batch

    def train_step(self, activation: np.ndarray, labels: np.ndarray) -> TrainResult:
        """As ``TailModel.train_step``. With shared memory the result's arrays are views of it:
        valid until the next call (the app encodes them on the same thread at once)."""
        if not self._fits(activation):
            result, examples = self._pool.submit(_train, activation, labels).result()
        else:
            assert self._shared is not None
            a, batch = self._shared.arrays, activation.shape[0]
            np.copyto(a[GraphNames.ACTIVATION][:batch], activation)  # widens a float16 release
            np.copyto(a[GraphNames.LABELS][:batch], labels)
            loss, step, examples = self._pool.submit(_train_shared, batch).result()
            result = TrainResult(loss, a[GraphNames.LOGITS][:batch], a[GraphNames.ACTIVATION_GRADIENT][:batch], step)
        self.global_step, self.examples_seen = result.global_step, examples
        if self.templates is not None:
            self.templates.add(activation, labels, result.global_step)
        return result

    def eval_step(self, activation: np.ndarray) -> np.ndarray:
        if not self._fits(activation):
            return self._pool.submit(_eval, activation).result()
        assert self._shared is not None
        np.copyto(self._shared.arrays[GraphNames.ACTIVATION][: activation.shape[0]], activation)
        return self._pool.submit(_eval_shared, activation.shape[0]).result()

    def parameters(self) -> dict[str, np.ndarray]:
        return self._pool.submit(_parameters).result()

    def load_parameters(self, values: dict[str, np.ndarray]) -> None:
        """Replace the tail's weights (``TailModel.load_parameters``); dirty until the next save."""
        self._pool.submit(_load, values).result()
        self._saved_step = -1

    @property
    def dirty(self) -> bool:
        return self.global_step != self._saved_step

    def save(self, sessions: dict[str, list[int]] | None = None) -> Path:
        path = self._pool.submit(_save, sessions).result()
        if self.templates is not None:
            self.templates.save(self._state_dir)
        self._saved_step = self.global_step
        return path

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._shared is not None:
            self._shared.close()
