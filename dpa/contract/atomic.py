"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_with", "fsync_dir", "TEMP_GLOB"]

#: A temp file of ``path``, to clean up after a crash: ``path.parent.glob(TEMP_GLOB.format(name=path.name))``.
TEMP_GLOB = ".{name}.*tmp"


def fsync_dir(directory: Path) -> None:
    """Persist a rename: the directory entry must reach the disk too."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_with(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` writes the whole file at ``tmp`` (a fresh name in the same folder); then fsync and
    rename it over ``path``. On any failure (a full disk, a crash of ``write``) the temp file is removed
    and ``path`` is untouched. For writers that want a path, not bytes (onnxruntime's checkpoints)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file in the same folder, fsync, then rename over ``path``."""
    atomic_write_with(path, lambda tmp: tmp.write_bytes(data))
