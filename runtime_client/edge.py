"""HTTP client for the edge server's API (``docs/protocol.md``), on aiohttp."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np

from dpa import wire
from dpa.manifest import GraphNames
from dpa.streaming import read_body

__all__ = ["EdgeClient", "EdgeError", "SessionInfo", "TrainReply"]

API_PREFIX = "/v1"
#: A 224x224 conv1_1 batch is ~100 MB each way; allow slow links, but not forever.
_TIMEOUT = aiohttp.ClientTimeout(total=600, sock_connect=10)


class EdgeError(RuntimeError):
    """The server refused a request or could not be reached; the message says why."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"edge server: {message} (HTTP {status}, {code})" if status else f"edge server: {message}")
        self.status = status
        self.code = code


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    max_batch: int
    global_step: int


@dataclass(frozen=True)
class TrainReply:
    loss: float
    logits: np.ndarray
    activation_gradient: np.ndarray
    global_step: int


class EdgeClient:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> EdgeClient:
        self._http = aiohttp.ClientSession(timeout=_TIMEOUT)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()

    async def _request(self, method: str, path: str, **kwargs: Any) -> tuple[int, bytearray, str]:
        assert self._http is not None, "use EdgeClient as an async context manager"
        try:
            async with self._http.request(method, self.url + API_PREFIX + path, **kwargs) as resp:
                if resp.status >= 400:
                    body = await resp.read()
                    try:
                        err = await resp.json(content_type=None)
                        code, message = str(err.get("error", "error")), str(err.get("message", ""))
                    except Exception:
                        code, message = "error", body[:200].decode(errors="replace")
                    raise EdgeError(resp.status, code, message)
                return resp.status, await read_body(resp.content, resp.content_length), resp.content_type
        except aiohttp.ClientError as exc:
            raise EdgeError(0, "unreachable", f"cannot reach {self.url}: {exc}") from None

    async def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        import json

        _, body, _ = await self._request(method, path, **kwargs)
        return json.loads(body) if body else {}

    async def health(self) -> dict[str, Any]:
        return await self._json("GET", "/health")

    async def status(self) -> dict[str, Any]:
        return await self._json("GET", "/status")

    async def open_session(self, manifest_sha256: str, client: str = "dpa-client") -> SessionInfo:
        data = await self._json("POST", "/sessions", json={"manifest_sha256": manifest_sha256, "client": client})
        return SessionInfo(str(data["session_id"]), int(data["max_batch"]), int(data["global_step"]))

    async def close_session(self, session_id: str) -> None:
        await self._request("DELETE", f"/sessions/{session_id}")

    async def _post_message(self, path: str, body: bytearray) -> wire.Message:
        _, reply, ctype = await self._request("POST", path, data=body, headers={"Content-Type": wire.CONTENT_TYPE})
        if ctype != wire.CONTENT_TYPE:
            raise EdgeError(0, "bad_reply", f"expected {wire.CONTENT_TYPE} from the server, got {ctype}")
        return wire.decode(reply)

    async def train(self, session_id: str, activation: np.ndarray, labels: np.ndarray) -> TrainReply:
        body = wire.encode({GraphNames.ACTIVATION: activation, GraphNames.LABELS: labels.astype(np.int64, copy=False)})
        return await self.train_message(session_id, body)

    async def train_message(self, session_id: str, body: bytearray) -> TrainReply:
        """Send an already encoded train message (see ``wire.allocate``); the reply's tensors."""
        msg = await self._post_message(f"/sessions/{session_id}/train", body)
        t = msg.tensors
        return TrainReply(
            loss=float(t["loss"]),
            logits=t[GraphNames.LOGITS],
            activation_gradient=t[GraphNames.ACTIVATION_GRADIENT],
            global_step=int(msg.meta.get("global_step", -1)),
        )

    async def evaluate(self, session_id: str, activation: np.ndarray) -> np.ndarray:
        msg = await self._post_message(f"/sessions/{session_id}/eval", wire.encode({GraphNames.ACTIVATION: activation}))
        return msg.tensors[GraphNames.LOGITS]
