"""The write-ahead journal: each applied step's request, on disk before the step is answered.

A full tail checkpoint is expensive at paper size (1.2 GB with optimizer state, as long to
write and fsync as the step itself takes), so it is written only every
``checkpoint_every`` steps. In between, every applied step's request body (the device's
release and labels, ~100 MB at 224x224 batch 8) is written to the journal, and
the step is answered only after that. On restart the server loads the last checkpoint
and applies the journalled steps again, in order: the tail, every session's step count
and the global step come back to where they were when the server died.

Replaying gives bit-identical weights when the tail's step is deterministic (no dropout,
as in the kill test). With dropout, the replayed steps draw new dropout masks: each step
is still applied exactly once, but the replayed tail differs slightly from the lost one.

Entry files are ``<global step, 12 digits>-<session id>.dpaw`` holding the request as
received (wire format, meta ``{"step": n}``) followed by its SHA-256 (``records``), written
into space reserved before the step was applied and renamed into place: the write-ahead record.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from dpa.contract import wire
from dpa.contract.errors import UserError
from runtime_server.records import CorruptRecord, Reservation, read_sealed

__all__ = ["Journal", "JournalEntry", "JOURNAL_DIR"]

log = logging.getLogger(__name__)

JOURNAL_DIR = "journal"
_NAME = re.compile(r"^(\d{12})-([A-Za-z0-9_-]+)\.dpaw$")


@dataclass(frozen=True)
class JournalEntry:
    global_step: int
    session_id: str
    path: Path


class Journal:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / JOURNAL_DIR

    def reserve(self, global_step: int, session_id: str, size: int) -> Reservation:
        """Space for the entry of step ``global_step`` (a request of ``size`` bytes), before it is applied."""
        self.dir.mkdir(parents=True, exist_ok=True)
        return Reservation(self.dir / f"{global_step:012d}-{session_id}.dpaw", size)

    def append(self, global_step: int, session_id: str, body: bytes | bytearray) -> None:
        """Record a step's request; durable when this returns."""
        self.reserve(global_step, session_id, len(body)).commit(body)

    def entries(self) -> list[JournalEntry]:
        """Journalled steps in the order they were applied (temp files of a cut-short write are ignored)."""
        if not self.dir.is_dir():
            return []
        found = []
        for path in self.dir.iterdir():
            match = _NAME.match(path.name)
            if match:
                found.append(JournalEntry(int(match.group(1)), match.group(2), path))
            elif path.name.startswith("."):
                path.unlink(missing_ok=True)  # a temp file: that step was never answered
        return sorted(found, key=lambda e: e.global_step)

    def truncate(self, upto: int) -> None:
        """Forget the steps a checkpoint now holds (global step <= ``upto``)."""
        for entry in self.entries():
            if entry.global_step <= upto:
                entry.path.unlink(missing_ok=True)

    @staticmethod
    def read(entry: JournalEntry) -> wire.Message:
        try:
            return wire.decode(read_sealed(entry.path, what="journal entry"))
        except (OSError, wire.WireError, CorruptRecord) as exc:
            raise UserError(
                f"journal entry {entry.path} is unreadable ({exc}); the steps after the last checkpoint "
                "cannot be restored. Move the journal folder away to start from the checkpoint (those "
                "steps are then lost and their devices are told so)."
            ) from None
