"""The class-sum releases the server received: one per session, durable before it is answered.

A device may release, once per session, the noisy per-class sums of its clipped activations
(``dpa.privacy.class_sums``; ``POST /v1/sessions/{id}/class-sums``). The server adds them to what
``GET /v1/templates`` serves: once it holds any, their templates replace those of the per-example
releases (each a class mean with n times less noise variance than an average of n releases; the two
kinds are also in different units, a per-example release being multiplied by its public scale).

Each release is its own file, ``class_sums/<session id>.npz`` (temp file, fsync, rename), written
before the answer, so an answered release survives any crash, and a retried one is recognised: the
same bytes are answered as the first time and kept once, in whichever session they come again (a
device resumed after a crash re-sends its kept release, perhaps in a new session); other bytes for
the same session are refused (a second release would be a second draw of noise on the same data,
which the device's accountant did not count). The totals are rebuilt from the files at start; a file
that cannot be read stops the start with its name, rather than serving templates that silently lack it.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from dpa.base.atomic import atomic_write_bytes
from dpa.contract.errors import UserError
from dpa.privacy.class_sums import class_templates

__all__ = ["ClassSumStore", "CLASS_SUMS_DIR", "ReleaseConflict"]

CLASS_SUMS_DIR = "class_sums"


class ReleaseConflict(Exception):
    """This session already released other class sums."""


class ClassSumStore:
    def __init__(self, state_dir: Path, num_classes: int, elements: int) -> None:
        self.dir = Path(state_dir) / CLASS_SUMS_DIR
        self.sums = np.zeros((num_classes, elements), dtype=np.float64)
        self.counts = np.zeros(num_classes, dtype=np.float64)
        self._digests: dict[str, str] = {}
        self.held = np.zeros(num_classes, dtype=bool)  # rows some release holds (its identities)
        if self.dir.is_dir():
            for path in sorted(self.dir.glob("*.npz")):
                sums, counts, digest, rows = self._read(path)
                self._add(path.stem, sums, counts, digest, rows)

    def __len__(self) -> int:
        return len(self._digests)

    def _read(self, path: Path) -> tuple[np.ndarray, np.ndarray, str, np.ndarray]:
        try:
            with np.load(path, allow_pickle=False) as z:
                sums, counts, digest = z["sums"], z["counts"], str(z["digest"])
                rows = z["rows"] if "rows" in z.files else np.arange(len(self.counts))
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"{path} is unreadable ({exc}); restore it from a backup or move it away") from None
        fits = rows.ndim == 1 and len(rows) and rows.min() >= 0 and rows.max() < len(self.counts)
        if not fits or sums.shape != (len(rows), self.sums.shape[1]) or counts.shape != rows.shape:
            raise UserError(f"{path} holds class sums of shape {sums.shape}, not {self.sums.shape}: another export?")
        return sums, counts, digest, rows

    def _add(self, session_id: str, sums: np.ndarray, counts: np.ndarray, digest: str, rows: np.ndarray) -> None:
        self.sums[rows] += sums
        self.counts[rows] += counts
        self.held[rows] = True
        self._digests[session_id] = digest

    def add(
        self, session_id: str, body: bytes | bytearray, sums: np.ndarray, counts: np.ndarray,
        rows: np.ndarray | None = None,
    ) -> bool:  # fmt: skip
        """Keep one session's release (durable when this returns); False if these bytes are kept already.
        ``rows``: the classes of the store that ``sums`` and ``counts`` hold (distinct; default every class, in
        order), for a release of some classes only (a federated device's identities, ``dpa.federation``).

        ReleaseConflict if the session released other bytes before; nothing changes then."""
        digest = hashlib.sha256(body).hexdigest()
        if session_id in self._digests:
            if self._digests[session_id] != digest:
                raise ReleaseConflict(session_id)
            return False
        if digest in self._digests.values():  # the same release re-sent in another session: kept once
            return False
        rows = np.arange(len(self.counts)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, sums=sums.astype(np.float32), counts=counts.astype(np.float32), digest=np.str_(digest), rows=rows)
        atomic_write_bytes(self.dir / f"{session_id}.npz", buf.getvalue())
        self._add(session_id, sums, counts, digest, rows)
        return True

    @property
    def digests(self) -> list[str]:
        """SHA-256 of every release kept, in session order: what a federation checks is counted once."""
        return [self._digests[k] for k in sorted(self._digests)]

    def templates(self) -> tuple[np.ndarray, np.ndarray]:
        """(means float32 (K, d), counts int64 (K,)) over every class-sum release kept
        (``dpa.privacy.class_sums.class_templates``: a class whose noisy count rounds to 0 has none)."""
        return class_templates(self.sums, self.counts)
