"""The API's handlers (``docs/protocol.md``): health, status, metrics, sessions, train, stored replies, eval.

Every request is validated completely before the tail is touched, so a rejected request changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from dpa.contract import messages, wire
from dpa.contract.messages import SessionField
from dpa.contract.streaming import read_body
from runtime_server import metrics as prom
from runtime_server.class_sums import ReleaseConflict
from runtime_server.errors import ApiError
from runtime_server.records import CorruptRecord, read_sealed
from runtime_server.sessions import Session
from runtime_server.state import OWNER, STATE, ServerState, class_sums_body_bytes, gallery_size, storage_error
from runtime_server.step_commit import ReplyCut, apply_step, write_view
from runtime_server.validation import step_number, validate_class_sums, validate_eval, validate_train

__all__ = [
    "health",
    "status",
    "metrics",
    "open_session",
    "describe_session",
    "close_session",
    "stored_reply",
    "train",
    "evaluate",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- helpers


def _session(request: web.Request) -> Session:
    state = request.app[STATE]
    return state.sessions.get(request.match_info["session_id"], request.get(OWNER))


def body_size(request: web.Request, limit: int | None = None) -> int:
    """The bytes a tensor body will hold in memory (checked: media type, size, against ``limit``, default
    the largest train request); before it is read."""
    state = request.app[STATE]
    limit = state.max_body if limit is None else limit
    if request.content_type != wire.CONTENT_TYPE:
        raise ApiError(
            415, "unsupported_media_type", f"send tensors as {wire.CONTENT_TYPE}, got {request.content_type!r}"
        )
    length = request.content_length
    if length is not None and length > limit:
        raise ApiError(413, "body_too_large", f"body of {length} bytes exceeds the limit of {limit}")
    return length if length is not None else limit


async def read_message(request: web.Request, size: int) -> tuple[bytearray, wire.Message]:
    """The body as received (journalled for a train step) and its decoded message (views into it).

    Read within the body's deadline (``ServerState.deadline``): a client too slow is answered 408
    and its connection closed, and it never held a step slot."""
    state = request.app[STATE]
    length = request.content_length
    deadline = state.deadline(size)  # size: body_size(request), checked before the budget was taken
    try:
        async with asyncio.timeout(deadline):
            body = await read_body(request.content, length, state.buffers)
    except TimeoutError:
        state.metrics.reject("body_timeout")
        raise ApiError(
            408,
            "body_timeout",
            f"the body did not arrive within {deadline:.0f} s (at least {state.config.min_transfer_rate / 1024:.0f} "
            "KiB/s is needed); send it again",
            headers={"Connection": "close"},
            close=True,
        ) from None
    except ValueError as exc:
        raise ApiError(400, "malformed_body", str(exc)) from None
    try:
        return body, wire.decode(body)
    except wire.WireError as exc:
        raise ApiError(400, "malformed_body", str(exc)) from None


async def _tensor_response(request: web.Request, body: bytes | bytearray) -> web.StreamResponse:
    """Send a wire message in slices as the socket drains (see ``dpa.contract.streaming.CHUNK``)."""
    response = web.StreamResponse(headers={"Content-Type": wire.CONTENT_TYPE})
    response.content_length = len(body)
    await response.prepare(request)
    state = request.app[STATE]
    if await write_view(request, response, memoryview(body), state.deadline(len(body)), state.metrics):
        await response.write_eof()
    return response


def _stored_reply(state: ServerState, session: Session, step: int) -> bytearray:
    """The reply to the session's last applied step, as first sent (read on the tail thread)."""
    path = state.sessions.reply_path(session)
    try:
        data = read_sealed(path, what="stored reply")
        if messages.step_of(wire.decode(data)) == step:
            return data
    except CorruptRecord as exc:  # never served: the device is told, and goes on with the next step
        log.error("stored reply corrupt", extra={"fields": {"session": session.id[:8], "error": str(exc)[:200]}})
    except (OSError, wire.WireError):
        pass
    raise ApiError(
        409, "reply_unavailable", f"step {step} was applied but its reply is no longer stored; continue with {step + 1}"
    )


# ----------------------------------------------------------------------------- handlers


async def health(request: web.Request) -> web.Response:
    if not request.app[STATE].tail_alive:
        return web.json_response({"status": "tail_down"}, status=503)
    return web.json_response({"status": "ok"})


