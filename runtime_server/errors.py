"""One helper for every error answer: a status code and a JSON reason the client can show."""

from __future__ import annotations

from typing import Any

from aiohttp import web

__all__ = ["ApiError", "error_response"]


class ApiError(Exception):
    """Raised by handlers for a rejected request; the middleware turns it into JSON.

    ``extra`` adds machine-readable fields to the JSON (``expected_step``, ``retry_after_s``);
    ``headers`` adds HTTP headers (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra or {}
        self.headers = headers or {}
        # Close the connection once the answer is sent, without aiohttp's lingering close (which goes on
        # reading an unfinished body for up to 10 s): a body that missed its deadline is not waited for.
        self.close = close


def error_response(
    status: int,
    code: str,
    message: str,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.json_response({"error": code, "message": message, **(extra or {})}, status=status, headers=headers)
