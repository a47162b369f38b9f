"""Prometheus metrics in the text exposition format (version 0.0.4), without a dependency.

Only what an operator of an edge server asks first: is it training (steps, examples),
how fast (step latency histogram), who is it turning away and why (rejections by
reason), and how busy (active sessions). Labels are reasons and endpoint names, never
device names, tokens or session ids (unbounded or secret).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["Metrics", "CONTENT_TYPE", "STEP_BUCKETS"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Seconds; from a 64x64 step on a laptop (~10 ms) to a 224x224 VGG-Face step on 2 cores (~5 s) and beyond.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_num(b)}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_num(self.total)}")
        out.append(f"{name}_count {self.count}")
        return out


@dataclass
class Metrics:
    """The server's counters; updated on the event loop, rendered by ``GET /metrics``."""

    steps: int = 0  # tail updates applied by this process
    replayed_steps: int = 0  # retried steps answered from the stored reply, not applied again
    examples: int = 0
    eval_requests: int = 0
    checkpoints: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # error code -> count
    step_seconds: Histogram = field(default_factory=lambda: Histogram(STEP_BUCKETS))
    checkpoint_seconds: Histogram = field(default_factory=lambda: Histogram(STEP_BUCKETS))

    def reject(self, code: str) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1

    def render(self, *, active_sessions: int, global_step: int, tail_alive: bool) -> str:
        simple: list[tuple[str, str, str, float]] = [
            ("dpa_steps_total", "counter", "Tail training steps applied by this process.", self.steps),
            (
                "dpa_replayed_steps_total",
                "counter",
                "Retried train requests answered with the stored reply (not applied twice).",
                self.replayed_steps,
            ),
            ("dpa_examples_total", "counter", "Training examples in applied steps.", self.examples),
            ("dpa_eval_requests_total", "counter", "Evaluation requests answered.", self.eval_requests),
            ("dpa_checkpoints_total", "counter", "Tail checkpoints written.", self.checkpoints),
            ("dpa_active_sessions", "gauge", "Open sessions.", active_sessions),
            ("dpa_global_step", "gauge", "Tail updates since the export (resumed runs included).", global_step),
            ("dpa_tail_up", "gauge", "1 while the tail worker process is alive.", int(tail_alive)),
        ]
        lines: list[str] = []
        for name, kind, help_text, value in simple:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {_num(value)}"]
        name = "dpa_rejected_requests_total"
        lines += [
            f"# HELP {name} Requests refused, by reason (the error code of the JSON answer).",
            f"# TYPE {name} counter",
        ]
        lines += [f'{name}{{reason="{code}"}} {n}' for code, n in sorted(self.rejected.items())]
        for name, help_text, hist in (
            ("dpa_step_seconds", "Train request latency: body read, validation, tail step, commit.", self.step_seconds),
            ("dpa_checkpoint_seconds", "Time to write a durable tail checkpoint.", self.checkpoint_seconds),
        ):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram", *hist.lines(name)]
        return "\n".join(lines) + "\n"
