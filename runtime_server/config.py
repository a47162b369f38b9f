"""Edge-server configuration: one frozen dataclass, validated where it is built."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from pathlib import Path

from dpa.contract.devices import DeviceProfile
from dpa.contract.errors import UserError
from runtime_server.cors import check_origin

__all__ = ["ServerConfig", "is_loopback"]


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, "localhost")."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname or "0.0.0.0"-like wildcard: assume it is reachable from outside


@dataclass(frozen=True)
class ServerConfig:
    artifacts: Path = Path("artifacts")  # export folder; only manifest.json and tail/ are read
    host: str = "127.0.0.1"  # loopback by default: exposing the server is a deliberate choice
    port: int = 8080
    device: DeviceProfile = DeviceProfile.AUTO
    max_batch: int = 32  # examples per request; with the manifest it sets the body-size limit
    # Train steps between full tail checkpoints (1.2 GB at paper size, seconds to write). Steps in between
    # are made durable by the journal: each step's request is written before it is answered.
    checkpoint_every: int = 20
    # False: no journal, so a crash rolls the tail back to its last checkpoint, up to
    # checkpoint_every - 1 steps (the devices notice and go on; see docs/protocol.md section 6).
    journal: bool = True
    # Also keep class templates, the mean release per (received) label (runtime_server.templates),
    # and serve them at GET /v1/templates: a learner for releases too noisy for the tail to learn from.
    # None: keep them when they fit (runtime_server.templates.MAX_TEMPLATE_BYTES), as `dpa serve` does.
    templates: bool | None = False
    # Requests whose bodies are read and queued for the tail at once: one running, one ready. More
    # only piles up 100 MB bodies in memory and starves the event loop.
    max_inflight_steps: int = 2
    state_dir: Path | None = None  # checkpoint, session table, replies; None: <artifacts>/server-state
    # Auth: a token file ("name token" per line, see runtime_server.auth). None: no auth, which is
    # only allowed on loopback unless `insecure` (tests and `dpa demo` run that way).
    tokens: Path | None = None
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, the server speaks HTTPS
    tls_key: Path | None = None
    insecure: bool = False  # allow a non-loopback bind without auth or without TLS
    max_sessions: int = 64  # open sessions at once (429 too_many_sessions beyond)
    # Open sessions per device token: one device (or a leaked token) cannot take every slot.
    max_sessions_per_device: int = 4
    session_idle_s: float = 3600.0  # a session unused this long is closed (410 session_expired)
    session_rate: float = 20.0  # train/eval requests per second per session, sustained (429 rate_limited)
    session_burst: int = 40  # ... and in a burst
    # Free space the state dir keeps after a step's records (journal entry, stored reply) are reserved:
    # below it a step is refused before it is applied (503 storage_error), instead of failing midway.
    # It leaves room for the session table and, at paper size, for the writes a checkpoint needs first.
    min_free_bytes: int = 16 * 2**20
    # Slow and silent clients (runtime_server.budget): a body is read before its request takes a
    # step slot, within transfer_base_s + its bytes at min_transfer_rate (else 408 body_timeout),
    # and a reply must be taken within the same; 256 KiB/s is a slow phone link (2 Mbit/s).
    transfer_base_s: float = 30.0
    min_transfer_rate: float = 256 * 2**10  # bytes per second
    # Bytes of request bodies held in memory at once; None: 4 full-batch bodies (max_body_bytes).
    max_inflight_body_bytes: int | None = None
    # Page origins a browser device may call from (runtime_server.cors); none: no CORS header at all.
    allow_origins: tuple[str, ...] = ()
    # Rows of the class-sum gallery (GET /v1/templates): None, one per class of the export. More, when this
    # edge server enrols several devices' identities apart: each session names its classes' rows
    # (``gallery_rows``), as the devices of a federation do (``dpa.federation``).
    gallery_size: int | None = None
    # Token names (of the token file) that may read and replace the tail (GET/PUT /v1/tail): the federation's
    # bridge on this machine (``dpa.federation.deployment``). Devices' tokens never may.
    operators: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.device, str) and not isinstance(self.device, DeviceProfile):
            object.__setattr__(self, "device", DeviceProfile.parse(self.device))
        if not 0 <= self.port <= 65535:
            raise UserError(f"port must be in 0..65535, got {self.port}")
        if self.max_batch < 1:
            raise UserError(f"max batch must be >= 1, got {self.max_batch}")
        if self.max_inflight_steps < 1:
            raise UserError(f"max in-flight steps must be >= 1, got {self.max_inflight_steps}")
        if self.checkpoint_every < 1:
            raise UserError(f"checkpoint interval must be >= 1 step, got {self.checkpoint_every}")
        if self.max_sessions < 1:
            raise UserError(f"max sessions must be >= 1, got {self.max_sessions}")
        if self.max_sessions_per_device < 1:
            raise UserError(f"max sessions per device must be >= 1, got {self.max_sessions_per_device}")
        if not (math.isfinite(self.session_idle_s) and self.session_idle_s > 0):
            raise UserError(f"session idle timeout must be a positive number of seconds, got {self.session_idle_s}")
        if not (math.isfinite(self.session_rate) and self.session_rate > 0) or self.session_burst < 1:
            raise UserError(
                f"session rate must be > 0 requests/s with a burst >= 1, got {self.session_rate}/{self.session_burst}"
            )
        if not (math.isfinite(self.transfer_base_s) and self.transfer_base_s > 0):
            raise UserError(f"transfer base time must be a positive number of seconds, got {self.transfer_base_s}")
        if not (math.isfinite(self.min_transfer_rate) and self.min_transfer_rate > 0):
            raise UserError(f"minimum transfer rate must be > 0 bytes/s, got {self.min_transfer_rate}")
        if self.max_inflight_body_bytes is not None and self.max_inflight_body_bytes < 1:
            raise UserError(f"in-flight body bytes must be >= 1, got {self.max_inflight_body_bytes}")
        object.__setattr__(self, "allow_origins", tuple(check_origin(o) for o in self.allow_origins))
        if self.min_free_bytes < 0:
            raise UserError(f"minimum free space must be >= 0 bytes, got {self.min_free_bytes}")
        if self.gallery_size is not None and self.gallery_size < 1:
            raise UserError(f"gallery size must be >= 1 row, got {self.gallery_size}")
        object.__setattr__(self, "operators", tuple(self.operators))
        if self.operators and self.tokens is None:
            raise UserError("operators are token names: give the server a token file (--tokens) too")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UserError("TLS needs both --tls-cert and --tls-key")
        if not is_loopback(self.host) and not self.insecure:
            missing = [what for what, off in (("auth", self.tokens is None), ("TLS", self.tls_cert is None)) if off]
            if missing:
                raise UserError(
                    f"binding to {self.host} (not loopback) without {' or '.join(missing)} exposes the training "
                    f"{'to anyone on the network' if 'auth' in missing else 'tokens and activations in clear'}; "
                    "configure it, or pass --insecure if this network is trusted"
                )

    @property
    def resolved_state_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.artifacts / "server-state"

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert is not None else "http"
