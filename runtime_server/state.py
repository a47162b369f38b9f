"""The server's state, under one typed ``web.AppKey``, and the limits derived from the manifest."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from aiohttp import web

from dpa.contract.buffers import BufferPool
from dpa.contract.errors import UserError
from dpa.contract.manifest import Manifest
from runtime_server import metrics as prom
from runtime_server.auth import TokenStore
from runtime_server.budget import ByteBudget, transfer_deadline
from runtime_server.class_sums import ClassSumStore
from runtime_server.config import ServerConfig
from runtime_server.errors import ApiError
from runtime_server.journal import Journal
from runtime_server.sessions import SessionTable
from runtime_server.tail_worker import TailWorker

__all__ = [
    "ServerState",
    "STATE",
    "OWNER",
    "max_body_bytes",
    "class_sums_body_bytes",
    "gallery_size",
    "tail_down",
    "storage_error",
]

log = logging.getLogger(__name__)

#: Room for the wire header, metadata and labels beyond the activation bytes.
_FRAMING_SLACK = 64 * 1024
OWNER = web.RequestKey("owner", str)  # the token's device name; absent without auth


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
    buffers: BufferPool  # request and reply bodies, reused (dpa.contract.buffers)
    bodies: ByteBudget  # bytes of request bodies being read or waiting for a slot (runtime_server.budget)
    # Class-sum releases (runtime_server.class_sums); None when this export's templates would not fit.
    class_sums: ClassSumStore | None = None
    metrics: prom.Metrics = field(default_factory=prom.Metrics)
    tail_alive: bool = True
    started: float = field(default_factory=time.time)

    def deadline(self, nbytes: int) -> float:
        """Seconds a body or reply of ``nbytes`` may take to cross (``ServerConfig.min_transfer_rate``)."""
        return transfer_deadline(
            nbytes, base_s=self.config.transfer_base_s, min_bytes_per_s=self.config.min_transfer_rate
        )

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the tail thread; a dead tail process becomes 503 for this and every later call."""
        if not self.tail_alive:
            raise tail_down()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args))
        except BrokenProcessPool:
            self.tail_alive = False
            log.error("tail worker died", extra={"fields": {"action": "restart the server"}})
            raise tail_down() from None
        except OSError as exc:  # disk full, state dir gone: the device may retry once it is fixed
            raise storage_error(exc) from None


def tail_down() -> ApiError:
    return ApiError(
        503,
        "tail_unavailable",
        "the tail is unavailable (its process died, or a step it applied could not be made durable); "
        "the server must be restarted",
    )


#: Seconds a device waits before retrying a step the server could not store (a full disk frees slowly).
STORAGE_RETRY_AFTER_S = 5


def storage_error(exc: OSError) -> ApiError:
    """The answer to a write that failed (disk full, state dir gone): nothing was applied; retry later."""
    log.error("storage error", extra={"fields": {"error": type(exc).__name__, "errno": exc.errno}})
    reason = exc.strerror or str(exc)
    return ApiError(
        503,
        "storage_error",
        f"the server could not write its state ({reason}); nothing was applied, retry later",
        headers={"Retry-After": str(STORAGE_RETRY_AFTER_S)},
    )


STATE = web.AppKey("state", ServerState)


def max_body_bytes(manifest: Manifest, max_batch: int) -> int:
    """Largest legal request: a full batch of float32 activations plus int64 labels and framing."""
    return max_batch * (4 * manifest.activation_numel + 8) + _FRAMING_SLACK


def gallery_size(config: ServerConfig, manifest: Manifest) -> int:
    """Rows of the class-sum gallery: ``--gallery-size``, else the export's classes (never fewer)."""
    size = manifest.num_classes if config.gallery_size is None else config.gallery_size
    if size < manifest.num_classes:
        raise UserError(f"gallery size {size} is smaller than the export's {manifest.num_classes} classes")
    return size


def class_sums_body_bytes(manifest: Manifest) -> int:
    """Largest legal class-sum release: float32 sums and a count for every class, plus framing (it does
    not depend on max_batch: a device with more classes than a batch holds must still send one)."""
    return manifest.num_classes * 4 * (manifest.activation_numel + 1) + _FRAMING_SLACK
