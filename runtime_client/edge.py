"""HTTP client for the edge server's API (``docs/protocol.md``), on aiohttp.

Every request carries the device's bearer token (if any), goes over TLS when the URL is
``https`` (trusting ``ca`` besides the system's roots), and is retried through network
errors and server restarts according to a ``RetryPolicy``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from dpa.contract import messages, wire
from dpa.contract.buffers import BufferPool
from dpa.contract.errors import UserError
from dpa.contract.manifest import GraphNames
from dpa.contract.messages import API_PREFIX, Route, SessionField, TrainReply
from dpa.contract.streaming import read_body, write_chunks
from runtime_client.retry import RETRYABLE_STATUS, RetryPolicy

__all__ = ["EdgeClient", "EdgeError", "SessionInfo", "read_token_file"]

log = logging.getLogger(__name__)

#: A 224x224 conv1_1 batch is ~100 MB each way; allow slow links, but not forever.
_TIMEOUT = aiohttp.ClientTimeout(total=600, sock_connect=10)


class EdgeError(RuntimeError):
    """The server refused a request or could not be reached; the message says why."""

    def __init__(self, status: int, code: str, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(f"edge server: {message} (HTTP {status}, {code})" if status else f"edge server: {message}")
        self.status = status
        self.code = code
        self.detail = detail or {}  # the error's JSON fields (expected_step, retry_after_s, ...)
        self.retry_after: float | None = None

    @property
    def retryable(self) -> bool:
        return self.code in ("unreachable", "timeout") or self.status in RETRYABLE_STATUS


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    max_batch: int
    global_step: int
    step: int = 0  # the session's last applied step (0 for a new session)


BodyFactory = Callable[[], AsyncIterator[bytes | memoryview]]


def read_token_file(path: Path) -> str:
    """A device's token: a file holding the bare token, or a ``name token`` file with one entry."""
    if not path.is_file():
        raise UserError(f"token file {path} does not exist")
    lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    if len(lines) != 1 or len(lines[0].split()) > 2:
        raise UserError(f"{path} must hold exactly one token (or one 'name token' line); it has {len(lines)} lines")
    return lines[0].split()[-1]


def _ssl_context(ca: Path | None) -> ssl.SSLContext | None:
    if ca is None:
        return None
    if not ca.is_file():
        raise UserError(f"CA file {ca} does not exist")
    try:
        return ssl.create_default_context(cafile=str(ca))
    except ssl.SSLError as exc:
        raise UserError(f"CA file {ca} is not a PEM certificate: {exc}") from None


