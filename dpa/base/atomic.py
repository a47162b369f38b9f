"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_many", "atomic_write_with", "fsync_dir", "TEMP_GLOB"]

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


def atomic_write_many(files: list[tuple[Path, bytes]]) -> None:
    """``atomic_write_bytes`` for several files at once, durable together when this returns: each is
    written to a temp file and fsynced, then all are renamed, then each folder is fsynced once (a
    frozen head's batch of releases: eight files had cost eight folder fsyncs). A failure removes the
    temp files not yet renamed; the files renamed before it are whole."""
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data in files:
            path = Path(path)
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps.append((Path(name), path))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        while temps:
            tmp, path = temps[0]
            os.replace(tmp, path)
            temps.pop(0)
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    for folder in dict.fromkeys(Path(path).parent for path, _ in files):
        fsync_dir(folder)
