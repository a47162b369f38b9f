"""How a benchmark times a call: one warm-up (allocations, kernel selection), then the median of repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["timed", "median_seconds"]


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes (wall clock)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """The median of ``repeats`` timed calls, after one untimed warm-up call."""
    fn()
    return statistics.median(timed(fn) for _ in range(repeats))
