"""Step tensors in shared memory between the server and its tail process.

Sending a paper-size step through the process pool pickled 103 MB of activations into
the child and 103 MB of gradient back, a fifth of the tail call (``BENCHMARKS.md``).
Instead both processes map one segment holding a batch's activations, labels, logits,
gradient and loss at fixed offsets; the server copies the request in, the tail's graph
writes its outputs straight into it (``dpa.contract.ort_training.train_step_into``), and only
a few integers cross the pipe.

The segment is sized for ``max_batch`` but the kernel only backs the pages a step
touches. POSIX shared memory lives in ``/dev/shm``, which containers often keep small
(Docker: 64 MB); touching pages beyond it kills the process with SIGBUS, so where it
has no room for a full batch we say so and the worker pickles instead.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from dpa.contract import messages
from dpa.contract.manifest import GraphNames

__all__ = ["StepLayout", "SharedStep", "shm_room"]

log = logging.getLogger(__name__)

_ALIGN = 64  # each array starts on a cache line
_SHM_DIR = "/dev/shm"


@dataclass(frozen=True)
class StepLayout:
    """Shapes of the arrays one step needs, for batches of up to ``max_batch``."""

    max_batch: int
    activation_shape: tuple[int, ...]
    num_classes: int

    def specs(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        b = self.max_batch
        return [
            (GraphNames.ACTIVATION, (b, *self.activation_shape), np.dtype(np.float32)),
            (GraphNames.LABELS, (b,), np.dtype(np.int64)),
            (messages.LOSS, (), np.dtype(np.float32)),
            (GraphNames.LOGITS, (b, self.num_classes), np.dtype(np.float32)),
            (GraphNames.ACTIVATION_GRADIENT, (b, *self.activation_shape), np.dtype(np.float32)),
        ]

    @property
    def nbytes(self) -> int:
        end = 0
        for _name, shape, dtype in self.specs():
            end = _aligned(end) + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return end

    def arrays(self, buf: memoryview) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        offset = 0
        for name, shape, dtype in self.specs():
            offset = _aligned(offset)
            out[name] = np.ndarray(shape, dtype=dtype, buffer=buf, offset=offset)
            offset += out[name].nbytes
        return out


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


def shm_room() -> int | None:
    """Free bytes in /dev/shm, or None where there is no such mount to check (not Linux)."""
    try:
        st = os.statvfs(_SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class SharedStep:
    """One shared segment laid out by ``StepLayout``: created by the server, attached by the tail.

    The server unlinks it on close. If the server is killed, multiprocessing's resource
    tracker, which the spawned tail shares, unlinks it once both processes are gone.
    """

    def __init__(self, layout: StepLayout, name: str | None = None) -> None:
        self.layout = layout
        self.owner = name is None
        self._shm = shared_memory.SharedMemory(name=name, create=self.owner, size=layout.nbytes if self.owner else 0)
        self.arrays = layout.arrays(self._shm.buf)

    @property
    def name(self) -> str:
        return self._shm.name

    @classmethod
    def create(cls, layout: StepLayout) -> SharedStep | None:
        """A new segment, or None (pickling instead) where /dev/shm cannot hold a full batch."""
        room = shm_room()
        if room is not None and room < layout.nbytes:
            log.warning(
                "shared memory too small; steps go through pickling (slower)",
                extra={"fields": {"needed_mb": layout.nbytes >> 20, "free_mb": room >> 20, "fix": "docker --shm-size"}},
            )
            return None
        try:
            return cls(layout)
        except OSError as exc:
            log.warning("no shared memory; steps go through pickling (slower)", extra={"fields": {"errno": exc.errno}})
            return None

    def close(self) -> None:
        self.arrays = {}  # views must go before the mapping can close
        try:
            self._shm.close()
        except BufferError:  # a caller still holds a view: the mapping goes when the process does
            pass
        if self.owner:
            self._shm.unlink()
