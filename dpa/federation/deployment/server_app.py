"""The ServerApp of the deployment: combine the edge servers' class sums into one gallery, or average
their tails (SplitFed), through Flower's SuperLink.

Every round asks each edge server's bridge (``dpa.federation.deployment.bridge``) and keeps, per edge
server, its latest answer: an answer is a function of what that edge server holds, so a bridge asked
again (its SuperNode killed mid-round and restarted, a message lost) replaces its answer and never adds
to it. A round makes up to ``attempts`` attempts, each asking only the edge servers that have not
answered; when some never do, the run stops with their names rather than combine a part of the
federation silently. A release that two edge servers both hold (the same SHA-256) stops it too: it
would be counted twice.

What this process sees: per edge server, the sums and noisy counts of the gallery rows its devices
hold (class sums), or its tail and example count (SplitFed); never one device's release
(``docs/server_view.md``). It writes ``gallery.npz`` or ``splitfed_tail.npz``, and ``report.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from dpa.base.atomic import atomic_write_bytes
from dpa.federation.deployment.keys import CLASS_SUMS, LOAD_TAIL, SPLITFED, Do, Run
from dpa.privacy.class_sums import class_templates

__all__ = ["server_app", "app", "GALLERY", "TAIL", "REPORT", "PENDING", "Incomplete"]

GALLERY, TAIL, REPORT = "gallery.npz", "splitfed_tail.npz", "report.json"
PENDING = "pending_average.npz"  # a SplitFed round's average until every edge server has loaded it
_STEPS = "__global_steps__"  # in PENDING: the step each edge server's tail was read at, by edge id


class Incomplete(RuntimeError):
    """Some edge servers did not answer a round within its attempts, or two hold the same release."""


def _wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    return nodes


def _ask(
    grid: Grid,
    kind: str,
    content: Callable[[int | None], RecordDict],
    edges: int,
    timeout: float,
    attempts: int,
    log: list[dict[str, Any]],
    edge_of: dict[int, int],
) -> dict[int, Message]:
    """Each edge server's answer (by its edge id), asking again the nodes that have not answered.
    ``content(edge)`` is the message for an edge server (None: one not known yet); ``edge_of`` maps the
    nodes known so far to their edge servers, and learns from every answer."""
    answers: dict[int, Message] = {}
    errors: list[str] = []
    for attempt in range(1, attempts + 1):
        nodes = _wait_for_nodes(grid, edges, timeout)
        ask = [n for n in nodes if edge_of.get(n) not in answers]
        msgs = [Message(content(edge_of.get(n)), dst_node_id=n, message_type=kind) for n in ask]
        errors = []
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            if reply.has_error():
                errors.append(
                    str(reply.error.reason).strip().splitlines()[-1][:300] if reply.error.reason else "failed"
                )
                continue
            edge = int(next(iter(reply.content.config_records.values()))["edge"])
            edge_of[reply.metadata.src_node_id] = edge
            answers[edge] = reply
        log.append({"attempt": attempt, "asked": len(ask), "answered": sorted(answers), "errors": errors})
        if len(answers) >= edges:
            return answers
    missing = edges - len(answers)
    raise Incomplete(
        f"{missing} of {edges} edge servers did not answer within {attempts} attempts of {timeout:g} s "
        f"(answered: {sorted(answers) or 'none'}; last errors: {'; '.join(errors) or 'none'}); "
        "restart their SuperNodes and run again"
    )


def _instruction(what: str, **fields: Any) -> RecordDict:
    return RecordDict({Do.RECORD: ConfigRecord({Do.WHAT: what, **fields})})


def _combine_class_sums(grid: Grid, rc: dict[str, Any], out: Path, report: dict[str, Any]) -> None:
    size = int(rc[Run.GALLERY_SIZE])
    answers = _ask(
        grid,
        "query",
        lambda _: _instruction(CLASS_SUMS, **{Do.GALLERY_SIZE: size}),
        int(rc[Run.EDGE_SERVERS]),
        float(rc[Run.ROUND_TIMEOUT_S]),
        int(rc[Run.ATTEMPTS]),
        report.setdefault("attempts", []),
        {},
    )
    seen: dict[str, int] = {}
    per_edge, bytes_in = {}, {}  # releases, and the bytes of the arrays each edge server answered
    sums = counts = None
    for edge, reply in sorted(answers.items()):
        for digest in reply.content["edge"]["digests"]:
            if digest in seen:
                raise Incomplete(
                    f"edge servers {seen[digest]} and {edge} both hold release {digest[:12]}...: it "
                    "would be counted twice; a device must enrol at one edge server"
                )
            seen[digest] = edge
        per_edge[str(edge)] = int(reply.content["edge"]["releases"])
        part = reply.content["sums"]
        rows, s, c = part["rows"].numpy(), part["sums"].numpy(), part["counts"].numpy()
        bytes_in[str(edge)] = rows.nbytes + s.nbytes + c.nbytes
        if sums is None:
            sums, counts = np.zeros((size, s.shape[1])), np.zeros(size)
        sums[rows] += s
        counts[rows] += c  # type: ignore[index]
    assert sums is not None and counts is not None
    templates, n = class_templates(sums, counts)
    buf = io.BytesIO()
    np.savez(buf, templates=templates, counts=n)
    atomic_write_bytes(out / GALLERY, buf.getvalue())
    report.update(
        {
            "releases": len(seen),
            "per_edge_server": per_edge,
            "gallery_identities": int((n > 0).sum()),
            "bytes_per_edge_server": bytes_in,
            "gallery": str(out / GALLERY),
            "gallery_sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
        }
    )


def _load_everywhere(grid: Grid, rc: dict[str, Any], average: ArrayRecord, steps: list[int],
                     log: list[dict[str, Any]]) -> dict[int, Message]:  # fmt: skip
    """Every edge server loads ``average``, each against the step it was read at (``steps[edge]``)."""
    content = _instruction(LOAD_TAIL, **{Do.GLOBAL_STEPS: steps})
    content["arrays"] = average
    edges, timeout, attempts = int(rc[Run.EDGE_SERVERS]), float(rc[Run.ROUND_TIMEOUT_S]), int(rc[Run.ATTEMPTS])
    return _ask(grid, "query", lambda _: content, edges, timeout, attempts, log, {})


def _publish(out: Path, average: ArrayRecord) -> None:
    buf = io.BytesIO()
    np.savez(buf, **{k: v.numpy() for k, v in average.items()})
    atomic_write_bytes(out / TAIL, buf.getvalue())
    (out / PENDING).unlink(missing_ok=True)


def _finish_pending(grid: Grid, rc: dict[str, Any], out: Path, report: dict[str, Any]) -> None:
    """A round whose average was computed but not loaded everywhere (the SuperLink or this process died
    between the loads): load that same average, against the same steps, before anything else. An edge
    server that loaded it already loads it again (the same state); without this, the next round would weigh
    those edge servers at 0 examples and average the others' old tails alone."""
    if not (out / PENDING).is_file():
        return
    with np.load(out / PENDING, allow_pickle=False) as z:
        steps = [int(v) for v in z[_STEPS]]
        average = ArrayRecord({k: Array(z[k]) for k in z.files if k != _STEPS})
    log: list[dict[str, Any]] = []
    _load_everywhere(grid, rc, average, steps, log)
    _publish(out, average)
    report["resumed"] = {"global_steps": steps, "attempts": log}


