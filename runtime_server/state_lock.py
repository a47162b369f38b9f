"""One server per state dir, and what a killed one left half-written swept away at the next start.

Every record the server writes goes first into a temp file beside its final name (``.NAME.XXXX.tmp``,
``dpa.base.atomic`` and ``records.Reservation``), renamed into place only when whole. A SIGKILL
between the two leaves the temp file: a reply reservation (``replies/``), a journal entry's
(``journal/``), the session table's, a class-sum release's. None is ever read, but each holds disk
space that ``--min-free-mb`` counts, so a start removes them (issue 26).

That is only safe if no other server is writing into the same folder: its temp files are live. So a
server holds an exclusive ``flock`` on ``STATE_LOCK`` from its start to its stop, and a second one
started on the same state dir is refused, naming the holder, before it sweeps or loads anything. The
kernel drops the lock when its holder dies, however it dies, so a SIGKILL never leaves the folder locked.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from dpa.contract.errors import UserError
from runtime_server.class_sums import CLASS_SUMS_DIR
from runtime_server.journal import JOURNAL_DIR
from runtime_server.sessions import REPLIES_DIR

__all__ = ["STATE_LOCK", "StateLock", "sweep_temp_files"]

log = logging.getLogger(__name__)

#: The lock file in the state dir; it holds the pid of the server that has it.
STATE_LOCK = ".lock"
#: Where the server writes through temp files: the state dir itself and these folders in it.
_WRITTEN_DIRS = (".", REPLIES_DIR, JOURNAL_DIR, CLASS_SUMS_DIR)
#: ``tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp")``, as every writer of ours names them.
_TEMP_PATTERN = ".*.tmp"


class StateLock:
    """An exclusive lock on a state dir, held by this process until ``release`` (or its death)."""

    def __init__(self, state_dir: Path) -> None:
        path = Path(state_dir) / STATE_LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(
                f"state dir {state_dir} is in use by another dpa server (pid {holder}); stop it, or give this one "
                "its own --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def sweep_temp_files(state_dir: Path) -> list[Path]:
    """Remove the temp files a killed server left in ``state_dir`` (call with its ``StateLock`` held)."""
    removed = []
    for folder in _WRITTEN_DIRS:
        directory = Path(state_dir) / folder
        for stale in directory.glob(_TEMP_PATTERN) if directory.is_dir() else ():
            if stale.is_file():
                stale.unlink(missing_ok=True)
                removed.append(stale)
    if removed:
        log.info("temp files of a cut-short write removed", extra={"fields": {"files": len(removed)}})
    return removed
