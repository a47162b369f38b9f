"""Token files, the bearer check, and the server settings that refuse an unsafe exposure."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from runtime_client.edge import read_token_file
from runtime_server.auth import TokenStore, add_token
from runtime_server.config import ServerConfig, is_loopback


def test_add_token_creates_a_private_file_and_authenticates(tmp_path):
    path = tmp_path / "state" / "tokens.txt"
    a = add_token(path, "phone-a")
    b = add_token(path, "phone-b")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(a) >= 43 and a != b  # 256 random bits, URL-safe base64
    store = TokenStore.load(path)
    assert store.authenticate(f"Bearer {a}") == "phone-a"
    assert store.authenticate(f"bearer {b}") == "phone-b"  # the scheme is case-insensitive (RFC 6750)
    for bad in (None, "", "Bearer", f"Basic {a}", f"Bearer {a}x", f"Bearer {a[:-1]}", "Bearer " + "A" * 43):
        assert store.authenticate(bad) is None, bad
    assert a not in repr(store)  # digests only


def test_token_file_errors_are_clear(tmp_path):
    path = tmp_path / "tokens.txt"
    with pytest.raises(ValueError, match="does not exist: create one with `dpa token add"):
        TokenStore.load(path)
    path.write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="lists no tokens"):
        TokenStore.load(path)
    path.write_text("phone short\n")
    with pytest.raises(ValueError, match="tokens.txt:1: expected 'name token'"):
        TokenStore.load(path)
    token = add_token(tmp_path / "ok.txt", "phone")
    with pytest.raises(ValueError, match="already has a token for 'phone'"):
        add_token(tmp_path / "ok.txt", "phone")
    with pytest.raises(ValueError, match="device name 'bad name'"):
        add_token(tmp_path / "ok.txt", "bad name")
    (tmp_path / "dup.txt").write_text(f"phone {token}\nphone {token}\n")
    with pytest.raises(ValueError, match="lists a device name twice"):
        TokenStore.load(tmp_path / "dup.txt")


def test_device_reads_a_bare_token_or_a_one_entry_file(tmp_path):
    token = add_token(tmp_path / "server.txt", "phone")
    (tmp_path / "bare").write_text(token + "\n")
    assert read_token_file(tmp_path / "bare") == token
    assert read_token_file(tmp_path / "server.txt") == token  # comment line + one entry
    add_token(tmp_path / "server.txt", "other")
    with pytest.raises(ValueError, match="exactly one token"):
        read_token_file(tmp_path / "server.txt")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.53", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
     ("192.168.1.5", False), ("::", False), ("edge.example.com", False)],
)  # fmt: skip
def test_loopback_detection(host, loopback):
    assert is_loopback(host) is loopback


def test_exposed_bind_needs_auth_and_tls_or_insecure(tmp_path):
    tokens, cert, key = tmp_path / "t", tmp_path / "c.pem", tmp_path / "k.pem"
    with pytest.raises(ValueError, match=r"without auth or TLS exposes the training to anyone.*--insecure"):
        ServerConfig(host="0.0.0.0")
    with pytest.raises(ValueError, match="without TLS exposes the training tokens and activations in clear"):
        ServerConfig(host="0.0.0.0", tokens=tokens)
    with pytest.raises(ValueError, match="without auth exposes"):
        ServerConfig(host="0.0.0.0", tls_cert=cert, tls_key=key)
    ServerConfig(host="0.0.0.0", tokens=tokens, tls_cert=cert, tls_key=key)
    ServerConfig(host="0.0.0.0", insecure=True)
    ServerConfig(host="127.0.0.1")  # loopback without either: tests, demo


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tls_cert": Path("c.pem")}, "TLS needs both --tls-cert and --tls-key"),
        ({"max_sessions": 0}, "max sessions must be >= 1"),
        ({"session_idle_s": 0.0}, "session idle timeout must be a positive number"),
        ({"session_idle_s": float("nan")}, "session idle timeout must be a positive number"),
        ({"session_rate": 0.0}, "session rate must be > 0"),
        ({"session_burst": 0}, "session rate must be > 0 requests/s with a burst >= 1"),
        ({"checkpoint_every": 0}, "checkpoint interval must be >= 1"),
    ],
)
def test_limits_are_validated(fields, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig(**fields)
