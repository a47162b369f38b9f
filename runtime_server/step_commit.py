"""A train step applied exactly once and answered only once it is durable.

Its reply is stored, then its request is appended to the journal (``journal.py``; the reply
streams meanwhile, all but its last bytes: ``apply_step``); every ``checkpoint_every`` steps the tail
checkpoint, which carries every session's step count, replaces the journal. A SIGKILL at
any moment therefore leaves either the step applied (after the restart's replay) with
its reply stored, so a retry gets that reply, or neither, so a retry applies it.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
from aiohttp import web

from dpa.contract import messages, wire
from dpa.contract.atomic import atomic_write_bytes
from dpa.contract.manifest import GraphNames
from dpa.contract.streaming import write_chunks
from runtime_server.errors import ApiError
from runtime_server.journal import Journal
from runtime_server.sessions import Session, SessionTable
from runtime_server.state import ServerState
from runtime_server.tail import NonFiniteStep
from runtime_server.tail_worker import TailWorker

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
        body, global_step = _tail_step(state, session, step, act, labels)
        loop.call_soon_threadsafe(lambda: encoded.done() or encoded.set_result(body))
        return _commit_step(state, session, global_step, raw, body)

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
    sent = asyncio.create_task(write_view(response, view[: len(view) - held]))
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
        await sent
        if held:
            await response.write(view[len(view) - held :])
        await response.write_eof()

    return response, asyncio.create_task(rest()), saved_s


async def write_view(response: web.StreamResponse, view: memoryview) -> None:
    async for chunk in write_chunks(view):
        await response.write(chunk)


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


def _commit_step(
    state: ServerState, session: Session, global_step: int, raw: bytearray, body: bytearray
) -> float | None:
    """On the tail thread: store the reply, append the journal (the commit point); checkpoint seconds.

    The reply is stored before the journal entry: a crash between them leaves a stored
    reply for a step the restarted server does not have, which the device's retry then
    applies (and overwrites).
    """
    state.sessions.replies.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(state.sessions.reply_path(session), body)
    if state.journal is not None:
        state.journal.append(global_step, session.id, raw)
    if global_step % state.config.checkpoint_every == 0:
        t0 = time.perf_counter()
        checkpoint(state.tail, state.sessions, state.journal)
        return time.perf_counter() - t0
    return None


def checkpoint(tail: TailWorker, sessions: SessionTable, journal: Journal | None) -> None:
    tail.save(sessions.committed_steps())
    if journal is not None:
        journal.truncate(tail.global_step)


def replay(tail: TailWorker, sessions: SessionTable, journal: Journal) -> int:
    """At start: apply the journalled steps after the checkpoint again, in order; how many."""
    replayed = 0
    for entry in journal.entries():
        if entry.global_step <= tail.global_step:  # already in the checkpoint
            entry.path.unlink(missing_ok=True)
            continue
        message = Journal.read(entry)
        labels = message.tensors[GraphNames.LABELS]
        try:
            tail.train_step(message.tensors[GraphNames.ACTIVATION], labels)
        except NonFiniteStep:  # only possible with dropout's new masks; the step still counts as done
            log.warning("journalled step not finite on replay", extra={"fields": {"global_step": entry.global_step}})
        session = sessions.sessions.get(entry.session_id)
        if session is not None:
            session.step = int(message.meta[messages.STEP])
            session.examples += int(labels.shape[0])
        replayed += 1
    return replayed
