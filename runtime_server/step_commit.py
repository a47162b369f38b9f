"""A train step applied exactly once and answered only once it is durable.

Its reply is stored, then its request is appended to the journal (``journal.py``; the reply
streams meanwhile, all but its last bytes: ``apply_step``); every ``checkpoint_every`` steps the tail
checkpoint, which carries every session's step count, replaces the journal. A SIGKILL at
any moment therefore leaves either the step applied (after the restart's replay) with
its reply stored, so a retry gets that reply, or neither, so a retry applies it.

Only the journal entry is fsynced per step. The stored reply is written whole (temp file, rename)
but not fsynced: a power cut can take it only while its step is still in the journal, whose replay
stores it again, and the checkpoint that ends the journal fsyncs the replies first. That halved
the step's disk time (BENCHMARKS.md, run M).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np
from aiohttp import web

from dpa.contract import messages, wire
from dpa.contract.errors import UserError
from dpa.contract.manifest import Manifest
from dpa.contract.streaming import write_chunks
from runtime_server.errors import ApiError
from runtime_server.journal import Journal
from runtime_server.metrics import Metrics
from runtime_server.records import DIGEST_BYTES, Reservation, check_free_space, sync_files
from runtime_server.sessions import Session, SessionTable
from runtime_server.state import ServerState, storage_error
from runtime_server.tail import NonFiniteStep
from runtime_server.tail_worker import TailWorker
from runtime_server.validation import step_number, validate_train

__all__ = ["apply_step", "ReplyCut", "write_view", "checkpoint", "replay"]

log = logging.getLogger(__name__)


#: Bytes of a train reply held back until its step is committed (see ``_apply_step``).
_HELD_BACK = 8


class ReplyCut(Exception):
    """The commit failed after the reply had started: the connection was cut instead of an error reply."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("reply cut")
        self.response = response


async def apply_step(
    request: web.Request,
    state: ServerState,
    session: Session,
    step: int,
    raw: bytearray,
    act: np.ndarray,
    labels: np.ndarray,
) -> tuple[web.StreamResponse, asyncio.Task[None], float | None]:
    """Update the tail, then commit the step while its reply is already on its way.

    One job on the tail thread updates the tail, encodes the reply and hands it to the
    event loop, then stores the reply and appends the journal entry (the commit point);
    being one job, no other step reaches the tail in between. Meanwhile the reply goes
    out except its last bytes, which follow only once the commit returns: a device
    never holds a whole reply to a step a crash could lose (without a journal any step
    since the last checkpoint can be lost, so nothing is held back), and the disk writes
    overlap the transfer instead of adding to it.
    If the commit fails the connection is cut; the device retries the step.
    Returns the response, the task sending the rest, and the checkpoint seconds if any.
    """
    loop = asyncio.get_running_loop()
    encoded: asyncio.Future[bytearray] = loop.create_future()

    def job() -> float | None:
        reserved = _reserve(state, session, step, len(raw), int(act.shape[0]))  # a full disk stops us here
        try:
            body, global_step = _tail_step(state, session, step, act, labels)
        except BaseException:
            reserved.release()
            raise
        loop.call_soon_threadsafe(lambda: encoded.done() or encoded.set_result(body))
        return _commit_step(state, session, global_step, raw, body, reserved)

    commit = asyncio.ensure_future(state.run(job))
    try:
        await asyncio.wait([encoded, commit], return_when=asyncio.FIRST_COMPLETED)
        if not encoded.done():  # the tail step failed (this raises): nothing was applied, nothing sent yet
            await commit
    except NonFiniteStep as exc:
        raise ApiError(422, "non_finite_step", str(exc)) from None
    body = encoded.result()
    response = web.StreamResponse(headers={"Content-Type": wire.CONTENT_TYPE})
    response.content_length = len(body)
    await response.prepare(request)
    view = memoryview(body)
    # Without a journal no step is durable before the next checkpoint: holding bytes back protects nothing.
    held = _HELD_BACK if state.journal is not None else 0
    sent = asyncio.create_task(
        write_view(request, response, view[: len(view) - held], state.deadline(len(view)), state.metrics)
    )
    try:
        saved_s = await commit
    except BaseException as exc:
        sent.cancel()
        if request.transport is not None:
            request.transport.close()  # a cut reply: the device retries (docs/protocol.md section 6)
        if isinstance(exc, ApiError):
            state.metrics.reject(exc.code)
            log.warning("reply cut", extra={"fields": {"session": session.id[:8], "step": step, "code": exc.code}})
            raise ReplyCut(response) from exc
        raise

    async def rest() -> None:
        if not await sent:  # not taken in time: the connection is closed, the buffer free
            return
        if held:
            await response.write(view[len(view) - held :])
        await response.write_eof()

    return response, asyncio.create_task(rest()), saved_s


