"""When and how long the device retries a request: through restarts and flaky networks.

A training run lasts hours and the edge server is restarted under it (deploys, crashes,
a phone changing networks). Requests are retried with exponential backoff and jitter
until ``total_s`` has passed. Retrying a train step is safe because the server applies
each session step once (``docs/protocol.md``: exactly-once steps).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from dpa.contract.errors import UserError

__all__ = ["RetryPolicy", "RETRYABLE_STATUS"]

#: Overloaded or restarting server (429 rate_limited/too_many_sessions, 502-504 from a proxy or a dead tail).
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    total_s: float = 600.0  # give up after retrying this long (a 224x224 server restart takes ~10 s)
    first_s: float = 0.2  # first wait
    max_s: float = 10.0  # longest single wait
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.total_s) and self.total_s >= 0):
            raise UserError(f"retry time must be a number of seconds >= 0, got {self.total_s}")
        if not (0 < self.first_s <= self.max_s) or self.factor < 1:
            raise UserError("retry waits must satisfy 0 < first <= max and factor >= 1")

    def waits(self, rng: random.Random | None = None) -> Iterator[float]:
        """Waits before each retry: exponential, with +-25% jitter so clients do not retry in lockstep."""
        rng = rng or random.Random()
        wait = self.first_s
        while True:
            yield min(self.max_s, wait) * rng.uniform(0.75, 1.25)
            wait *= self.factor
