"""The edge server's aiohttp application: auth, sessions, exactly-once steps, one shared tail.

The tail lives in a child process (``tail_worker``: onnxruntime-training's step holds
the GIL), driven from a single worker thread, so updates from concurrent sessions are
applied one at a time (none lost) and the event loop stays free: ``/v1/health`` answers
during a step. Every request is validated completely before the tail is touched, so a
rejected request changes nothing.

A train step is answered only after it is durable (``step_commit``): the space for its
journal entry and stored reply is reserved before the tail is touched (a full disk refuses
the step, 503, with nothing applied); then the request is journalled (the commit point) and
the reply stored, while the reply streams, all but its last bytes. Every ``checkpoint_every``
steps the tail checkpoint, which carries every session's step count, replaces the journal. A
SIGKILL at any moment therefore leaves either the step applied (after the restart's replay,
which stores its reply again) so that a retry gets that reply, or neither, so a retry applies
it. Every record is checksummed (``records``) and the state dir names its export.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

from dpa.base.atomic import atomic_write_bytes
from dpa.contract.buffers import BufferPool
from dpa.contract.devices import resolve_device
from dpa.contract.errors import UserError
from dpa.contract.manifest import load_manifest, manifest_sha256
from dpa.contract.messages import API_PREFIX, Route
from runtime_server.auth import TokenStore
from runtime_server.budget import ByteBudget
from runtime_server.class_sums import ClassSumStore
from runtime_server.config import ServerConfig
from runtime_server.cors import add_cors_headers, cors_middleware
from runtime_server.handlers import (
    close_session,
    describe_session,
    evaluate,
    health,
    metrics,
    open_session,
    post_class_sums,
    status,
    stored_reply,
    templates,
    train,
)
from runtime_server.journal import Journal
from runtime_server.middlewares import auth, errors
from runtime_server.records import verify_digest
from runtime_server.sessions import SessionTable
from runtime_server.state import STATE, ServerState, gallery_size, max_body_bytes
from runtime_server.state_lock import StateLock, sweep_temp_files
from runtime_server.step_commit import checkpoint, replay
from runtime_server.tail import CHECKPOINT_NAME
from runtime_server.tail_exchange import get_tail, put_tail
from runtime_server.tail_worker import TailWorker
from runtime_server.templates import ClassTemplates

__all__ = ["init_app", "reload_tokens", "STATE", "max_body_bytes"]

log = logging.getLogger(__name__)


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


#: In the state dir: which export it belongs to (its tail checkpoint only fits that export's graphs).
EXPORT_RECORD = "export.json"


def open_state_dir(state_dir: Path, manifest_digest: str) -> None:
    """Refuse a state dir written for another export, or whose checkpoint fails its checksum; record
    the export in a new one. Runs before anything is loaded, so the message names the file."""
    state_dir.mkdir(parents=True, exist_ok=True)
    record = state_dir / EXPORT_RECORD
    if record.is_file():
        try:
            owner = json.loads(record.read_text())["manifest_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{record} is unreadable; it should name the export this state dir belongs to") from None
        if owner != manifest_digest:
            raise UserError(
                f"state dir {state_dir} belongs to another export (manifest {owner[:12]}..., not "
                f"{manifest_digest[:12]}...): use that export, or another --state-dir for this one"
            )
    else:
        atomic_write_bytes(record, (json.dumps({"manifest_sha256": manifest_digest}) + "\n").encode())
    ckpt = state_dir / CHECKPOINT_NAME
    if ckpt.is_file():
        verify_digest(ckpt, what="tail checkpoint")


def init_app(config: ServerConfig) -> web.Application:
    """Build the application; raises ValueError for a missing/altered export or token file."""
    manifest = load_manifest(config.artifacts, verify=("tail",))
    digest = manifest_sha256(config.artifacts)
    tokens = TokenStore.load(config.tokens) if config.tokens is not None else None
    max_body = max_body_bytes(manifest, config.max_batch)
    origins = frozenset(config.allow_origins)
    middlewares = ([cors_middleware(origins)] if origins else []) + [errors, auth]
    app = web.Application(client_max_size=max_body, middlewares=middlewares)
    if origins:
        app.on_response_prepare.append(add_cors_headers(origins))
    state_dir = config.resolved_state_dir
    open_state_dir(state_dir, digest)
    class_sums = (  # read here, so that an unreadable release stops the start with its name
        ClassSumStore(state_dir, gallery_size(config, manifest), manifest.activation_numel)
        if ClassTemplates.fit(gallery_size(config, manifest), tuple(manifest.activation_shape))
        else None
    )

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        lock = StateLock(state_dir)  # before anything is swept or loaded: a second server is refused here
        try:
            sweep_temp_files(state_dir)
            async for _ in _serve(app):
                yield
        finally:
            lock.release()

    async def _serve(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tail")
        device = resolve_device(config.device)
        tail = await loop.run_in_executor(
            executor, TailWorker, config.artifacts, manifest, device, state_dir, config.max_batch, config.templates
        )
        sessions = SessionTable(config, state_dir)
        sessions.restore(tail.committed_sessions)
        journal = Journal(state_dir) if config.journal else None
        replayed = 0
        if journal is not None:
            replayed = await loop.run_in_executor(executor, replay, tail, sessions, journal, manifest, config.max_batch)
        slots = asyncio.Semaphore(config.max_inflight_steps)
        # A request and a reply per step in flight (more only while slow links drain their replies).
        buffers = BufferPool(keep=2 * config.max_inflight_steps)
        bodies = ByteBudget(config.max_inflight_body_bytes or 4 * max_body)
        state = ServerState(
            config, manifest, digest, tail, executor, max_body, slots, sessions, tokens, journal, buffers, bodies,
            class_sums,
        )  # fmt: skip
        app[STATE] = state
        expiry = asyncio.create_task(_expire_sessions(state))
        if tokens is not None:
            _reload_tokens_on_sighup(loop, app)
        fields = {"cut": manifest.cut, "device": device.describe(), "global_step": tail.global_step,
                  "replayed_steps": replayed, "sessions": len(sessions.sessions), "auth": tokens is not None,
                  "tls": config.tls_cert is not None}  # fmt: skip
        log.info("server started", extra={"fields": fields})
        yield
        expiry.cancel()
        if state.tail_alive and tail.dirty:
            await loop.run_in_executor(executor, checkpoint, tail, sessions, journal)
        # Close the pool from the thread that started it: the child dies with that thread (PDEATHSIG).
        await loop.run_in_executor(executor, tail.close)
        executor.shutdown(wait=True)
        log.info("server stopped", extra={"fields": {"global_step": tail.global_step}})

    app.cleanup_ctx.append(lifecycle)
    _add_routes(app)
    return app


def _add_routes(app: web.Application) -> None:
    """docs/protocol.md's endpoints, each to its handler."""
    app.router.add_get(API_PREFIX + Route.HEALTH, health)
    app.router.add_get(API_PREFIX + Route.STATUS, status)
    app.router.add_get("/metrics", metrics)
    app.router.add_post(API_PREFIX + Route.SESSIONS, open_session)
    app.router.add_get(API_PREFIX + Route.SESSION, describe_session)
    app.router.add_delete(API_PREFIX + Route.SESSION, close_session)
    app.router.add_post(API_PREFIX + Route.TRAIN, train)
    app.router.add_get(API_PREFIX + Route.STORED_REPLY, stored_reply)
    app.router.add_post(API_PREFIX + Route.EVAL, evaluate)
    app.router.add_get(API_PREFIX + Route.TEMPLATES, templates)
    app.router.add_post(API_PREFIX + Route.CLASS_SUMS, post_class_sums)
    app.router.add_get(API_PREFIX + Route.TAIL, get_tail)
    app.router.add_put(API_PREFIX + Route.TAIL, put_tail)


def _reload_tokens_on_sighup(loop: asyncio.AbstractEventLoop, app: web.Application) -> None:
    """SIGHUP re-reads the token file (``reload_tokens``), as daemons reload their configuration."""
    try:
        loop.add_signal_handler(signal.SIGHUP, reload_tokens, app)
    except (NotImplementedError, RuntimeError, AttributeError):
        pass  # no SIGHUP (Windows) or not the main thread (the tests' servers): reload_tokens() still works
