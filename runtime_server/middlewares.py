"""The middlewares every request passes: one JSON error format, then the bearer-token check."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from dpa.contract.messages import Route, route
from runtime_server.errors import ApiError, error_response
from runtime_server.state import OWNER, STATE

__all__ = ["errors", "auth"]

log = logging.getLogger(__name__)

#: Requests answered without a token: load balancers and orchestrators probe this.
_PUBLIC = frozenset({route(Route.HEALTH)})


def _route(request: web.Request) -> str:
    """The route's pattern (no session ids) for logs."""
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


@web.middleware
async def errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    close = False
    try:
        return await handler(request)
    except ApiError as exc:
        status, code, message, extra, headers = exc.status, exc.code, exc.message, exc.extra, exc.headers
        close = exc.close
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
    fields["device"] = request.get(OWNER)
    log.info("request rejected", extra={"fields": fields})
    response = error_response(status, code, message, extra, headers)
    if close:
        await _answer_and_close(request, response)
    return response


async def _answer_and_close(request: web.Request, response: web.StreamResponse) -> None:
    """Send ``response`` whole, then close the connection at once: ``force_close`` flushes what was
    written and skips the lingering close, so the client reads the answer and then EOF (issue 26)."""
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()


@web.middleware
async def auth(
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
        request[OWNER] = owner
    return await handler(request)