def _splitfed_round(grid: Grid, rc: dict[str, Any], out: Path, report: dict[str, Any], r: int) -> None:
    edges, timeout, attempts = int(rc[Run.EDGE_SERVERS]), float(rc[Run.ROUND_TIMEOUT_S]), int(rc[Run.ATTEMPTS])
    log: list[dict[str, Any]] = []
    tails = _ask(grid, "train", lambda _: RecordDict(), edges, timeout, attempts, log, {})
    examples = {str(e): int(tails[e].content["metrics"]["num-examples"]) for e in sorted(tails)}
    if sum(examples.values()) <= 0:  # nothing trained since the last average: every edge server holds it
        report.setdefault("rounds", []).append({"round": r, "examples": examples, "skipped": "nothing new"})
        return
    average = aggregate_arrayrecords([tails[e].content for e in sorted(tails)], "num-examples")  # Flower's FedAvg
    steps = [int(tails[e].content["edge"]["global-step"]) for e in range(edges)]
    buf = io.BytesIO()  # the round's average, kept until every edge server has loaded it (_finish_pending)
    np.savez(buf, **{k: v.numpy() for k, v in average.items()}, **{_STEPS: np.asarray(steps, dtype=np.int64)})
    atomic_write_bytes(out / PENDING, buf.getvalue())
    loaded = _load_everywhere(grid, rc, average, steps, log)
    _publish(out, average)
    report.setdefault("rounds", []).append(
        {
            "round": r,
            "examples": examples,
            "global_steps": {str(e): s for e, s in enumerate(steps)},
            "loaded_sha256": sorted({str(m.content["loaded"]["sha256"]) for m in loaded.values()}),
            "attempts": log,
        }
    )
    report["tail"] = str(out / TAIL)


def server_app() -> ServerApp:
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        rc = dict(context.run_config)
        out = Path(str(rc[Run.OUT]))
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        report: dict[str, Any] = {"recipe": rc[Run.RECIPE], "edge_servers": int(rc[Run.EDGE_SERVERS])}
        try:
            if rc[Run.RECIPE] == CLASS_SUMS:
                _combine_class_sums(grid, rc, out, report)
            elif rc[Run.RECIPE] == SPLITFED:
                _finish_pending(grid, rc, out, report)
                for r in range(1, int(rc[Run.ROUNDS]) + 1):
                    _splitfed_round(grid, rc, out, report, r)
            else:
                raise Incomplete(f"recipe must be {CLASS_SUMS!r} or {SPLITFED!r}, got {rc[Run.RECIPE]!r}")
        except Incomplete as exc:
            report["error"] = str(exc)
            raise
        finally:
            report["seconds"] = round(time.perf_counter() - started, 3)
            atomic_write_bytes(out / REPORT, (json.dumps(report, indent=1) + "\n").encode())

    return server


app = server_app()