async def write_view(
    request: web.Request, response: web.StreamResponse, view: memoryview, deadline_s: float, metrics: Metrics
) -> bool:
    """Send ``view`` in slices as the socket drains; False (and the connection closed) if the client
    has not taken it within ``deadline_s``: a device that never reads its reply frees its buffer.
    The bytes waiting are in ``dpa_reply_bytes_unsent`` meanwhile, so an operator sees what slow readers hold."""
    metrics.reply_writing(len(view))
    try:
        async with asyncio.timeout(deadline_s):
            async for chunk in write_chunks(view):
                await response.write(chunk)
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()  # not close(): that would wait to flush what the client never reads
        metrics.reply_abandoned()
        log.warning("reply not taken in time; connection closed", extra={"fields": {"deadline_s": round(deadline_s)}})
        return False
    finally:
        metrics.reply_writing(-len(view))
    return True


def _tail_step(
    state: ServerState, session: Session, step: int, act: np.ndarray, labels: np.ndarray
) -> tuple[bytearray, int]:
    """On the tail thread: update the tail and encode the reply; (reply, global step). The step counts from here."""
    result = state.tail.train_step(act, labels)
    body = messages.encode_train_reply(
        loss=result.loss,
        logits=result.logits,
        activation_gradient=result.activation_gradient,
        global_step=result.global_step,
        step=step,
        pool=state.buffers,
    )
    # Recorded here, on the tail thread, so the checkpoint below (and any later one) counts it.
    session.step = step
    session.examples += int(labels.shape[0])
    return body, result.global_step


@dataclass
class _Reserved:
    """The space one step's records need, taken before the tail is touched."""

    reply: Reservation
    journal: Reservation | None

    def release(self) -> None:
        self.reply.release()
        if self.journal is not None:
            self.journal.release()


#: Bytes a reply's meta may take beyond the estimate (the numbers' digits are known; this is slack).
_META_SLACK = 64


def _reserve(state: ServerState, session: Session, step: int, request_bytes: int, batch: int) -> _Reserved:
    """On the tail thread, before the step: room for its journal entry and stored reply, or OSError
    (answered 503 storage_error) with nothing applied. Keeps ``min_free_bytes`` free besides."""
    m = state.manifest
    meta = messages.train_reply_meta(global_step=state.tail.global_step + 1, step=step)
    reply_bytes = wire.pieces(messages.train_reply_specs(batch, m.activation_shape, m.num_classes), meta)[0]
    reply_bytes += _META_SLACK
    journal_bytes = request_bytes if state.journal is not None else 0
    state.sessions.replies.mkdir(parents=True, exist_ok=True)
    check_free_space(
        state.sessions.replies, reply_bytes + journal_bytes + 2 * DIGEST_BYTES, state.config.min_free_bytes
    )
    reply = Reservation(state.sessions.reply_path(session), reply_bytes)
    if state.journal is None:
        return _Reserved(reply, None)
    try:
        return _Reserved(reply, state.journal.reserve(state.tail.global_step + 1, session.id, request_bytes))
    except BaseException:
        reply.release()
        raise


