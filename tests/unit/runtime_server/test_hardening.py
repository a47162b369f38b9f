"""A running server's hardening: auth, ownership, limits, exactly-once replies, restart, metrics, logs, TLS."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dpa.contract import wire
from dpa.contract.manifest import load_manifest, manifest_sha256
from runtime_client.edge import EdgeClient, EdgeError
from runtime_client.retry import RetryPolicy
from runtime_server.auth import add_token
from runtime_server.logs import JsonFormatter, safe_fields

NO_RETRY = RetryPolicy(total_s=0)


def _tensors(shape, batch=2, seed=0):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *shape), dtype=np.float32), rng.integers(0, 6, batch)


@pytest.fixture
def tokens(tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "tokens.txt"
    return path, add_token(path, "phone-a"), add_token(path, "phone-b")


async def _error(coro) -> EdgeError:  # type: ignore[no-untyped-def]
    with pytest.raises(EdgeError) as info:
        await coro
    return info.value


def test_tokens_are_required_and_sessions_belong_to_theirs(small_export, start_server, tokens):
    path, a, b = tokens
    server = start_server(small_export, tokens=path)
    digest = manifest_sha256(small_export)

    async def run() -> None:
        async with EdgeClient(server.url, retry=NO_RETRY) as anonymous:
            assert (await anonymous.health())["status"] == "ok"  # public, for load balancers
            for call in (anonymous.status(), anonymous.open_session(digest)):
                err = await _error(call)
                assert (err.status, err.code) == (401, "unauthorized") and "Bearer" in str(err)
        async with EdgeClient(server.url, token="x" * 43, retry=NO_RETRY) as forged:
            assert (await _error(forged.status())).status == 401
        async with EdgeClient(server.url, token=a) as dev_a, EdgeClient(server.url, token=b, retry=NO_RETRY) as dev_b:
            session = await dev_a.open_session(digest)
            err = await _error(dev_b.describe_session(session.session_id))
            assert (err.status, err.code) == (403, "not_session_owner")
            act, labels = _tensors(load_manifest(small_export).activation_shape)
            err = await _error(dev_b.train(session.session_id, 1, act, labels))
            assert err.status == 403
            assert (await dev_a.train(session.session_id, 1, act, labels)).step == 1

    asyncio.run(run())
    assert server.state.tail.global_step == 1


def test_each_limit_has_its_own_4xx_and_others_keep_working(small_export, start_server):
    server = start_server(small_export, max_sessions=2, session_rate=1.0, session_burst=2, session_idle_s=0.4)
    digest = manifest_sha256(small_export)
    shape = load_manifest(small_export).activation_shape

    async def run() -> None:
        async with EdgeClient(server.url, retry=NO_RETRY) as edge:
            first = await edge.open_session(digest)
            second = await edge.open_session(digest)
            err = await _error(edge.open_session(digest))
            assert (err.status, err.code, err.retry_after) == (429, "too_many_sessions", 30.0)
            act, labels = _tensors(shape)
            await edge.train(first.session_id, 1, act, labels)
            await edge.train(first.session_id, 2, act, labels)  # burst of 2 spent
            err = await _error(edge.train(first.session_id, 3, act, labels))
            assert (err.status, err.code) == (429, "rate_limited") and 0 < err.detail["retry_after_s"] <= 1.0
            assert err.retry_after == 1.0
            assert (await edge.train(second.session_id, 1, act, labels)).step == 1  # others unaffected
            await asyncio.sleep(1.0)  # idle past 0.4 s: both expire
            err = await _error(edge.describe_session(first.session_id))
            assert (err.status, err.code) == (410, "session_expired")
            err = await _error(edge.describe_session("never-opened"))
            assert (err.status, err.code) == (404, "unknown_session")
            await edge.open_session(digest)  # room again

    asyncio.run(run())
    assert server.state.tail.global_step == 3
    saved = json.loads((server.state.config.resolved_state_dir / "sessions.json").read_text())
    assert len(saved["sessions"]) == 1  # expiry is persisted too


def test_retried_step_gets_the_same_reply_without_a_second_update(small_export, start_server):
    server = start_server(small_export)
    digest = manifest_sha256(small_export)
    shape = load_manifest(small_export).activation_shape

    async def run() -> tuple[bytes, bytes, bytes]:
        async with EdgeClient(server.url, retry=NO_RETRY) as edge:
            sid = (await edge.open_session(digest)).session_id
            act, labels = _tensors(shape)
            body = wire.encode({"activation": act, "labels": labels}, {"step": 1})
            _, first, _ = await edge._request("POST", f"/sessions/{sid}/train", data=body, headers=_CT)
            weights = server.state.tail.parameters()
            _, again, _ = await edge._request("POST", f"/sessions/{sid}/train", data=body, headers=_CT)
            for name, value in weights.items():
                np.testing.assert_array_equal(server.state.tail.parameters()[name], value)
            _, stored, _ = await edge._request("GET", f"/sessions/{sid}/steps/1")
            err = await _error(edge.stored_reply(sid, 2))
            assert (err.status, err.code) == (404, "no_stored_reply")
            err = await _error(edge.train(sid, 3, act, labels))
            assert (err.status, err.code, err.detail["expected_step"]) == (409, "step_out_of_order", 2)
            return bytes(first), bytes(again), bytes(stored)

    first, again, stored = asyncio.run(run())
    assert first == again == stored
    assert wire.decode(first).meta == {"global_step": 1, "step": 1}
    assert server.state.tail.global_step == 1 and server.state.metrics.replayed_steps == 1


_CT = {"Content-Type": wire.CONTENT_TYPE}


def test_restart_restores_sessions_steps_and_the_last_reply(small_export, start_server, tmp_path, tokens):
    path, a, _ = tokens
    state = tmp_path / "state"
    shape = load_manifest(small_export).activation_shape
    digest = manifest_sha256(small_export)
    first = start_server(small_export, state_dir=state, tokens=path)
    act, labels = _tensors(shape)

    async def before() -> tuple[str, np.ndarray]:
        async with EdgeClient(first.url, token=a) as edge:
            sid = (await edge.open_session(digest)).session_id
            await edge.train(sid, 1, act, labels)
            reply = await edge.train(sid, 2, act, labels)
            return sid, reply.activation_gradient.copy()

    sid, grad = asyncio.run(before())
    first.stop()
    second = start_server(small_export, state_dir=state, tokens=path)

    async def after() -> None:
        async with EdgeClient(second.url, token=a) as edge:
            info = await edge.describe_session(sid)
            assert (info["step"], info["examples"]) == (2, 4)
            replay = await edge.train(sid, 2, act, labels)  # the lost-answer retry, after the restart
            np.testing.assert_array_equal(replay.activation_gradient, grad)
            assert (await edge.train(sid, 3, act, labels)).global_step == 3

    asyncio.run(after())
    assert second.state.metrics.replayed_steps == 1


def test_metrics_in_prometheus_format(small_export, start_server):
    server = start_server(small_export, max_batch=4, checkpoint_every=2)
    digest = manifest_sha256(small_export)
    shape = load_manifest(small_export).activation_shape

    async def run() -> str:
        async with EdgeClient(server.url, retry=NO_RETRY) as edge:
            sid = (await edge.open_session(digest)).session_id
            act, labels = _tensors(shape, batch=3)
            for step in (1, 2):
                await edge.train(sid, step, act, labels)
            await edge.train(sid, 2, act, labels)  # replay
            await _error(edge.train(sid, 9, act, labels))
            await _error(edge.train(sid, 3, *_tensors(shape, batch=5)))
            await edge.evaluate(sid, act)
        async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as resp:
            assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            return await resp.text()

    text = asyncio.run(run())
    families = {f.name: f for f in text_string_to_metric_families(text)}  # the reference parser
    value = {f: families[f].samples[0].value for f in ("dpa_steps", "dpa_examples", "dpa_active_sessions")}
    assert value == {"dpa_steps": 2, "dpa_examples": 6, "dpa_active_sessions": 1}
    assert families["dpa_replayed_steps"].samples[0].value == 1
    assert families["dpa_eval_requests"].samples[0].value == 1
    rejected = {s.labels["reason"]: s.value for s in families["dpa_rejected_requests"].samples}
    assert rejected == {"step_out_of_order": 1, "body_too_large": 1}
    hist = {(s.name, s.labels.get("le")): s.value for s in families["dpa_step_seconds"].samples}
    assert hist[("dpa_step_seconds_count", None)] == 2 and hist[("dpa_step_seconds_bucket", "+Inf")] == 2
    assert families["dpa_checkpoints"].samples[0].value == 1  # at step 2 (checkpoint_every = 2)
    assert families["dpa_global_step"].samples[0].value == 2 and families["dpa_tail_up"].samples[0].value == 1
    assert families["dpa_reply_bytes_unsent"].samples[0].value == 0  # every reply read: nothing held
    assert families["dpa_replies_abandoned"].samples[0].value == 0


def test_logs_are_json_and_never_carry_tokens_tensors_or_labels(small_export, start_server, tokens):
    path, a, _ = tokens
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Capture()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    try:
        server = start_server(small_export, tokens=path, max_batch=4)
        shape = load_manifest(small_export).activation_shape
        labels = np.array([5, 4, 3, 2], np.int64)

        async def run() -> None:
            async with EdgeClient(server.url, token=a, retry=NO_RETRY) as edge:
                sid = (await edge.open_session(manifest_sha256(small_export))).session_id
                act = np.full((4, *shape), 0.123456, np.float32)
                await edge.train(sid, 1, act, labels)
                await edge.train(sid, 1, act, labels)  # a retry: answered from the stored reply
                await _error(edge.train(sid, 2, act, labels + 100))
                await edge.close_session(sid)
            async with EdgeClient(server.url, token="wrong-" + a, retry=NO_RETRY) as bad:
                await _error(bad.status())

        asyncio.run(run())
        server.stop()
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    entries = [json.loads(line) for line in lines]
    events = {e["event"] for e in entries}
    assert {"server started", "session opened", "request rejected", "session closed", "server stopped"} <= events
    text = "\n".join(lines)
    assert a not in text and "0.123456" not in text and "[5, 4, 3, 2]" not in text
    assert any(e.get("device") == "phone-a" for e in entries)  # the token's name, not the token


def test_log_fields_that_could_carry_data_are_redacted():
    fields = safe_fields(
        {"n": 3, "ok": True, "name": "phone", "array": np.zeros(3), "labels": [1, 2], "blob": "x" * 500}
    )
    assert fields == {"n": 3, "ok": True, "name": "phone", "array": "<redacted>", "labels": "<redacted>",
                      "blob": "<redacted>"}  # fmt: skip
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "got %s", (np.arange(4),), None)
    assert json.loads(JsonFormatter().format(record))["event"] == "got %s"  # the array is not rendered


def test_tls_with_the_ca_and_a_clear_error_without(small_export, start_server, tmp_path):
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = start_server(small_export, tls_cert=tmp_path / "server.pem", tls_key=tmp_path / "server.pem")
    assert server.url.startswith("https://")

    async def run() -> None:
        async with EdgeClient(server.url, ca=tmp_path / "ca.pem") as edge:
            assert (await edge.status())["global_step"] == 0
        async with EdgeClient(server.url, retry=RetryPolicy(total_s=5)) as untrusting:
            err = await _error(untrusting.health())
            assert err.code == "tls" and "pass the CA that signed it with --ca" in str(err)
        async with EdgeClient(server.url.replace("https", "http"), retry=NO_RETRY) as plain:
            await _error(plain.health())

    asyncio.run(run())


def test_tls_setup_errors_are_clear(small_export, tmp_path):
    from runtime_server.config import ServerConfig
    from runtime_server.tls import server_ssl_context

    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ValueError, match="TLS certificate file .*missing.pem does not exist"):
        server_ssl_context(ServerConfig(tls_cert=tmp_path / "missing.pem", tls_key=tmp_path / "junk.pem"))
    with pytest.raises(ValueError, match="both must be PEM, and the key must match"):
        server_ssl_context(ServerConfig(tls_cert=tmp_path / "junk.pem", tls_key=tmp_path / "junk.pem"))
    with pytest.raises(ValueError, match="CA file .*nope.pem does not exist"):
        EdgeClient("https://x", ca=tmp_path / "nope.pem")


def test_client_retries_until_the_server_comes_up(small_export, start_server, tmp_path):
    from dpa.runs.loopback import free_port

    port = free_port()
    retries: list[float] = []
    started: list[object] = []

    def later() -> None:
        time.sleep(1.0)
        started.append(start_server(small_export, port=port))

    async def run() -> dict:
        async with EdgeClient(
            f"http://127.0.0.1:{port}", retry=RetryPolicy(total_s=60), on_retry=lambda e, w: retries.append(w)
        ) as edge:
            return await edge.status()

    thread = threading.Thread(target=later)
    thread.start()
    status = asyncio.run(run())
    thread.join()
    assert status["global_step"] == 0 and len(retries) >= 2

    async def give_up() -> EdgeError:
        async with EdgeClient(f"http://127.0.0.1:{free_port()}", retry=RetryPolicy(total_s=0.5)) as edge:
            return await _error(edge.status())

    t0 = time.monotonic()
    err = asyncio.run(give_up())
    assert err.code == "unreachable" and time.monotonic() - t0 < 5


def test_token_file_reload_revokes_and_adds_without_a_restart(small_export, start_server, tokens):
    from runtime_server.app import reload_tokens

    path, a, b = tokens
    server = start_server(small_export, tokens=path)
    path.write_text(f"phone-b {b}\nphone-c {'c' * 43}\n")  # phone-a revoked, phone-c added

    async def status(token: str) -> int:
        async with EdgeClient(server.url, token=token, retry=NO_RETRY) as edge:
            try:
                await edge.status()
                return 200
            except EdgeError as exc:
                return exc.status

    assert asyncio.run(status(a)) == 200
    assert reload_tokens(server.app)
    assert [asyncio.run(status(t)) for t in (a, b, "c" * 43)] == [401, 200, 200]
    path.write_text("garbage\n")
    assert not reload_tokens(server.app)  # a broken file keeps the tokens in force
    assert asyncio.run(status(b)) == 200


def test_one_device_cannot_take_every_session(small_export, start_server, tokens):
    path, a, b = tokens
    server = start_server(small_export, tokens=path, max_sessions=8, max_sessions_per_device=2)
    digest = manifest_sha256(small_export)

    async def run() -> None:
        async with EdgeClient(server.url, token=a, retry=NO_RETRY) as dev_a:
            first = await dev_a.open_session(digest)
            await dev_a.open_session(digest)
            err = await _error(dev_a.open_session(digest))
            assert (err.status, err.code) == (429, "too_many_device_sessions")
            async with EdgeClient(server.url, token=b, retry=NO_RETRY) as dev_b:
                await dev_b.open_session(digest)  # another device still gets in
            await dev_a.close_session(first.session_id)
            await dev_a.open_session(digest)  # room again after closing one

    asyncio.run(run())
    assert len(server.state.sessions.sessions) == 3


def test_a_step_refused_for_space_is_not_applied_and_its_retry_succeeds(small_export, start_server):
    """Below the free-space margin a step is refused before the tail is touched (503 storage_error with
    Retry-After), leaving no temp file; the device's retry of the same bytes succeeds once there is room."""
    server = start_server(small_export, min_free_bytes=2**60)  # more than any disk has: every step refused
    digest = manifest_sha256(small_export)
    act, labels = _tensors(load_manifest(small_export).activation_shape)
    state_dir = server.state.config.resolved_state_dir

    async def run() -> None:
        async with EdgeClient(server.url) as edge:
            sid = (await edge.open_session(digest)).session_id
        body = bytes(wire.encode({"activation": act, "labels": labels}, {"step": 1}))
        async with aiohttp.ClientSession() as http:
            url = f"{server.url}/v1/sessions/{sid}/train"
            headers = {"Content-Type": wire.CONTENT_TYPE}
            async with http.post(url, data=body, headers=headers) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "5"
                assert (await resp.json())["error"] == "storage_error"
            assert server.state.tail.global_step == 0 and server.state.sessions.sessions[sid].step == 0
            assert list(state_dir.rglob("*.tmp")) == [] and list(state_dir.rglob("*.dpaw")) == []
            server.state.config = dataclasses.replace(server.state.config, min_free_bytes=0)  # space is back
            async with http.post(url, data=body, headers=headers) as resp:
                assert resp.status == 200
                assert wire.decode(bytearray(await resp.read())).meta == {"global_step": 1, "step": 1}
            assert server.state.tail.global_step == 1

    asyncio.run(run())


