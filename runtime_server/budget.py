"""What slow and silent clients may hold: bytes of bodies in memory, and time to send or read one.

A request body is read before the request takes one of the tail's step slots, so a device that
uploads at a few bytes a second holds no slot: it holds only its share of ``ByteBudget`` (the
bytes of bodies being read at once, a setting), and only until its deadline, which grows with the
body at a minimum transfer rate (``transfer_deadline``). A reply is written under the same kind of
deadline, so a device that never reads its reply lets go of the reply's buffer when it passes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

__all__ = ["ByteBudget", "transfer_deadline"]


def transfer_deadline(nbytes: int, *, base_s: float, min_bytes_per_s: float) -> float:
    """Seconds a transfer of ``nbytes`` may take: ``base_s`` plus the bytes at the minimum rate."""
    return base_s + nbytes / min_bytes_per_s


class ByteBudget:
    """An asyncio semaphore counted in bytes: ``async with budget.hold(n)`` waits until n more fit.

    A single request larger than the whole budget is let in alone, so no legal body waits forever.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.peak = 0  # the most bytes held at once: what the fault tests report
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: self.used + nbytes <= self.capacity or self.used == 0)
            self.used += nbytes
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            async with self._changed:
                self.used -= nbytes
                self._changed.notify_all()
