"""The server's Prometheus metrics, through ``prometheus_client`` (the maintained implementation of
the text exposition format).

Only what an operator of an edge server asks first: is it training (steps, examples), how fast
(step latency histogram), who is it turning away and why (rejections by reason), and how busy
(active sessions). Labels are reasons, never device names, tokens or session ids (unbounded or
secret). Each app has its own registry, so two servers in one process (the tests) never share a
count.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

__all__ = ["Metrics", "CONTENT_TYPE", "STEP_BUCKETS"]

#: Text format 0.0.4: what every Prometheus scrapes (docs/protocol.md, /metrics).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
#: Seconds; from a 64x64 step on a laptop to a 224x224 VGG-Face step on 2 cores and beyond.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# The *_created series say when a counter was made: noise for a server whose counters live as long as it.
disable_created_metrics()


class Metrics:
    """The server's counters; updated on the event loop, rendered by ``GET /metrics``."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._steps = Counter("dpa_steps", "Tail training steps applied by this process.", registry=r)
        self._retried = Counter(
            "dpa_replayed_steps",
            "Retries of an already applied train step, answered with its stored reply (not applied twice). "
            "Journal replays at start are not counted here.",
            registry=r,
        )
        self._examples = Counter("dpa_examples", "Training examples in applied steps.", registry=r)
        self._evals = Counter("dpa_eval_requests", "Evaluation requests answered.", registry=r)
        self._checkpoints = Counter("dpa_checkpoints", "Tail checkpoints written.", registry=r)
        self._rejected = Counter(
            "dpa_rejected_requests",
            "Requests refused, by reason (the error code of the JSON answer).",
            ["reason"],
            registry=r,
        )
        self.step_seconds = Histogram(
            "dpa_step_seconds",
            "Train request latency: body read, validation, tail step, commit.",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.checkpoint_seconds = Histogram(
            "dpa_checkpoint_seconds", "Time to write a durable tail checkpoint.", buckets=STEP_BUCKETS, registry=r
        )
        self._sessions = Gauge("dpa_active_sessions", "Open sessions.", registry=r)
        self._global_step = Gauge(
            "dpa_global_step", "Tail updates since the export (resumed runs included).", registry=r
        )
        self._tail_up = Gauge("dpa_tail_up", "1 while the tail worker process is alive.", registry=r)
        self._reply_bytes = Gauge(
            "dpa_reply_bytes_unsent",
            "Bytes of replies being written to devices that have not yet read them all.",
            registry=r,
        )
        self._abandoned = Counter(
            "dpa_replies_abandoned",
            "Replies a device did not read within its deadline: its connection closed, the buffer let go.",
            registry=r,
        )

    # ------------------------------------------------------------------ updates

    def step_applied(self, *, examples: int, seconds: float) -> None:
        self._steps.inc()
        self._examples.inc(examples)
        self.step_seconds.observe(seconds)

    def checkpoint_written(self, seconds: float) -> None:
        self._checkpoints.inc()
        self.checkpoint_seconds.observe(seconds)

    def retry_answered(self) -> None:
        self._retried.inc()

    def eval_answered(self) -> None:
        self._evals.inc()

    def reply_writing(self, nbytes: int) -> None:
        """A reply of ``nbytes`` starts (positive) or stops (negative) waiting on its device."""
        self._reply_bytes.inc(nbytes)

    def reply_abandoned(self) -> None:
        self._abandoned.inc()

    def reject(self, code: str) -> None:
        self._rejected.labels(reason=code).inc()

    # ------------------------------------------------------------------ reads

    @property
    def steps(self) -> int:
        return int(self.registry.get_sample_value("dpa_steps_total") or 0)

    @property
    def replayed_steps(self) -> int:
        """Retries of an applied step answered from the stored reply (``dpa_replayed_steps_total``)."""
        return int(self.registry.get_sample_value("dpa_replayed_steps_total") or 0)

    def render(self, *, active_sessions: int, global_step: int, tail_alive: bool) -> bytes:
        self._sessions.set(active_sessions)
        self._global_step.set(global_step)
        self._tail_up.set(int(tail_alive))
        return generate_latest(self.registry)
