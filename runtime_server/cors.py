"""Cross-origin access for a browser device (issue 24), for the origins the operator names and no others.

A web device's page comes from the device side (``dpa web-device``), not from the edge server: the
server is not trusted, and a page it served could read the images it is meant never to see. So the page
and the server have different origins, and a browser only lets the page read the server's answers when
the server says so. ``dpa serve --allow-origin URL`` names each page origin allowed; every other origin
gets no CORS header at all, so browsers refuse it as before (a non-browser client is unaffected either
way: CORS only binds browsers). Preflights (``OPTIONS`` with ``Access-Control-Request-Method``) carry no
token by the standard, so they are answered before the token check, and change nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from dpa.contract.errors import UserError

__all__ = ["check_origin", "cors_middleware", "add_cors_headers"]

_METHODS = "GET, POST, DELETE"
_HEADERS = "Authorization, Content-Type"
#: Preflight answers a browser may cache: the allowed methods and headers never change while the server runs.
_MAX_AGE_S = 600


def check_origin(origin: str) -> str:
    """An origin as browsers send it (``scheme://host[:port]``, no path), lower-cased; UserError otherwise."""
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("",) or parts.query:
        raise UserError(f"--allow-origin wants an origin like http://127.0.0.1:8090 (no path), got {origin!r}")
    return f"{parts.scheme}://{parts.netloc}".lower()


def cors_middleware(origins: frozenset[str]) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def cors(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        origin = request.headers.get("Origin", "").lower()
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers and origin in origins:
            return web.Response(status=204, headers={
                "Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": _METHODS,
                "Access-Control-Allow-Headers": _HEADERS, "Access-Control-Max-Age": str(_MAX_AGE_S),
                "Vary": "Origin"})  # fmt: skip
        return await handler(request)

    return cors


def add_cors_headers(origins: frozenset[str]) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """``on_response_prepare``: every answer to an allowed origin says so, errors and streamed replies too."""

    async def add(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin", "").lower()
        if origin in origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = "WWW-Authenticate"
            response.headers.add("Vary", "Origin")

    return add
