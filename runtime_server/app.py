"""The edge server's aiohttp application: auth, sessions, exactly-once steps, one shared tail.

The tail lives in a child process (``tail_worker``: onnxruntime-training's step holds
the GIL), driven from a single worker thread, so updates from concurrent sessions are
applied one at a time (none lost) and the event loop stays free: ``/v1/health`` answers
during a step. Every request is validated completely before the tail is touched, so a
rejected request changes nothing.

A train step is answered only after it is durable: its reply is stored, then its request
is appended to the journal (``journal.py``; the reply streams meanwhile, all but its last
bytes: ``_apply_step``); every ``checkpoint_every`` steps the tail
checkpoint, which carries every session's step count, replaces the journal. A SIGKILL at
any moment therefore leaves either the step applied (after the restart's replay) with
its reply stored, so a retry gets that reply, or neither, so a retry applies it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from aiohttp import web

from dpa import wire
from dpa.atomic import atomic_write_bytes
from dpa.buffers import BufferPool
from dpa.devices import resolve_device
from dpa.manifest import GraphNames, Manifest, load_manifest, manifest_sha256
from dpa.streaming import read_body, write_chunks
from runtime_server import metrics as prom
from runtime_server.auth import TokenStore
from runtime_server.config import ServerConfig
from runtime_server.errors import ApiError, error_response
from runtime_server.journal import Journal
from runtime_server.sessions import Session, SessionTable
from runtime_server.tail import NonFiniteStep
from runtime_server.tail_worker import TailWorker
from runtime_server.validation import step_number, validate_eval, validate_train

__all__ = ["init_app", "reload_tokens", "STATE", "API_PREFIX", "max_body_bytes"]

log = logging.getLogger(__name__)

API_PREFIX = "/v1"
#: Room for the wire header, metadata and labels beyond the activation bytes.
_FRAMING_SLACK = 64 * 1024
#: Requests answered without a token: load balancers and orchestrators probe this.
_PUBLIC = frozenset({f"{API_PREFIX}/health"})
_OWNER = web.RequestKey("owner", str)  # the token's device name; absent without auth


@dataclass
class ServerState:
    config: ServerConfig
    manifest: Manifest
    manifest_sha256: str
    tail: TailWorker
    executor: ThreadPoolExecutor
    max_body: int
    slots: asyncio.Semaphore  # bounds bodies in memory: see ServerConfig.max_inflight_steps
    sessions: SessionTable
    tokens: TokenStore | None
    journal: Journal | None  # None: checkpoint_every alone decides what a crash loses
    buffers: BufferPool  # request and reply bodies, reused (dpa.buffers)
    metrics: prom.Metrics = field(default_factory=prom.Metrics)
    tail_alive: bool = True
    started: float = field(default_factory=time.time)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the tail thread; a dead tail process becomes 503 for this and every later call."""
        if not self.tail_alive:
            raise _tail_down()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args))
        except BrokenProcessPool:
            self.tail_alive = False
            log.error("tail worker died", extra={"fields": {"action": "restart the server"}})
            raise _tail_down() from None
        except OSError as exc:  # disk full, state dir gone: the device may retry once it is fixed
            log.error("storage error", extra={"fields": {"error": type(exc).__name__, "errno": exc.errno}})
            raise ApiError(503, "storage_error", f"the server could not write its state: {exc.strerror}") from None


def _tail_down() -> ApiError:
    return ApiError(503, "tail_unavailable", "the tail worker process died; the server must be restarted")


STATE = web.AppKey("state", ServerState)


def max_body_bytes(manifest: Manifest, max_batch: int) -> int:
    """Largest legal request: a full batch of float32 activations plus int64 labels and framing."""
    return max_batch * (4 * manifest.activation_numel + 8) + _FRAMING_SLACK


def _route(request: web.Request) -> str:
    """The route's pattern (no session ids) for logs."""
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        status, code, message, extra, headers = exc.status, exc.code, exc.message, exc.extra, exc.headers
    except web.HTTPRequestEntityTooLarge as exc:
        status, code, message, extra, headers = 413, "body_too_large", exc.text or "request body too large", {}, {}
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        status, code, message = exc.status, exc.reason.lower().replace(" ", "_"), exc.reason
        extra, headers = {}, {}
    state = request.app.get(STATE)
    if state is not None:
        state.metrics.reject(code)
    fields = {"method": request.method, "route": _route(request), "status": status, "code": code}
    fields["device"] = request.get(_OWNER)
    log.info("request rejected", extra={"fields": fields})
    return error_response(status, code, message, extra, headers)


