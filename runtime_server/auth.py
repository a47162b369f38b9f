"""Client tokens: the file that lists them, and the constant-time check of a bearer token.

A token file holds one ``name token`` pair per line (``#`` starts a comment). The name
identifies the device in logs, metrics and session ownership; the token itself never
leaves this module (logs and errors only ever show the name). The file is created with
mode 0600, atomically, and read once when the server starts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from dpa.base.atomic import atomic_write_bytes
from dpa.contract.errors import UserError

__all__ = ["TokenStore", "add_token", "new_token"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TOKEN = re.compile(r"^[A-Za-z0-9._~+/=-]{16,256}$")  # RFC 6750 b64token, at least 16 characters


def new_token() -> str:
    """256 random bits, URL-safe: what ``dpa token add`` hands out."""
    return secrets.token_urlsafe(32)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _parse(path: Path) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not _NAME.match(parts[0]) or not _TOKEN.match(parts[1]):
            raise UserError(
                f"{path}:{number}: expected 'name token' (name: letters, digits, . _ -; token: 16+ characters)"
            )
        pairs.append((parts[0], parts[1]))
    return pairs


@dataclass(frozen=True)
class TokenStore:
    """SHA-256 digests of the tokens, by device name."""

    digests: tuple[tuple[bytes, str], ...]

    @classmethod
    def load(cls, path: Path) -> TokenStore:
        if not path.is_file():
            raise UserError(f"token file {path} does not exist: create one with `dpa token add --tokens {path}`")
        pairs = _parse(path)
        if not pairs:
            raise UserError(f"token file {path} lists no tokens: add one with `dpa token add --tokens {path}`")
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise UserError(f"token file {path} lists a device name twice")
        return cls(tuple((_digest(token), name) for name, token in pairs))

    def authenticate(self, authorization: str | None) -> str | None:
        """The device name for an ``Authorization: Bearer <token>`` header, or None.

        Every stored digest is compared, with ``hmac.compare_digest``, whatever matches: the
        time taken does not depend on the token or on which entry (if any) it equals.
        """
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        presented = _digest(token.strip())
        found: str | None = None
        for digest, name in self.digests:
            if hmac.compare_digest(presented, digest):
                found = name
        return found


def add_token(path: Path, name: str) -> str:
    """Append a fresh token for ``name`` to the token file (created 0600 if missing); the token."""
    if not _NAME.match(name):
        raise UserError(f"device name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    existing = _parse(path) if path.is_file() else []
    if any(n == name for n, _ in existing):
        raise UserError(f"{path} already has a token for {name!r}")
    token = new_token()
    text = "" if not path.is_file() else path.read_text()
    if not text:
        text = "# dpa edge-server tokens: one 'name token' per line. Keep this file private (mode 0600).\n"
    elif not text.endswith("\n"):
        text += "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (text + f"{name} {token}\n").encode())
    os.chmod(path, 0o600)
    return token