def test_reply_is_withheld_until_the_journal_commit_and_a_failed_commit_stops_the_server(
    small_export, start_server, monkeypatch
):
    """The reply streams while the step is committed, but its last bytes wait for the journal entry. A
    journal write that fails after the tail was updated (space was reserved, so this is an I/O error)
    cuts the reply, and the server stops taking steps until a restart rolls the tail back."""
    from runtime_server.records import Reservation

    server = start_server(small_export)
    digest = manifest_sha256(small_export)
    act, labels = _tensors(load_manifest(small_export).activation_shape)
    failed = threading.Event()
    real_commit = Reservation.commit

    def failing_commit(self, data, **kw):  # type: ignore[no-untyped-def]
        if self.path.parent.name != "journal":
            return real_commit(self, data, **kw)
        time.sleep(0.5)  # time for the reply to go out, all but its held-back bytes
        failed.set()
        raise OSError(5, "Input/output error")

    async def run() -> None:
        async with EdgeClient(server.url) as edge:
            sid = (await edge.open_session(digest)).session_id
        body = bytes(wire.encode({"activation": act, "labels": labels}, {"step": 1}))
        received = bytearray()
        monkeypatch.setattr(Reservation, "commit", failing_commit)
        async with aiohttp.ClientSession() as http:
            url = f"{server.url}/v1/sessions/{sid}/train"
            headers = {"Content-Type": wire.CONTENT_TYPE}
            with pytest.raises(aiohttp.ClientPayloadError):
                async with http.post(url, data=body, headers=headers) as resp:
                    assert resp.status == 200  # headers go out before the commit
                    async for chunk in resp.content.iter_any():
                        received += chunk
            assert failed.is_set()
            assert 0 < len(received) < resp.content_length  # streamed, but never whole
            assert len(received) >= resp.content_length - 8 - (1 << 20)  # all but the held-back bytes
            monkeypatch.setattr(Reservation, "commit", real_commit)
            async with http.get(f"{server.url}/v1/health") as resp:
                assert resp.status == 503  # the tail holds a step that is not durable: restart
            async with http.post(url, data=body, headers=headers) as resp:
                assert resp.status == 503 and (await resp.json())["error"] == "tail_unavailable"
            async with http.get(f"{server.url}/metrics") as resp:
                families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
                rejected = {s.labels["reason"]: s.value for s in families["dpa_rejected_requests"].samples}
                assert rejected["storage_error"] == 1
        journal = server.state.config.resolved_state_dir / "journal"
        assert list(journal.iterdir()) == []  # no entry, no temp file: after a restart the step never happened

    asyncio.run(run())