def _commit_step(
    state: ServerState, session: Session, global_step: int, raw: bytearray, body: bytearray, reserved: _Reserved
) -> float | None:
    """On the tail thread: journal the request (the commit point), store the reply; checkpoint seconds.

    Both go into space reserved before the step, so a full disk cannot stop them. Should the journal
    write fail anyway (an I/O error), the tail holds a step that is not durable: the server stops
    taking steps (503 tail_unavailable) until it is restarted, which rolls the tail back to its
    durable state; the reply was never whole on the wire, so nothing answered is lost. A stored reply
    that cannot be written is logged: the step is durable and this reply still goes out whole.
    A checkpoint that fails leaves the journal as it is; the next interval tries again.
    """
    if reserved.journal is not None:
        try:
            reserved.journal.commit(raw)
        except OSError as exc:
            reserved.release()  # both temp files go: a restart must find no trace of this step
            state.tail_alive = False
            log.critical(
                "journal write failed after the step; restart the server", extra={"fields": {"step": global_step}}
            )
            raise storage_error(exc) from None
    try:
        # Without fsyncs: until the next checkpoint the journal holds this step, and a restart's replay
        # stores its reply again (durably); the checkpoint fsyncs the replies before it ends the journal.
        reserved.reply.commit(body, durable=False)
        state.sessions.unsynced_replies.add(reserved.reply.path)
    except OSError as exc:
        log.error("stored reply not written", extra={"fields": {"session": session.id[:8], "errno": exc.errno}})
    if global_step % state.config.checkpoint_every == 0:
        t0 = time.perf_counter()
        try:
            checkpoint(state.tail, state.sessions, state.journal)
        except (OSError, RuntimeError) as exc:  # onnxruntime reports a failed save as a RuntimeError
            log.error("checkpoint failed; the journal keeps the steps", extra={"fields": {"error": str(exc)[:200]}})
            return None
        return time.perf_counter() - t0
    return None


def checkpoint(tail: TailWorker, sessions: SessionTable, journal: Journal | None) -> None:
    """Save the tail with every session's steps; then the journal's steps are in it and it is emptied.
    The stored replies of those steps are made durable first: after this no replay can write them again."""
    sync_files(sessions.unsynced_replies)
    sessions.unsynced_replies.clear()
    tail.save(sessions.committed_steps())
    if journal is not None:
        journal.truncate(tail.global_step)


def replay(tail: TailWorker, sessions: SessionTable, journal: Journal, manifest: Manifest, max_batch: int) -> int:
    """At start: apply the journalled steps after the checkpoint again, in order; how many.

    Each entry is checked as the live path checks a request (its checksum, then ``validate_train``);
    one that fails is refused with its file named, never applied. Each replayed step's reply is stored
    again, so a device whose step was journalled but never answered gets it when it retries.
    """
    replayed = 0
    for entry in journal.entries():
        if entry.global_step <= tail.global_step:  # already in the checkpoint
            entry.path.unlink(missing_ok=True)
            continue
        message = Journal.read(entry)
        try:
            step = step_number(message)
            act, labels = validate_train(manifest, max_batch, message)
        except ApiError as exc:
            raise UserError(
                f"journal entry {entry.path} is not a valid train request ({exc.message}); {_MOVE}"
            ) from None
        if entry.global_step != tail.global_step + 1:
            raise UserError(
                f"journal entry {entry.path} follows step {tail.global_step}, not {entry.global_step - 1}; {_MOVE}"
            )
        try:
            result = tail.train_step(act, labels)
        except NonFiniteStep:  # only possible with dropout's new masks; the step still counts as done
            log.warning("journalled step not finite on replay", extra={"fields": {"global_step": entry.global_step}})
            result = None
        session = sessions.sessions.get(entry.session_id)
        if session is not None:
            session.step = step
            session.examples += int(labels.shape[0])
            if result is not None:
                reply = messages.encode_train_reply(
                    loss=result.loss, logits=result.logits, activation_gradient=result.activation_gradient,
                    global_step=result.global_step, step=step,
                )  # fmt: skip
                sessions.replies.mkdir(parents=True, exist_ok=True)
                Reservation(sessions.reply_path(session), len(reply)).commit(reply)
        replayed += 1
    return replayed


_MOVE = "move the journal folder away to start from the last checkpoint (the steps after it are then lost)"
