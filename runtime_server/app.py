"""The edge server's aiohttp application: endpoints, validation, one shared tail.

The tail lives in a child process (``tail_worker``: onnxruntime-training's step holds
the GIL), driven from a single worker thread, so updates from concurrent sessions are
applied one at a time (none lost) and the event loop stays free: ``/v1/health`` answers
during a step. Every request is validated completely before the tail is touched, so a
rejected request changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from aiohttp import web

from dpa import wire
from dpa.devices import resolve_device
from dpa.manifest import GraphNames, Manifest, load_manifest, manifest_sha256
from dpa.streaming import read_body
from runtime_server.config import ServerConfig
from runtime_server.errors import ApiError, error_response
from runtime_server.tail import NonFiniteStep
from runtime_server.tail_worker import TailWorker

__all__ = ["init_app", "STATE", "API_PREFIX"]

log = logging.getLogger(__name__)

API_PREFIX = "/v1"
#: Room for the wire header, metadata and labels beyond the activation bytes.
_FRAMING_SLACK = 64 * 1024


@dataclass
class Session:
    id: str
    client: str
    created: float = field(default_factory=time.time)
    steps: int = 0
    examples: int = 0


@dataclass
class ServerState:
    config: ServerConfig
    manifest: Manifest
    manifest_sha256: str
    tail: TailWorker
    executor: ThreadPoolExecutor
    max_body: int
    slots: asyncio.Semaphore  # bounds bodies in memory: see ServerConfig.max_inflight_steps
    sessions: dict[str, Session] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args))


STATE = web.AppKey("state", ServerState)


def max_body_bytes(manifest: Manifest, max_batch: int) -> int:
    """Largest legal request: a full batch of float32 activations plus int64 labels and framing."""
    return max_batch * (4 * manifest.activation_numel + 8) + _FRAMING_SLACK


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        log.info("rejected %s %s: %s %s", request.method, request.path, exc.status, exc.code)
        return error_response(exc.status, exc.code, exc.message)
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(413, "body_too_large", exc.text or "request body too large")
    except web.HTTPException as exc:
        if exc.status >= 400:
            return error_response(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
        raise


# ----------------------------------------------------------------------------- validation


def _session(request: web.Request) -> Session:
    state = request.app[STATE]
    sid = request.match_info["session_id"]
    session = state.sessions.get(sid)
    if session is None:
        raise ApiError(404, "unknown_session", f"no open session {sid!r}; open one with POST {API_PREFIX}/sessions")
    return session


async def _read_message(request: web.Request) -> wire.Message:
    state = request.app[STATE]
    if request.content_type != wire.CONTENT_TYPE:
        raise ApiError(
            415, "unsupported_media_type", f"send tensors as {wire.CONTENT_TYPE}, got {request.content_type!r}"
        )
    length = request.content_length
    if length is not None and length > state.max_body:
        raise ApiError(413, "body_too_large", f"body of {length} bytes exceeds the limit of {state.max_body}")
    try:
        body = await read_body(request.content, length)
    except ValueError as exc:
        raise ApiError(400, "malformed_body", str(exc)) from None
    try:
        return wire.decode(body)
    except wire.WireError as exc:
        raise ApiError(400, "malformed_body", str(exc)) from None


def _check_activation(manifest: Manifest, max_batch: int, message: wire.Message, expected: set[str]) -> np.ndarray:
    names = set(message.tensors)
    if names != expected:
        raise ApiError(422, "wrong_tensors", f"expected tensors {sorted(expected)}, got {sorted(names)}")
    act = message.tensors[GraphNames.ACTIVATION]
    if act.dtype != np.float32:
        raise ApiError(422, "wrong_dtype", f"activation must be float32, got {act.dtype}")
    want = tuple(manifest.activation_shape)
    if act.ndim != 1 + len(want) or tuple(act.shape[1:]) != want:
        raise ApiError(
            422, "wrong_shape", f"activation must have shape (batch, {', '.join(map(str, want))}), got {act.shape}"
        )
    if not 1 <= act.shape[0] <= max_batch:
        raise ApiError(422, "wrong_batch", f"batch size must be 1..{max_batch}, got {act.shape[0]}")
    return act


def _validate_train(manifest: Manifest, max_batch: int, message: wire.Message) -> tuple[np.ndarray, np.ndarray]:
    act = _check_activation(manifest, max_batch, message, {GraphNames.ACTIVATION, GraphNames.LABELS})
    labels = message.tensors[GraphNames.LABELS]
    if labels.dtype != np.int64:
        raise ApiError(422, "wrong_dtype", f"labels must be int64, got {labels.dtype}")
    if labels.shape != (act.shape[0],):
        raise ApiError(422, "wrong_shape", f"labels must have shape ({act.shape[0]},), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= manifest.num_classes):
        raise ApiError(422, "label_out_of_range", f"labels must be in 0..{manifest.num_classes - 1}")
    _check_finite(act)
    return act, labels


def _validate_eval(manifest: Manifest, max_batch: int, message: wire.Message) -> np.ndarray:
    act = _check_activation(manifest, max_batch, message, {GraphNames.ACTIVATION})
    _check_finite(act)
    return act


def _check_finite(act: np.ndarray) -> None:
    # Sum first: one pass and no boolean temporary of the whole batch in the common (finite) case.
    if not math.isfinite(float(np.sum(act, dtype=np.float64))) or not np.isfinite(act).all():
        raise ApiError(422, "non_finite", "activation contains NaN or infinity")


# ----------------------------------------------------------------------------- handlers


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def status(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(
        {
            "global_step": state.tail.global_step,
            "examples_seen": state.tail.examples_seen,
            "sessions": len(state.sessions),
            "manifest_sha256": state.manifest_sha256,
            "cut": state.manifest.cut,
            "max_batch": state.config.max_batch,
            "max_body_bytes": state.max_body,
            "resumed": state.tail.resumed,
            "uptime_s": round(time.time() - state.started, 3),
        }
    )


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
    client = str(body.get("client", ""))[:64]
    session = Session(id=secrets.token_urlsafe(16), client=client)
    state.sessions[session.id] = session
    log.info("opened session for client %r (%d open)", client, len(state.sessions))
    m = state.manifest
    return web.json_response(
        {
            "session_id": session.id,
            "max_batch": state.config.max_batch,
            "activation_shape": list(m.activation_shape),
            "num_classes": m.num_classes,
            "global_step": state.tail.global_step,
        },
        status=201,
    )


async def close_session(request: web.Request) -> web.Response:
    session = _session(request)
    request.app[STATE].sessions.pop(session.id, None)
    return web.Response(status=204)


async def train(request: web.Request) -> web.Response:
    state = request.app[STATE]
    session = _session(request)
    async with state.slots:  # read the body only when the tail can soon take it
        return await _train(request, state, session)


async def _train(request: web.Request, state: ServerState, session: Session) -> web.Response:
    message = await _read_message(request)
    act, labels = await state.run(_validate_train, state.manifest, state.config.max_batch, message)

    def step() -> bytearray:
        result = state.tail.train_step(act, labels)
        if result.global_step % state.config.checkpoint_every == 0:
            state.tail.save()
        return wire.encode(
            {
                "loss": np.float32(result.loss),
                GraphNames.LOGITS: result.logits,
                GraphNames.ACTIVATION_GRADIENT: result.activation_gradient,
            },
            {"global_step": result.global_step},
        )

    try:
        body = await state.run(step)
    except NonFiniteStep as exc:
        raise ApiError(422, "non_finite_step", str(exc)) from None
    session.steps += 1
    session.examples += int(labels.shape[0])
    return web.Response(body=body, content_type=wire.CONTENT_TYPE)


async def evaluate(request: web.Request) -> web.Response:
    state = request.app[STATE]
    _session(request)
    async with state.slots:
        return await _evaluate(request, state)


async def _evaluate(request: web.Request, state: ServerState) -> web.Response:
    message = await _read_message(request)
    act = await state.run(_validate_eval, state.manifest, state.config.max_batch, message)

    def step() -> bytearray:
        return wire.encode({GraphNames.LOGITS: state.tail.eval_step(act)})

    return web.Response(body=await state.run(step), content_type=wire.CONTENT_TYPE)


# ----------------------------------------------------------------------------- app


def init_app(config: ServerConfig) -> web.Application:
    """Build the application; raises ValueError for a missing/altered export."""
    manifest = load_manifest(config.artifacts, verify=("tail",))
    digest = manifest_sha256(config.artifacts)
    max_body = max_body_bytes(manifest, config.max_batch)
    app = web.Application(client_max_size=max_body, middlewares=[_errors])

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tail")
        device = resolve_device(config.device)
        tail = await asyncio.get_running_loop().run_in_executor(
            executor, TailWorker, config.artifacts, manifest, device, config.resolved_state_dir
        )
        slots = asyncio.Semaphore(config.max_inflight_steps)
        app[STATE] = ServerState(config, manifest, digest, tail, executor, max_body, slots)
        log.info("serving cut %s on %s, tail at step %d", manifest.cut, device.describe(), tail.global_step)
        yield
        if tail.dirty:
            await asyncio.get_running_loop().run_in_executor(executor, tail.save)
        executor.shutdown(wait=True)
        tail.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get(f"{API_PREFIX}/health", health)
    app.router.add_get(f"{API_PREFIX}/status", status)
    app.router.add_post(f"{API_PREFIX}/sessions", open_session)
    app.router.add_delete(f"{API_PREFIX}/sessions/{{session_id}}", close_session)
    app.router.add_post(f"{API_PREFIX}/sessions/{{session_id}}/train", train)
    app.router.add_post(f"{API_PREFIX}/sessions/{{session_id}}/eval", evaluate)
    return app
