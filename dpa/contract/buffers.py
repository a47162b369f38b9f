"""Message buffers reused from step to step instead of allocated afresh.

A fresh 100 MB bytearray is 25,000 page faults the first time it is written, many times
the cost of overwriting a buffer already mapped (BENCHMARKS.md has the figures). A
paper-size step writes four such buffers (request and reply, on each side).

A pooled buffer is handed out again only when the pool holds the last reference to it:
no array, memoryview, pending socket write or stored reply still reads it. Reuse can
therefore never change bytes that someone is still reading; a buffer kept alive by
mistake only costs the speed-up, never correctness. Buffers are not zeroed when reused:
a caller writes every byte (``wire.allocate`` writes its padding explicitly).
"""

from __future__ import annotations

import sys
import threading

__all__ = ["BufferPool"]


def _references(buf: bytearray) -> int:
    return sys.getrefcount(buf)


def _unshared_count() -> int:
    """What ``_references`` reports inside ``BufferPool._free`` for a buffer only the pool holds.

    Measured rather than hard-coded: the pool's list, the loop variable and the call's
    argument are CPython details that could change between versions.
    """
    pool = [bytearray(1)]
    for buf in pool:
        return _references(buf)
    raise AssertionError("unreachable")


_UNSHARED = _unshared_count()


class BufferPool:
    """Keeps up to ``keep`` buffers of at least ``min_bytes`` and hands them out again once unused.

    Thread-safe: the edge server takes request buffers on its event loop and reply
    buffers on its tail thread. Smaller buffers are not worth it and are never kept.
    """

    def __init__(self, keep: int, min_bytes: int = 1 << 20) -> None:
        if keep < 0:
            raise ValueError(f"a pool keeps >= 0 buffers, got {keep}")
        self.keep = keep
        self.min_bytes = min_bytes
        self.reused = 0  # buffers handed out again (a figure for tests and benchmarks)
        self._buffers: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        """A buffer of exactly ``size`` bytes; its contents are undefined (stale when reused)."""
        if size < self.min_bytes or self.keep == 0:
            return bytearray(size)
        with self._lock:
            free = self._free()
            for buf in free:
                if len(buf) == size:
                    self.reused += 1
                    return buf
            fresh = bytearray(size)
            if len(self._buffers) >= self.keep:
                if not free:  # every kept buffer is in use: this one is not kept
                    return fresh
                self._buffers.remove(free[0])  # the oldest unused buffer of another size makes room
            self._buffers.append(fresh)
            return fresh

    def _free(self) -> list[bytearray]:
        """The kept buffers nobody else refers to, oldest first."""
        free = []
        for buf in self._buffers:
            if _references(buf) == _UNSHARED:
                free.append(buf)
        return free