class EdgeClient:
    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        ca: Path | None = None,
        retry: RetryPolicy | None = None,
        on_retry: Callable[[EdgeError, float], None] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._ssl = _ssl_context(ca)
        self.retry = retry if retry is not None else RetryPolicy()
        self.on_retry = on_retry
        self.retries = 0  # requests sent again, over this client's life
        self.buffers = BufferPool(keep=2)  # one train request and its reply, reused step to step
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> EdgeClient:
        connector = aiohttp.TCPConnector(ssl=self._ssl) if self._ssl is not None else None
        self._http = aiohttp.ClientSession(timeout=_TIMEOUT, headers=self._headers, connector=connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()

    async def _once(
        self,
        method: str,
        path: str,
        body: bytearray | BodyFactory | None = None,
        reader: Callable[[aiohttp.ClientResponse], Awaitable[Any]] | None = None,
        **kwargs: Any,
    ) -> Any:
        """One attempt: (status, body, content type), or what ``reader`` makes of a 2xx response."""
        assert self._http is not None, "use EdgeClient as an async context manager"
        if callable(body):
            kwargs["data"] = body()  # produced afresh for every attempt (same bytes: see SplitTrainer)
        elif body is not None:
            kwargs["data"] = write_chunks(body)  # a fresh generator for every attempt
        try:
            async with self._http.request(method, self.url + API_PREFIX + path, **kwargs) as resp:
                if resp.status >= 400:
                    body = await resp.read()
                    try:
                        err = json.loads(body)
                        code, message = str(err.get("error", "error")), str(err.get("message", ""))
                    except Exception:
                        err, code, message = {}, "error", body[:200].decode(errors="replace")
                    error = EdgeError(resp.status, code, message, err if isinstance(err, dict) else {})
                    if "Retry-After" in resp.headers:
                        try:
                            error.retry_after = float(resp.headers["Retry-After"])
                        except ValueError:
                            pass
                    raise error
                if reader is not None:
                    return await reader(resp)
                received = await read_body(resp.content, resp.content_length, self.buffers)
                return resp.status, received, resp.content_type
        except aiohttp.ClientConnectorCertificateError as exc:
            raise EdgeError(
                0,
                "tls",
                f"{self.url}'s certificate is not trusted ({exc.certificate_error}): "
                "pass the CA that signed it with --ca",
            ) from None
        except aiohttp.ClientSSLError as exc:
            raise EdgeError(0, "tls", f"TLS with {self.url} failed: {exc}") from None
        except aiohttp.ClientError as exc:
            raise EdgeError(0, "unreachable", f"cannot reach {self.url}: {exc}") from None
        except asyncio.IncompleteReadError:
            raise EdgeError(0, "unreachable", f"{self.url} closed the connection mid-reply") from None
        except TimeoutError:
            raise EdgeError(0, "timeout", f"{self.url} did not answer in time") from None

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request, retried while the error is transient and the policy's time lasts."""
        deadline = time.monotonic() + self.retry.total_s
        waits = self.retry.waits()
        while True:
            try:
                return await self._once(method, path, **kwargs)
            except EdgeError as exc:
                if not exc.retryable:
                    raise
                wait = max(next(waits), min(exc.retry_after or 0.0, self.retry.max_s))
                if time.monotonic() + wait > deadline:
                    raise
                if self.on_retry is not None:
                    self.on_retry(exc, wait)
                log.warning("retrying", extra={"fields": {"code": exc.code, "status": exc.status, "wait_s": wait}})
                self.retries += 1
                await asyncio.sleep(wait)

    async def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        _, body, _ = await self._request(method, path, **kwargs)
        return json.loads(body) if body else {}

    async def health(self) -> dict[str, Any]:
        return await self._json("GET", Route.HEALTH)

    async def status(self) -> dict[str, Any]:
        return await self._json("GET", Route.STATUS)

    async def open_session(
        self, manifest_sha256: str, client: str = "dpa-client", labels: dict[str, object] | None = None,
        gallery_rows: tuple[int, ...] | None = None,
    ) -> SessionInfo:  # fmt: skip
        """``labels``: ``messages.labels_field(epsilon)``, how this session's labels are sent (None: unstated);
        ``gallery_rows``: the gallery row of each class's class sums (None: row c for class c)."""
        request: dict[str, object] = {SessionField.MANIFEST_SHA256: manifest_sha256, SessionField.CLIENT: client}
        if labels is not None:
            request[SessionField.LABELS] = labels
        if gallery_rows is not None:
            request[SessionField.GALLERY_ROWS] = list(gallery_rows)
        data = await self._json("POST", Route.SESSIONS, json=request)
        return SessionInfo(
            str(data[SessionField.SESSION_ID]),
            int(data[SessionField.MAX_BATCH]),
            int(data[SessionField.GLOBAL_STEP]),
            int(data[SessionField.STEP]),
        )

    async def describe_session(self, session_id: str) -> dict[str, Any]:
        return await self._json("GET", Route.SESSION.format(session_id=session_id))

    async def close_session(self, session_id: str) -> None:
        try:
            await self._request("DELETE", Route.SESSION.format(session_id=session_id))
        except EdgeError as exc:
            if exc.status not in (404, 410):  # a retried close whose first try got through
                raise

    async def _post_message(self, path: str, body: bytearray) -> wire.Message:
        headers = {"Content-Type": wire.CONTENT_TYPE, "Content-Length": str(len(body))}
        _, reply, ctype = await self._request("POST", path, body=body, headers=headers)
        return _decode_reply(reply, ctype)

    async def train(self, session_id: str, step: int, activation: np.ndarray, labels: np.ndarray) -> TrainReply:
        return await self.train_message(session_id, messages.encode_train_request(activation, labels, step))

    async def train_message(self, session_id: str, body: bytearray) -> TrainReply:
        """Send an already encoded train message (meta ``step``; see ``wire.allocate``); the reply.

        A retry sends the same bytes: the same release, so no extra privacy cost, and the
        server answers it from its stored reply if the first try was applied.
        """
        return messages.decode_train_reply(await self._post_message(Route.TRAIN.format(session_id=session_id), body))

    async def train_streamed(
        self,
        session_id: str,
        length: int,
        produce: BodyFactory,
        batch: int,
        on_start: Callable[[], None],
        on_example: Callable[[int, np.ndarray], None],
    ) -> TrainReply:
        """A train step whose request is produced while it uploads and whose reply is consumed
        example by example: neither is ever whole in the device's memory.

        ``produce()`` must yield the same ``length`` bytes on every attempt. ``on_start`` runs
        before a reply is read (a retried attempt starts over), then ``on_example(i, gradient)``
        for each example's d loss / d activation, in order. The reply's ``activation_gradient``
        is None.
        """

        async def reader(resp: aiohttp.ClientResponse) -> TrainReply:
            if resp.content_type != wire.CONTENT_TYPE or resp.content_length is None:
                raise EdgeError(0, "bad_reply", f"expected a sized {wire.CONTENT_TYPE} reply, got {resp.content_type}")
            on_start()
            msg = await wire.read_streamed(
                resp.content.readexactly,
                resp.content_length,
                {GraphNames.ACTIVATION_GRADIENT: batch},
                lambda _name, i, part: on_example(i, part),
            )
            return messages.decode_train_reply(msg)

        headers = {"Content-Type": wire.CONTENT_TYPE, "Content-Length": str(length)}
        return await self._request(
            "POST", Route.TRAIN.format(session_id=session_id), body=produce, reader=reader, headers=headers
        )

    async def stored_reply(self, session_id: str, step: int) -> TrainReply:
        """The server's reply to ``step``, the session's last applied one (after the device crashed)."""
        _, reply, ctype = await self._request("GET", Route.STORED_REPLY.format(session_id=session_id, step=step))
        return messages.decode_train_reply(_decode_reply(reply, ctype))

    async def templates(self) -> tuple[np.ndarray, np.ndarray, int]:
        """The server's class templates: (means (classes, *activation_shape), counts (classes,), global step)."""
        _, body, ctype = await self._request("GET", Route.TEMPLATES)
        msg = _decode_reply(body, ctype)
        try:
            return (
                msg.tensors[messages.TEMPLATES],
                msg.tensors[messages.COUNTS],
                int(msg.meta[messages.TEMPLATES_META_STEP]),
            )
        except (KeyError, TypeError, ValueError):
            raise EdgeError(
                0, "bad_reply", "the server's templates reply lacks templates, counts or global_step"
            ) from None

    async def tail(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Operators only (a federation's bridge): the tail's parameters by name, and its meta
        (``global_step``, ``examples_seen``; docs/protocol.md, ``GET /v1/tail``)."""
        _, body, ctype = await self._request("GET", Route.TAIL)
        msg = _decode_reply(body, ctype)
        try:
            return messages.decode_tail(msg), msg.meta
        except ValueError as exc:
            raise EdgeError(0, "bad_reply", f"the server's tail reply: {exc}") from None

    async def load_tail(self, parameters: dict[str, np.ndarray], global_step: int) -> dict[str, Any]:
        """Operators only: replace the tail with ``parameters``, averaged against ``global_step``
        (``PUT /v1/tail``; 409 tail_moved if devices trained it since). A retry loads the same state."""
        body = messages.encode_tail(parameters, {"global_step": int(global_step)})
        headers = {"Content-Type": wire.CONTENT_TYPE, "Content-Length": str(len(body))}
        _, reply, _ = await self._request("PUT", Route.TAIL, body=body, headers=headers)
        return json.loads(reply)

    async def class_sums(self, session_id: str, body: bytearray | bytes) -> dict[str, Any]:
        """Send the session's class-sum release (``messages.encode_class_sums``); a retry sends the same
        bytes, which the server answers as the first time (``{"retry": true}``)."""
        headers = {"Content-Type": wire.CONTENT_TYPE, "Content-Length": str(len(body))}
        _, reply, _ = await self._request(
            "POST", Route.CLASS_SUMS.format(session_id=session_id), body=body, headers=headers
        )
        return json.loads(reply)

    async def evaluate(self, session_id: str, activation: np.ndarray) -> np.ndarray:
        msg = await self._post_message(
            Route.EVAL.format(session_id=session_id), messages.encode_eval_request(activation)
        )
        return msg.tensors[GraphNames.LOGITS]


def _decode_reply(reply: bytearray, ctype: str) -> wire.Message:
    if ctype != wire.CONTENT_TYPE:
        raise EdgeError(0, "bad_reply", f"expected {wire.CONTENT_TYPE} from the server, got {ctype}")
    return wire.decode(reply)
