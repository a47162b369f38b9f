"""The session table: who may use a session, its step number, limits, and what survives a crash.

Exactly-once steps rest on three facts kept here:

- every session counts its applied steps (``step``); a train request names the step it is
  (``meta.step``), and only ``step + 1`` is applied;
- the reply to the last applied step is kept on disk (``replies/<id>.dpaw``), so a retry of
  that step after a lost response gets the same bytes back without a second update;
- the per-session step counts are stored *inside* the tail checkpoint (one atomic file with
  the weights), so after a crash the weights and the counts agree.

The table of open sessions (owner, client name) is a separate small file written at open
and close, before the client hears of the change.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpa.base.atomic import atomic_write_bytes
from dpa.contract.errors import UserError
from runtime_server.config import ServerConfig
from runtime_server.errors import ApiError

__all__ = ["Session", "SessionTable", "TokenBucket", "SESSIONS_FILE", "REPLIES_DIR"]

log = logging.getLogger(__name__)

SESSIONS_FILE = "sessions.json"
REPLIES_DIR = "replies"
_REMEMBER_EXPIRED = 4096  # closed-by-expiry ids remembered, so their owners get 410 instead of 404


@dataclass
class TokenBucket:
    """``rate`` requests per second sustained, ``burst`` at once (a classic token bucket)."""

    rate: float
    burst: int
    tokens: float = math.nan
    stamp: float = 0.0

    def __post_init__(self) -> None:
        if math.isnan(self.tokens):
            self.tokens = float(self.burst)

    def take(self, now: float) -> float:
        """0 if the request may go ahead (one token spent), else seconds until one is available."""
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass
class Session:
    id: str
    owner: str | None  # the token's device name; None when the server runs without auth
    client: str
    created: float  # wall clock, for people
    bucket: TokenBucket
    labels: dict[str, Any] = field(default_factory=lambda: {"mechanism": "unstated"})  # how labels are sent
    gallery_rows: list[int] | None = None  # the gallery row of each class's class sums (None: row c for class c)
    step: int = 0  # session step number of the last applied train step (0: none yet)
    examples: int = 0
    last_used: float = field(default_factory=time.monotonic)
    # One request of a session at a time: a retry waits for its original and then finds it applied.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def describe(self) -> dict[str, Any]:
        return {
            "session_id": self.id,
            "client": self.client,
            "labels": self.labels,
            "gallery_rows": self.gallery_rows,
            "step": self.step,
            "examples": self.examples,
            "created": self.created,
            "idle_s": round(time.monotonic() - self.last_used, 3),
        }


def _table_digest(sessions: object) -> str:
    """SHA-256 of the table's canonical JSON (sorted keys, no spaces): what ``sessions.json`` is checked against."""
    return hashlib.sha256(json.dumps(sessions, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class SessionTable:
    def __init__(self, config: ServerConfig, state_dir: Path) -> None:
        self.config = config
        self.state_dir = state_dir
        self.replies = state_dir / REPLIES_DIR
        # Stored replies written since the last checkpoint without an fsync (step_commit): the journal can
        # write them again until then, so the checkpoint, which ends the journal, makes them durable first.
        self.unsynced_replies: set[Path] = set()
        self.sessions: dict[str, Session] = {}
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._persist_lock = asyncio.Lock()

    def _bucket(self) -> TokenBucket:
        return TokenBucket(self.config.session_rate, self.config.session_burst, stamp=time.monotonic())

    # ------------------------------------------------------------------ restore and persist

    def restore(self, committed: dict[str, list[int]]) -> None:
        """Reopen the sessions of the last run; steps come from the tail checkpoint (``committed``)."""
        path = self.state_dir / SESSIONS_FILE
        if not path.is_file():
            return
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} is unreadable ({exc}); move it away to start without the old sessions") from None
        if not isinstance(saved, dict) or saved.get("sha256") != _table_digest(saved.get("sessions")):
            raise UserError(
                f"{path} is corrupt (its SHA-256 does not match its sessions); move it away to start without the "
                "old sessions (their devices then open new ones)"
            )
        for sid, info in saved.get("sessions", {}).items():
            step, examples = committed.get(sid, [0, 0])
            self.sessions[sid] = Session(
                id=sid,
                owner=info.get("owner"),
                client=str(info.get("client", "")),
                labels=dict(info.get("labels", {"mechanism": "unstated"})),
                gallery_rows=None if info.get("gallery_rows") is None else [int(r) for r in info["gallery_rows"]],
                created=float(info.get("created", time.time())),
                bucket=self._bucket(),
                step=int(step),
                examples=int(examples),
            )
        for stale in self.replies.glob("*.dpaw") if self.replies.is_dir() else ():
            if stale.stem not in self.sessions:
                stale.unlink(missing_ok=True)
        if self.sessions:
            log.info("sessions restored", extra={"fields": {"sessions": len(self.sessions)}})

    def _snapshot(self) -> bytes:
        sessions = {
            s.id: {"owner": s.owner, "client": s.client, "created": s.created, "labels": s.labels}
            | ({} if s.gallery_rows is None else {"gallery_rows": s.gallery_rows})
            for s in self.sessions.values()
        }
        return (json.dumps({"sessions": sessions, "sha256": _table_digest(sessions)}, indent=1) + "\n").encode()

    async def persist(self) -> None:
        """Write the table (atomically, off the event loop); later calls never write older tables."""
        async with self._persist_lock:
            data = self._snapshot()
            self.state_dir.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(atomic_write_bytes, self.state_dir / SESSIONS_FILE, data)

    def committed_steps(self) -> dict[str, list[int]]:
        """What the next tail checkpoint records: each open session's applied steps and examples."""
        return {s.id: [s.step, s.examples] for s in list(self.sessions.values())}

    def reply_path(self, session: Session) -> Path:
        return self.replies / f"{session.id}.dpaw"

    # ------------------------------------------------------------------ lifecycle

    def open(
        self, owner: str | None, client: str, labels: dict[str, Any] | None = None,
        gallery_rows: list[int] | None = None,
    ) -> Session:  # fmt: skip
        if len(self.sessions) >= self.config.max_sessions:
            raise ApiError(
                429,
                "too_many_sessions",
                f"the server has {len(self.sessions)} open sessions, its limit (max_sessions); "
                "close unused sessions or try again later",
                headers={"Retry-After": "30"},
            )
        mine = sum(1 for s in self.sessions.values() if s.owner == owner)
        if owner is not None and mine >= self.config.max_sessions_per_device:
            raise ApiError(
                429,
                "too_many_device_sessions",
                f"this device has {mine} open sessions, the limit per device (max_sessions_per_device); "
                "close one (DELETE /v1/sessions/{id}) or wait for it to expire",
                headers={"Retry-After": "30"},
            )
        session = Session(
            id=secrets.token_urlsafe(16), owner=owner, client=client, created=time.time(), bucket=self._bucket()
        )
        if labels is not None:
            session.labels = labels
        session.gallery_rows = gallery_rows
        self.sessions[session.id] = session
        return session

    def get(self, sid: str, owner: str | None) -> Session:
        session = self.sessions.get(sid)
        if session is None:
            if sid in self._expired:
                raise ApiError(
                    410,
                    "session_expired",
                    f"session {sid[:8]}... was closed after {self.config.session_idle_s:g} s without requests; "
                    "open a new one",
                )
            raise ApiError(404, "unknown_session", f"no open session {sid[:8]}...; open one with POST /v1/sessions")
        if session.owner != owner:
            raise ApiError(403, "not_session_owner", "this session was opened with another token")
        return session

    def admit(self, session: Session) -> None:
        """Count a request against the session's rate limit; refuse it (429) past the limit."""
        now = time.monotonic()
        wait = session.bucket.take(now)
        if wait > 0:
            raise ApiError(
                429,
                "rate_limited",
                f"more than {self.config.session_rate:g} requests/s (burst {self.config.session_burst}) "
                "on this session; slow down",
                extra={"retry_after_s": round(wait, 3)},
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        session.last_used = now

    def close(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        self.reply_path(session).unlink(missing_ok=True)

    def expire(self) -> list[Session]:
        """Close the sessions idle longer than the limit; the closed ones."""
        cutoff = time.monotonic() - self.config.session_idle_s
        gone = [s for s in self.sessions.values() if s.last_used < cutoff and not s.lock.locked()]
        for session in gone:
            self.close(session)
            self._expired[session.id] = None
            if len(self._expired) > _REMEMBER_EXPIRED:
                self._expired.popitem(last=False)
        return gone
