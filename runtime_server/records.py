"""The server's durable records: checksummed, written only into space reserved beforehand.

Every file the server relies on after a crash (journal entries, stored replies, the session table,
the tail checkpoint) carries a SHA-256 of its bytes, and one that does not match is refused with a
message that names it, never loaded. A journal entry or stored reply is the record's bytes followed
by their 32-byte digest; the checkpoint, which onnxruntime writes itself, has a digest file beside it.

A train step reserves the space its records need (``Reservation``: a temp file allocated to full size)
before the tail is touched. A full disk is then met before the step, which is refused with nothing
changed, and never in the middle of a commit: writing into allocated blocks does not run out of space.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from dpa.base.atomic import atomic_write_bytes, fsync_dir
from dpa.contract.errors import UserError

__all__ = [
    "DIGEST_BYTES",
    "CorruptRecord",
    "Reservation",
    "read_sealed",
    "sealed",
    "check_free_space",
    "sync_files",
    "file_digest",
    "write_digests",
    "verify_digest",
]

DIGEST_BYTES = 32  # SHA-256
_CHUNK = 1 << 22


class CorruptRecord(UserError):
    """A durable record whose bytes no longer match their checksum (or that was cut short)."""


def sealed(data: bytes | bytearray | memoryview) -> bytes:
    """``data``'s SHA-256: the trailer that follows it on disk."""
    return hashlib.sha256(data).digest()


def read_sealed(path: Path, *, what: str) -> bytearray:
    """The record at ``path`` without its trailer; ``CorruptRecord`` if the digest does not match."""
    data = bytearray(Path(path).read_bytes())
    body = memoryview(data)[:-DIGEST_BYTES] if len(data) >= DIGEST_BYTES else memoryview(b"")
    if len(data) < DIGEST_BYTES or hashlib.sha256(body).digest() != bytes(data[-DIGEST_BYTES:]):
        body.release()
        raise CorruptRecord(f"{what} {path} is corrupt (its SHA-256 does not match: a flipped byte or a cut write)")
    body.release()
    del data[-DIGEST_BYTES:]
    return data


class Reservation:
    """A temp file next to ``path``, allocated to hold ``size`` bytes plus the digest; ``commit``
    writes a record into it and renames it over ``path``, ``release`` gives the space back."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = Path(path)
        fd, name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self._tmp = Path(name)
        self._fd: int | None = fd
        try:
            os.posix_fallocate(fd, 0, size + DIGEST_BYTES)
        except BaseException:
            self.release()
            raise

    def commit(self, data: bytes | bytearray | memoryview, *, durable: bool = True) -> None:
        """Write ``data`` and its digest into the reserved space, fsync, rename over ``path``.

        ``durable=False`` leaves out both fsyncs (file and folder): the record is whole and in place for
        every reader, and survives the process being killed, but not a power cut until ``sync_files``."""
        if self._fd is None:
            raise RuntimeError(f"the reservation for {self.path} was already used")
        fd, self._fd = self._fd, None
        try:
            view = memoryview(data)
            written = 0
            while written < len(view):
                written += os.pwrite(fd, view[written:], written)
            os.pwrite(fd, sealed(view), written)
            os.ftruncate(fd, written + DIGEST_BYTES)  # the reservation may have been larger
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            self._tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(self._tmp, self.path)
        if durable:
            fsync_dir(self.path.parent)

    def release(self) -> None:
        """Give the space back (a step that was refused); idempotent, and a no-op after ``commit``."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._tmp.unlink(missing_ok=True)


def sync_files(paths: set[Path]) -> None:
    """Make records committed with ``durable=False`` durable: fsync each (those gone since are skipped),
    then each of their folders once."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # removed since (a closed session's reply)
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for folder in {Path(p).parent for p in paths}:
        if folder.is_dir():
            fsync_dir(folder)


def check_free_space(directory: Path, needed: int, margin: int) -> None:
    """Refuse (ENOSPC, before anything is written) unless ``needed`` bytes leave ``margin`` free."""
    free = shutil.disk_usage(directory).free
    if free - needed < margin:
        raise OSError(
            errno.ENOSPC,
            f"{directory} has {free / 2**20:.1f} MiB free; this step needs {needed / 2**20:.1f} MiB and the server "
            f"keeps {margin / 2**20:.1f} MiB free (--min-free-mb)",
        )


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _digest_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_digests(path: Path, new: Path) -> None:
    """Before ``new`` is renamed over ``path``: record its digest beside ``path``, keeping the current
    file's too, so a crash between the two renames leaves a checkpoint that still verifies."""
    digests = [file_digest(new)]
    side = _digest_file(path)
    if side.is_file():
        try:
            digests += json.loads(side.read_text())["sha256"][:1]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an unreadable old record: only the new file will verify, as it should
    atomic_write_bytes(side, (json.dumps({"sha256": digests}) + "\n").encode())


def verify_digest(path: Path, *, what: str) -> None:
    """``CorruptRecord`` unless ``path`` matches the digest recorded beside it."""
    side = _digest_file(path)
    hint = f"move {path} away to start from the export's initial weights (its steps are then lost)"
    try:
        digests = json.loads(side.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CorruptRecord(f"{what} {path} has no readable checksum ({side}); {hint}") from None
    if file_digest(path) not in digests:
        raise CorruptRecord(f"{what} {path} is corrupt (its SHA-256 does not match {side.name}); {hint}")
