"""A frozen head's releases, kept on the device so that later epochs re-send the very same bytes.

With the head frozen (public weights) an example's activation never changes, so each example is
released a fixed K times (``--releases-per-example``, default 1) and every later epoch sends one of
those K releases again, byte for byte, with the same randomised label. Sending the same bytes again
tells the server nothing new: the accountant counts K releases whatever the number of epochs.

Each release is a small file written whole (temp file, fsync, rename) before it is first sent, so a
device killed at any point and resumed re-sends what it sent, never a fresh draw.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from dpa.base.atomic import atomic_write_many
from dpa.contract.errors import UserError

__all__ = ["ReleaseCache"]


class ReleaseCache:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _path(self, k: int, row: int) -> Path:
        return self.directory / f"r{k}" / f"{row:07d}.npz"

    def put(self, k: int, rows: np.ndarray, activation: np.ndarray, labels: np.ndarray) -> None:
        (self.directory / f"r{k}").mkdir(parents=True, exist_ok=True)
        files = []
        for i, r in enumerate(rows):
            buf = io.BytesIO()
            np.savez(buf, activation=activation[i], label=np.int64(labels[i]))
            files.append((self._path(k, int(r)), buf.getvalue()))
        atomic_write_many(files)

    def get(self, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(activations as first sent, labels as first sent) of ``rows``' release ``k``."""
        acts, labels = [], []
        for r in rows:
            try:
                with np.load(self._path(k, int(r)), allow_pickle=False) as z:
                    acts.append(z["activation"])
                    labels.append(int(z["label"]))
            except (OSError, ValueError, KeyError) as exc:
                raise UserError(f"the frozen head's release {k} of example {int(r)} is missing or unreadable "
                                f"({exc}); start the run again with a fresh --state-dir") from None  # fmt: skip
        return np.stack(acts), np.asarray(labels, dtype=np.int64)