@web.middleware
async def _auth(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    tokens = request.app[STATE].tokens
    if tokens is not None and request.path not in _PUBLIC:
        owner = tokens.authenticate(request.headers.get("Authorization"))
        if owner is None:
            raise ApiError(
                401,
                "unauthorized",
                "send a valid device token: Authorization: Bearer <token> (see `dpa token add`)",
                headers={"WWW-Authenticate": 'Bearer realm="dpa"'},
            )
        request[_OWNER] = owner
    return await handler(request)


# ----------------------------------------------------------------------------- helpers


def _session(request: web.Request) -> Session:
    state = request.app[STATE]
    return state.sessions.get(request.match_info["session_id"], request.get(_OWNER))


async def _read_message(request: web.Request) -> tuple[bytearray, wire.Message]:
    """The body as received (journalled for a train step) and its decoded message (views into it)."""
    state = request.app[STATE]
    if request.content_type != wire.CONTENT_TYPE:
        raise ApiError(
            415, "unsupported_media_type", f"send tensors as {wire.CONTENT_TYPE}, got {request.content_type!r}"
        )
    length = request.content_length
    if length is not None and length > state.max_body:
        raise ApiError(413, "body_too_large", f"body of {length} bytes exceeds the limit of {state.max_body}")
    try:
        body = await read_body(request.content, length, state.buffers)
    except ValueError as exc:
        raise ApiError(400, "malformed_body", str(exc)) from None
    try:
        return body, wire.decode(body)
    except wire.WireError as exc:
        raise ApiError(400, "malformed_body", str(exc)) from None


async def _tensor_response(request: web.Request, body: bytes | bytearray) -> web.StreamResponse:
    """Send a wire message in slices as the socket drains (see ``dpa.streaming.CHUNK``)."""
    response = web.StreamResponse(headers={"Content-Type": wire.CONTENT_TYPE})
    response.content_length = len(body)
    await response.prepare(request)
    await _write_view(response, memoryview(body))
    await response.write_eof()
    return response


def _stored_reply(state: ServerState, session: Session, step: int) -> bytearray:
    """The reply to the session's last applied step, as first sent (read on the tail thread)."""
    path = state.sessions.reply_path(session)
    try:
        data = bytearray(path.read_bytes())
        if wire.decode(data).meta.get("step") == step:
            return data
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
    return web.Response(body=text.encode(), headers={"Content-Type": prom.CONTENT_TYPE})


async def open_session(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        body = await request.json()
    except Exception:
        raise ApiError(400, "malformed_body", 'send a JSON object {"manifest_sha256": ..., "client": ...}') from None
    if not isinstance(body, dict) or not isinstance(body.get("manifest_sha256"), str):
        raise ApiError(400, "malformed_body", "field manifest_sha256 (string) is required")
    if body["manifest_sha256"] != state.manifest_sha256:
        raise ApiError(
            409,
            "manifest_mismatch",
            f"client manifest sha256 {body['manifest_sha256'][:12]}... differs from the server's "
            f"{state.manifest_sha256[:12]}...: both sides must use the same export",
        )
    client = "".join(ch for ch in str(body.get("client", "")) if ch.isprintable())[:64]
    session = state.sessions.open(request.get(_OWNER), client)
    await state.sessions.persist()  # durable before the device learns the id
    fields = {"session": session.id[:8], "device": session.owner, "open": len(state.sessions.sessions)}
    log.info("session opened", extra={"fields": fields})
    m = state.manifest
    return web.json_response(
        {
            "session_id": session.id,
            "step": session.step,
            "max_batch": state.config.max_batch,
            "activation_shape": list(m.activation_shape),
            "num_classes": m.num_classes,
            "global_step": state.tail.global_step,
        },
        status=201,
    )


async def describe_session(request: web.Request) -> web.Response:
    return web.json_response(_session(request).describe())


async def close_session(request: web.Request) -> web.Response:
    state = request.app[STATE]
    session = _session(request)
    async with session.lock:  # not while one of its steps runs
        state.sessions.close(session)
        await state.sessions.persist()
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
    async with session.lock, state.slots:  # a retry waits for its original; few bodies in memory
        if state.sessions.sessions.get(session.id) is not session:  # closed while this request waited
            raise ApiError(404, "unknown_session", f"session {session.id[:8]}... was closed")
        raw, message = await _read_message(request)
        step = step_number(message)
        if step == session.step:  # a retry of the last applied step: its answer, not a second update
            stored = await state.run(_stored_reply, state, session, step)
        elif step != session.step + 1:
            raise ApiError(
                409,
                "step_out_of_order",
                f"this session's next step is {session.step + 1}, not {step}",
                extra={"expected_step": session.step + 1},
            )
        else:
            stored = None
            act, labels = await state.run(validate_train, state.manifest, state.config.max_batch, message)
            try:
                reply = await _apply_step(request, state, session, step, raw, act, labels)
            except _ReplyCut as cut:
                return cut.response
    # The rest of the reply is sent after the lock and the slot are released: a slow link holds neither.
    if stored is not None:
        state.metrics.replayed_steps += 1
        log.info("step replayed", extra={"fields": {"session": session.id[:8], "step": step}})
        return await _tensor_response(request, stored)
    response, sending, saved_s = reply
    await sending
    m = state.metrics
    m.steps += 1
    m.examples += int(labels.shape[0])
    if saved_s is not None:
        m.checkpoints += 1
        m.checkpoint_seconds.observe(saved_s)
    elapsed = time.perf_counter() - started
    m.step_seconds.observe(elapsed)
    fields = {"session": session.id[:8], "step": step, "batch": int(labels.shape[0]), "ms": round(elapsed * 1e3, 1)}
    log.debug("step applied", extra={"fields": fields})
    return response


#: Bytes of a train reply held back until its step is committed (see ``_apply_step``).
_HELD_BACK = 8


class _ReplyCut(Exception):
    """The commit failed after the reply had started: the connection was cut instead of an error reply."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("reply cut")
        self.response = response


async def _apply_step(
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
    (0.1-0.5 s per step at paper size) overlap the transfer instead of adding to it.
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
    sent = asyncio.create_task(_write_view(response, view[: len(view) - held]))
    try:
        saved_s = await commit
    except BaseException as exc:
        sent.cancel()
        if request.transport is not None:
            request.transport.close()  # a cut reply: the device retries (docs/protocol.md section 6)
        if isinstance(exc, ApiError):
            state.metrics.reject(exc.code)
            log.warning("reply cut", extra={"fields": {"session": session.id[:8], "step": step, "code": exc.code}})
            raise _ReplyCut(response) from exc
        raise

    async def rest() -> None:
        await sent
        if held:
            await response.write(view[len(view) - held :])
        await response.write_eof()

    return response, asyncio.create_task(rest()), saved_s


async def _write_view(response: web.StreamResponse, view: memoryview) -> None:
    async for chunk in write_chunks(view):
        await response.write(chunk)


def _tail_step(
    state: ServerState, session: Session, step: int, act: np.ndarray, labels: np.ndarray
) -> tuple[bytearray, int]:
    """On the tail thread: update the tail and encode the reply; (reply, global step). The step counts from here."""
    result = state.tail.train_step(act, labels)
    body = wire.encode(
        {
            "loss": np.float32(result.loss),
            GraphNames.LOGITS: result.logits,
            GraphNames.ACTIVATION_GRADIENT: result.activation_gradient,
        },
        {"global_step": result.global_step, "step": step},
        state.buffers,
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
        _checkpoint(state.tail, state.sessions, state.journal)
        return time.perf_counter() - t0
    return None


def _checkpoint(tail: TailWorker, sessions: SessionTable, journal: Journal | None) -> None:
    tail.save(sessions.committed_steps())
    if journal is not None:
        journal.truncate(tail.global_step)


def _replay(tail: TailWorker, sessions: SessionTable, journal: Journal) -> int:
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
            session.step = int(message.meta["step"])
            session.examples += int(labels.shape[0])
        replayed += 1
    return replayed


async def evaluate(request: web.Request) -> web.Response:
    state = request.app[STATE]
    session = _session(request)
    state.sessions.admit(session)
    async with state.slots:
        _, message = await _read_message(request)
        act = await state.run(validate_eval, state.manifest, state.config.max_batch, message)

        def step() -> bytearray:
            return wire.encode({GraphNames.LOGITS: state.tail.eval_step(act)})

        body = await state.run(step)
    state.metrics.eval_requests += 1
    return await _tensor_response(request, body)


# ----------------------------------------------------------------------------- app


def reload_tokens(app: web.Application) -> bool:
    """Read the token file again (``kill -HUP``): revoke a lost phone's token without a restart.

    A file that no longer loads leaves the current tokens in force. Sessions stay with their
    device name; a revoked token's requests get 401 from now on.
    """
    state = app[STATE]
    if state.config.tokens is None:
        return False
    try:
        state.tokens = TokenStore.load(state.config.tokens)
    except (OSError, ValueError) as exc:
        log.error("token reload failed, keeping the old tokens", extra={"fields": {"error": str(exc)[:200]}})
        return False
    log.info("tokens reloaded", extra={"fields": {"devices": len(state.tokens.digests)}})
    return True


async def _expire_sessions(state: ServerState) -> None:
    period = min(30.0, state.config.session_idle_s / 4)
    while True:
        await asyncio.sleep(period)
        gone = state.sessions.expire()
        if gone:
            await state.sessions.persist()
            log.info("sessions expired", extra={"fields": {"count": len(gone), "open": len(state.sessions.sessions)}})


def init_app(config: ServerConfig) -> web.Application:
    """Build the application; raises ValueError for a missing/altered export or token file."""
    manifest = load_manifest(config.artifacts, verify=("tail",))
    digest = manifest_sha256(config.artifacts)
    tokens = TokenStore.load(config.tokens) if config.tokens is not None else None
    max_body = max_body_bytes(manifest, config.max_batch)
    app = web.Application(client_max_size=max_body, middlewares=[_errors, _auth])
    state_dir = config.resolved_state_dir

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tail")
        device = resolve_device(config.device)
        tail = await loop.run_in_executor(
            executor, TailWorker, config.artifacts, manifest, device, state_dir, config.max_batch
        )
        sessions = SessionTable(config, state_dir)
        sessions.restore(tail.committed_sessions)
        journal = Journal(state_dir) if config.journal else None
        replayed = 0
        if journal is not None:
            replayed = await loop.run_in_executor(executor, _replay, tail, sessions, journal)
        slots = asyncio.Semaphore(config.max_inflight_steps)
        # A request and a reply per step in flight (more only while slow links drain their replies).
        buffers = BufferPool(keep=2 * config.max_inflight_steps)
        state = ServerState(
            config, manifest, digest, tail, executor, max_body, slots, sessions, tokens, journal, buffers
        )
        app[STATE] = state
        expiry = asyncio.create_task(_expire_sessions(state))
        if tokens is not None:
            try:
                loop.add_signal_handler(signal.SIGHUP, reload_tokens, app)
            except (NotImplementedError, RuntimeError, AttributeError):
                pass  # no SIGHUP (Windows) or not the main thread (the tests' servers): reload_tokens() still works
        fields = {"cut": manifest.cut, "device": device.describe(), "global_step": tail.global_step}
        fields["replayed_steps"] = replayed
        fields |= {"sessions": len(sessions.sessions), "auth": tokens is not None, "tls": config.tls_cert is not None}
        log.info("server started", extra={"fields": fields})
        yield
        expiry.cancel()
        if state.tail_alive and tail.dirty:
            await loop.run_in_executor(executor, _checkpoint, tail, sessions, journal)
        # Close the pool from the thread that started it: the child dies with that thread (PDEATHSIG).
        await loop.run_in_executor(executor, tail.close)
        executor.shutdown(wait=True)
        log.info("server stopped", extra={"fields": {"global_step": tail.global_step}})

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get(f"{API_PREFIX}/health", health)
    app.router.add_get(f"{API_PREFIX}/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_post(f"{API_PREFIX}/sessions", open_session)
    app.router.add_get(f"{API_PREFIX}/sessions/{{session_id}}", describe_session)
    app.router.add_delete(f"{API_PREFIX}/sessions/{{session_id}}", close_session)
    app.router.add_post(f"{API_PREFIX}/sessions/{{session_id}}/train", train)
    app.router.add_get(f"{API_PREFIX}/sessions/{{session_id}}/steps/{{step}}", stored_reply)
    app.router.add_post(f"{API_PREFIX}/sessions/{{session_id}}/eval", evaluate)
    return app
