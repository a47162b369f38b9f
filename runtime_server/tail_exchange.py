"""The tail leaves and enters the edge server whole, for a federation of edge servers (SplitFed).

``GET /v1/tail`` answers the tail's parameters now, with the global step and the examples it has seen;
``PUT /v1/tail`` replaces them (the average of several edge servers' tails, ``dpa.federation.deployment``)
and checkpoints at once, so the journal never replays steps onto the old weights. Only the operators'
tokens (``ServerConfig.operators``: the federation's bridge on this machine) may call them, never a
device's: a device that could read the tail learns nothing it may not, but one that could replace it
could undo every other device's steps.

A replacement names the global step it was computed against: when devices trained the tail since, it is
refused (``409 tail_moved``), because the average would silently erase their steps. A replacement sent
again (a retried round) finds the same step and loads the same weights: the same state, once.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
from aiohttp import web

from dpa.contract import messages, wire
from runtime_server.errors import ApiError
from runtime_server.handlers import body_size, read_message
from runtime_server.state import OWNER, STATE, ServerState, storage_error
from runtime_server.step_commit import checkpoint

__all__ = ["get_tail", "put_tail", "TAIL_META_STEP", "TAIL_META_EXAMPLES", "tail_digest"]

log = logging.getLogger(__name__)

_LAYOUT_SLACK = 64 * 1024  # the wire header and the layout's names and shapes, beyond the parameters' bytes
TAIL_META_STEP = "global_step"  # meta of both: the tail's update count (PUT: the one it was averaged against)
TAIL_META_EXAMPLES = "examples_seen"  # GET's meta: examples the tail has been trained on since the export


def tail_digest(parameters: dict[str, np.ndarray]) -> str:
    """SHA-256 over the parameters' names and float32 bytes, in name order: what a load is answered with."""
    h = hashlib.sha256()
    for name in sorted(parameters):
        h.update(name.encode() + b"\0" + np.ascontiguousarray(parameters[name], dtype=np.float32).tobytes())
    return h.hexdigest()


def _operator(request: web.Request) -> ServerState:
    state = request.app[STATE]
    if request.get(OWNER) not in state.config.operators:
        raise ApiError(
            403, "operator_only", "only the server's operator tokens (--operator) may read or replace the tail"
        )
    return state


async def get_tail(request: web.Request) -> web.Response:
    state = _operator(request)

    def encode() -> bytes:
        meta = {TAIL_META_STEP: state.tail.global_step, TAIL_META_EXAMPLES: state.tail.examples_seen}
        return bytes(messages.encode_tail(state.tail.parameters(), meta))

    return web.Response(body=await state.run(encode), content_type=wire.CONTENT_TYPE)


def _parameters(have: dict[str, np.ndarray], message: wire.Message) -> dict[str, np.ndarray]:
    """The message's parameters, checked against the tail's names, dtype and shapes (``have``)."""
    try:
        got = messages.decode_tail(message)
    except ValueError as exc:
        raise ApiError(422, "wrong_tensors", str(exc)) from None
    if sorted(got) != sorted(have):
        raise ApiError(422, "wrong_tensors", f"a tail has the tensors {sorted(have)}, got {sorted(got)}")
    for name, value in got.items():
        if value.dtype != np.float32:
            raise ApiError(422, "wrong_dtype", f"{name} must be float32, got {value.dtype}")
        if value.shape != have[name].shape:
            raise ApiError(422, "wrong_shape", f"{name} must be {list(have[name].shape)}, got {list(value.shape)}")
        if not np.isfinite(value).all():
            raise ApiError(422, "non_finite", f"{name} holds NaN or infinity")
    return {k: np.array(v) for k, v in got.items()}


async def put_tail(request: web.Request) -> web.Response:
    state = _operator(request)
    have = await state.run(state.tail.parameters)  # once: its sizes bound the body, its shapes check it
    size = body_size(request, 4 * sum(v.size for v in have.values()) + _LAYOUT_SLACK)
    async with state.bodies.hold(size):
        _, message = await read_message(request, size)
        return await _load(request, state, message, have)


async def _load(
    request: web.Request, state: ServerState, message: wire.Message, have: dict[str, np.ndarray]
) -> web.Response:
    expected = message.meta.get(TAIL_META_STEP)
    if isinstance(expected, bool) or not isinstance(expected, int):
        raise ApiError(400, "malformed_body", f"meta {TAIL_META_STEP!r} (the step averaged against) is required")

    def load() -> dict[str, int | str]:  # on the tail thread: no step runs between the check and the load
        values = _parameters(have, message)  # a load keeps the names and shapes, so ``have`` still holds
        if state.tail.global_step != expected:
            raise ApiError(
                409, "tail_moved", f"the tail is at step {state.tail.global_step}, not {expected}: devices trained "
                "it since it was read; read it again and average that", extra={"expected_step": state.tail.global_step},
            )  # fmt: skip
        state.tail.load_parameters(values)
        try:
            checkpoint(state.tail, state.sessions, state.journal)
        except OSError as exc:
            raise storage_error(exc) from None
        return {TAIL_META_STEP: state.tail.global_step, TAIL_META_EXAMPLES: state.tail.examples_seen,
                "sha256": tail_digest(values)}  # fmt: skip

    answer = await state.run(load)
    log.info("tail replaced", extra={"fields": {"global_step": answer[TAIL_META_STEP], "by": request.get(OWNER)}})
    return web.json_response(answer)