async def status(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(
        {
            "global_step": state.tail.global_step,
            "examples_seen": state.tail.examples_seen,
            "sessions": len(state.sessions.sessions),
            "manifest_sha256": state.manifest_sha256,
            "cut": state.manifest.cut,
            "max_batch": state.config.max_batch,
            "max_body_bytes": state.max_body,
            "checkpoint_every": state.config.checkpoint_every,
            "resumed": state.tail.resumed,
            "uptime_s": round(time.time() - state.started, 3),
        }
    )


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    text = state.metrics.render(
        active_sessions=len(state.sessions.sessions), global_step=state.tail.global_step, tail_alive=state.tail_alive
    )
    return web.Response(body=text, headers={"Content-Type": prom.CONTENT_TYPE})


async def open_session(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        body = await request.json()
    except Exception:
        raise ApiError(400, "malformed_body", 'send a JSON object {"manifest_sha256": ..., "client": ...}') from None
    if not isinstance(body, dict) or not isinstance(body.get(SessionField.MANIFEST_SHA256), str):
        raise ApiError(400, "malformed_body", "field manifest_sha256 (string) is required")
    if body[SessionField.MANIFEST_SHA256] != state.manifest_sha256:
        raise ApiError(
            409,
            "manifest_mismatch",
            f"client manifest sha256 {body[SessionField.MANIFEST_SHA256][:12]}... differs from the server's "
            f"{state.manifest_sha256[:12]}...: both sides must use the same export",
        )
    client = "".join(ch for ch in str(body.get(SessionField.CLIENT, "")) if ch.isprintable())[
        : messages.CLIENT_NAME_MAX
    ]
    try:
        labels = messages.parse_labels_field(body.get(SessionField.LABELS))
        rows = messages.parse_gallery_rows(
            body.get(SessionField.GALLERY_ROWS), state.manifest.num_classes, gallery_size(state.config, state.manifest)
        )
    except ValueError as exc:
        raise ApiError(400, "malformed_body", str(exc)) from None
    session = state.sessions.open(request.get(OWNER), client, labels, rows)
    try:
        await state.sessions.persist()  # durable before the device learns the id
    except OSError as exc:
        state.sessions.sessions.pop(session.id, None)  # a session nobody can resume is no session
        raise storage_error(exc) from None
    fields = {
        "session": session.id[:8],
        "device": session.owner,
        "open": len(state.sessions.sessions),
        "labels": labels,
    }
    log.info("session opened", extra={"fields": fields})
    m = state.manifest
    return web.json_response(
        {
            SessionField.SESSION_ID: session.id,
            SessionField.STEP: session.step,
            SessionField.MAX_BATCH: state.config.max_batch,
            SessionField.ACTIVATION_SHAPE: list(m.activation_shape),
            SessionField.NUM_CLASSES: m.num_classes,
            SessionField.GLOBAL_STEP: state.tail.global_step,
            SessionField.LABELS: labels,
            SessionField.GALLERY_ROWS: rows,
            SessionField.GALLERY_SIZE: gallery_size(state.config, m),
        },
        status=201,
    )


async def describe_session(request: web.Request) -> web.Response:
    return web.json_response(_session(request).describe())


async def close_session(request: web.Request) -> web.Response:
    state = request.app[STATE]
    session = _session(request)
    async with session.lock:  # not while one of its steps runs
        state.sessions.sessions.pop(session.id, None)
        try:
            await state.sessions.persist()
        except OSError as exc:
            state.sessions.sessions[session.id] = session  # still open, on disk and here: the device may retry
            raise storage_error(exc) from None
        state.sessions.close(session)
    log.info("session closed", extra={"fields": {"session": session.id[:8], "steps": session.step}})
    return web.Response(status=204)


async def stored_reply(request: web.Request) -> web.Response:
    """GET .../steps/{n}: the reply to step n if it is the last applied one (a device resuming after a crash)."""
    state = request.app[STATE]
    session = _session(request)
    try:
        step = int(request.match_info["step"])
    except ValueError:
        raise ApiError(400, "malformed_step", "the step in the path must be an integer") from None
    async with session.lock:
        if step != session.step or step < 1:
            raise ApiError(
                404, "no_stored_reply", f"only the last applied step ({session.step}) has a stored reply, not {step}"
            )
        stored = await state.run(_stored_reply, state, session, step)
    return await _tensor_response(request, stored)


async def train(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    session = _session(request)
    state.sessions.admit(session)
    started = time.perf_counter()
    try:
        step, stored, reply, batch = await _take_step(request, state, session)
    except ReplyCut as cut:
        return cut.response
    # The rest of the reply is sent after the lock and the slot are released: a slow link holds neither.
    # Nor does it hold the request: its body and the tensors decoded from it lived in _take_step's frame,
    # so the body is back in the pool and an unread reply holds what dpa_reply_bytes_unsent says (issue 26).
    if stored is not None:
        state.metrics.retry_answered()
        log.info(
            "retried step answered from its stored reply", extra={"fields": {"session": session.id[:8], "step": step}}
        )
        return await _tensor_response(request, stored)
    assert reply is not None
    response, sending, saved_s = reply
    await sending
    if saved_s is not None:
        state.metrics.checkpoint_written(saved_s)
    elapsed = time.perf_counter() - started
    state.metrics.step_applied(examples=batch, seconds=elapsed)
    fields = {"session": session.id[:8], "step": step, "batch": batch, "ms": round(elapsed * 1e3, 1)}
    log.debug("step applied", extra={"fields": fields})
    return response


async def _take_step(
    request: web.Request, state: ServerState, session: Session
) -> tuple[int, bytearray | None, tuple[web.StreamResponse, asyncio.Task[None], float | None] | None, int]:
    """Read the step's body and apply it (or find its stored reply): (step, stored reply, reply, batch)."""
    size = body_size(request)
    # A retry waits for its original. The body is read before a step slot is taken: a slow upload holds
    # only its share of the body budget, for at most its deadline; the slot is for the tail's work.
    async with session.lock, state.bodies.hold(size):
        if state.sessions.sessions.get(session.id) is not session:  # closed while this request waited
            raise ApiError(404, "unknown_session", f"session {session.id[:8]}... was closed")
        raw, message = await read_message(request, size)
        step = step_number(message)
        async with state.slots:
            if step == session.step:  # a retry of the last applied step: its answer, not a second update
                return step, await state.run(_stored_reply, state, session, step), None, 0
            if step != session.step + 1:
                raise ApiError(
                    409,
                    "step_out_of_order",
                    f"this session's next step is {session.step + 1}, not {step}",
                    extra={"expected_step": session.step + 1},
                )
            act, labels = await state.run(validate_train, state.manifest, state.config.max_batch, message)
            reply = await apply_step(request, state, session, step, raw, act, labels)
            return step, None, reply, int(labels.shape[0])


async def templates(request: web.Request) -> web.StreamResponse:
    """GET /templates: the class templates and their counts, as a wire message: of the class-sum
    releases where there are any, else each class's mean per-example release."""
    state = request.app[STATE]
    store, sums = state.tail.templates, state.class_sums
    releases = len(sums) if sums is not None else 0
    if store is None and not releases:
        raise ApiError(
            404, "no_templates", "this server keeps no class templates (start it with --templates) and has received "
            "no class sums",
        )  # fmt: skip

    def encode() -> bytearray:
        if releases:  # class sums: n times less noise than per-example releases (runtime_server.class_sums)
            assert sums is not None
            means, counts = sums.templates()
            means = means.reshape(len(counts), *state.manifest.activation_shape)
        else:
            assert store is not None
            means, counts = store.means(), store.counts.copy()
        meta = {messages.TEMPLATES_META_STEP: state.tail.global_step, messages.TEMPLATES_META_CLASS_SUMS: releases}
        return wire.encode({messages.TEMPLATES: means, messages.COUNTS: counts}, meta)

    return await _tensor_response(request, await state.run(encode))


async def post_class_sums(request: web.Request) -> web.Response:
    """POST /sessions/{id}/class-sums: keep the session's one class-sum release (durable before the answer)."""
    state = request.app[STATE]
    session = _session(request)
    state.sessions.admit(session)
    store = state.class_sums
    if store is None:
        raise ApiError(
            422, "templates_do_not_fit", "class templates for this export would not fit in the server's memory "
            "limit: use a deeper cut",
        )  # fmt: skip
    size = body_size(request, class_sums_body_bytes(state.manifest))
    async with session.lock, state.bodies.hold(size):
        if state.sessions.sessions.get(session.id) is not session:  # closed while this request waited
            raise ApiError(404, "unknown_session", f"session {session.id[:8]}... was closed")
        raw, message = await read_message(request, size)
        sums, counts = await state.run(validate_class_sums, state.manifest, message)
        try:
            stored = await state.run(store.add, session.id, raw, sums, counts, session.gallery_rows)
        except ReleaseConflict:
            raise ApiError(
                409, "already_released", "this session already released other class sums: a second release of the "
                "same data would be a second privacy cost the device's account does not hold",
            ) from None  # fmt: skip
    log.info("class sums kept", extra={"fields": {"session": session.id[:8], "retry": not stored}})
    return web.json_response({"session_id": session.id, "retry": not stored, "class_sum_releases": len(store)})


async def evaluate(request: web.Request) -> web.Response:
    state = request.app[STATE]
    session = _session(request)
    state.sessions.admit(session)
    size = body_size(request)
    async with state.bodies.hold(size):
        _, message = await read_message(request, size)
        async with state.slots:
            act = await state.run(validate_eval, state.manifest, state.config.max_batch, message)

            def step() -> bytearray:
                return messages.encode_eval_reply(state.tail.eval_step(act))

            body = await state.run(step)
    state.metrics.eval_answered()
    return await _tensor_response(request, body)