def test_without_a_journal_the_reply_is_whole_before_the_commit(small_export, start_server, monkeypatch):
    """With --no-journal a crash loses every step since the last checkpoint anyway: the reply
    does not wait for the stored reply's disk write."""
    from runtime_server.records import Reservation

    server = start_server(small_export, journal=False)
    digest = manifest_sha256(small_export)
    act, labels = _tensors(load_manifest(small_export).activation_shape)
    written = threading.Event()
    real_commit = Reservation.commit

    def slow_commit(self, data, **kw):  # type: ignore[no-untyped-def]
        time.sleep(1.0)
        real_commit(self, data, **kw)
        written.set()

    async def run() -> None:
        async with EdgeClient(server.url) as edge:
            sid = (await edge.open_session(digest)).session_id
        body = bytes(wire.encode({"activation": act, "labels": labels}, {"step": 1}))
        monkeypatch.setattr(Reservation, "commit", slow_commit)
        async with aiohttp.ClientSession() as http:
            url = f"{server.url}/v1/sessions/{sid}/train"
            async with http.post(url, data=body, headers={"Content-Type": wire.CONTENT_TYPE}) as resp:
                reply = wire.decode(bytearray(await resp.read()))
            assert not written.is_set()  # whole, and the reply's file is still being written
            assert reply.meta["step"] == 1
            # A retry waits for the commit, then gets the stored reply, byte for byte.
            async with http.post(url, data=body, headers={"Content-Type": wire.CONTENT_TYPE}) as resp:
                assert resp.status == 200 and written.is_set()
                assert wire.decode(bytearray(await resp.read())).meta == reply.meta

    asyncio.run(run())
