"""Every bad request gets its own 4xx with a JSON reason, and the tail does not change."""

from __future__ import annotations

import asyncio
import json
import struct

import aiohttp
import numpy as np
import pytest

from dpa.contract import wire
from dpa.contract.manifest import load_manifest, manifest_sha256


@pytest.fixture
def server(small_export, start_server):  # type: ignore[no-untyped-def]
    return start_server(small_export, max_batch=4)


def _weights(server) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    return server.state.tail.parameters()


async def _post(url: str, data: bytes, ctype: str = wire.CONTENT_TYPE) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=data, headers={"Content-Type": ctype}) as resp:
            return resp.status, await resp.json(content_type=None)


async def _open(server, digest: str) -> tuple[int, dict]:  # type: ignore[no-untyped-def]
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/v1/sessions", json={"manifest_sha256": digest}) as resp:
            return resp.status, await resp.json()


def _batch(shape, n=2, meta=None, **over):  # type: ignore[no-untyped-def]
    tensors = {
        "activation": np.ones((n, *shape), dtype=np.float32),
        "labels": np.zeros(n, dtype=np.int64),
    }
    tensors.update(over)
    return bytes(wire.encode(tensors, {"step": 1} if meta is None else meta))


def test_bad_requests(server, small_export):
    manifest = load_manifest(small_export)
    shape = manifest.activation_shape
    before = _weights(server)

    async def run() -> list[tuple[str, int, dict]]:
        status, body = await _open(server, "0" * 64)
        out = [("wrong manifest", status, body)]
        status, body = await _open(server, manifest_sha256(small_export))
        assert status == 201
        train = f"{server.url}/v1/sessions/{body['session_id']}/train"
        cases = {
            "unknown session": (f"{server.url}/v1/sessions/nope/train", _batch(shape), wire.CONTENT_TYPE),
            "wrong content type": (train, _batch(shape), "application/json"),
            "random bytes": (train, b"\x00garbage" * 10, wire.CONTENT_TYPE),
            "truncated": (train, _batch(shape)[:-100], wire.CONTENT_TYPE),
            "wrong dtype": (train, _batch(shape, activation=np.ones((2, *shape), np.int32)), wire.CONTENT_TYPE),
            "wrong shape": (train, _batch(shape, activation=np.ones((2, 3, 8, 8), np.float32)), wire.CONTENT_TYPE),
            "too big batch": (train, _batch(shape, n=5), wire.CONTENT_TYPE),
            "empty batch": (train, _batch(shape, n=0), wire.CONTENT_TYPE),
            "NaN": (train, _batch(shape, activation=np.full((2, *shape), np.nan, np.float32)), wire.CONTENT_TYPE),
            "label range": (train, _batch(shape, labels=np.array([0, 99], np.int64)), wire.CONTENT_TYPE),
            "labels dtype": (train, _batch(shape, labels=np.array([0, 1], np.int32)), wire.CONTENT_TYPE),
            "missing labels": (
                train,
                bytes(wire.encode({"activation": np.ones((2, *shape), np.float32)}, {"step": 1})),
                wire.CONTENT_TYPE,
            ),
            "no step number": (train, _batch(shape, meta={}), wire.CONTENT_TYPE),
            "step not an integer": (train, _batch(shape, meta={"step": "1"}), wire.CONTENT_TYPE),
            "step out of order": (train, _batch(shape, meta={"step": 2}), wire.CONTENT_TYPE),
        }
        for name, (url, data, ctype) in cases.items():
            status, body = await _post(url, data, ctype)
            out.append((name, status, body))
        return out

    results = asyncio.run(run())
    expected = {
        "wrong manifest": (409, "manifest_mismatch", "both sides must use the same export"),
        "unknown session": (404, "unknown_session", "no open session nope"),
        "wrong content type": (415, "unsupported_media_type", "send tensors as application/x-dpa-tensors"),
        "random bytes": (400, "malformed_body", "bad magic"),
        "truncated": (400, "malformed_body", "truncated"),
        "wrong dtype": (422, "wrong_dtype", "activation must be float32 or float16, got int32"),
        "wrong shape": (422, "wrong_shape", f"activation must have shape (batch, {', '.join(map(str, shape))})"),
        "too big batch": (413, "body_too_large", "exceeds the limit"),  # the size limit is one batch of 4
        "empty batch": (422, "wrong_batch", "batch size must be 1..4, got 0"),
        "NaN": (422, "non_finite", "activation contains NaN or infinity"),
        "label range": (422, "label_out_of_range", "labels must be in 0..5"),
        "labels dtype": (422, "wrong_dtype", "labels must be int64, got int32"),
        "missing labels": (422, "wrong_tensors", "expected tensors ['activation', 'labels']"),
        "no step number": (422, "missing_step", 'a train request needs meta {"step": n}'),
        "step not an integer": (422, "missing_step", "its session step number"),
        "step out of order": (409, "step_out_of_order", "this session's next step is 1, not 2"),
    }
    for name, status, body in results:
        want_status, want_code, want_text = expected[name]
        assert (status, body["error"]) == (want_status, want_code), (name, status, body)
        assert want_text in body["message"], (name, body)
    after = _weights(server)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)
    assert server.state.tail.global_step == 0


def test_oversized_body_is_413_before_reading(server, small_export):
    manifest = load_manifest(small_export)
    big = np.zeros((64, *manifest.activation_shape), np.float32)  # 16x the allowed batch of 4

    async def run() -> tuple[int, dict]:
        _, body = await _open(server, manifest_sha256(small_export))
        return await _post(
            f"{server.url}/v1/sessions/{body['session_id']}/train", bytes(wire.encode({"activation": big}))
        )

    status, body = asyncio.run(run())
    assert status == 413 and body["error"] == "body_too_large"
    assert server.state.tail.global_step == 0


def test_malformed_session_request(server):
    async def run() -> tuple[int, dict]:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{server.url}/v1/sessions", data=b"{nope") as resp:
                return resp.status, await resp.json()

    status, body = asyncio.run(run())
    assert status == 400 and "manifest_sha256" in body["message"]


def test_a_session_records_how_its_labels_are_sent(server, small_export):
    """The request's labels object is checked, kept with the session, and echoed back."""
    digest = manifest_sha256(small_export)

    async def run(labels: object) -> tuple[int, dict, dict | None]:
        async with aiohttp.ClientSession() as http:
            request = {"manifest_sha256": digest, "labels": labels}
            async with http.post(f"{server.url}/v1/sessions", json=request) as resp:
                body = await resp.json()
            if resp.status != 201:
                return resp.status, body, None
            async with http.get(f"{server.url}/v1/sessions/{body['session_id']}") as resp:
                return 201, body, await resp.json()

    status, body, described = asyncio.run(run({"mechanism": "rr-with-prior", "epsilon": 4}))
    assert status == 201 and body["labels"] == described["labels"] == {"mechanism": "rr-with-prior", "epsilon": 4.0}
    status, body, _ = asyncio.run(run({"mechanism": "clear"}))
    assert status == 201 and body["labels"] == {"mechanism": "clear"}
    status, body, _ = asyncio.run(run(None))
    assert status == 201 and body["labels"] == {"mechanism": "unstated"}
    for bad in ({"mechanism": "rr-with-prior"}, {"mechanism": "rr-with-prior", "epsilon": -1}, {"mechanism": "x"}, 3):
        status, body, _ = asyncio.run(run(bad))
        assert status == 400 and body["error"] == "malformed_body" and "labels" in body["message"], bad
    assert len(server.state.sessions.sessions) == 3


def test_wire_header_of_reply_is_documented_format(server, small_export):
    """A good step answers with loss, logits and the activation gradient, in the documented framing."""
    manifest = load_manifest(small_export)

    async def run() -> bytes:
        _, body = await _open(server, manifest_sha256(small_export))
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{server.url}/v1/sessions/{body['session_id']}/train",
                data=_batch(manifest.activation_shape),
                headers={"Content-Type": wire.CONTENT_TYPE},
            ) as resp:
                assert resp.status == 200 and resp.content_type == wire.CONTENT_TYPE
                return await resp.read()

    raw = asyncio.run(run())
    magic, version, count, meta_len, reserved = struct.unpack_from("<4sHHII", raw)
    assert (magic, version, count, reserved) == (b"DPAW", 1, 3, 0)
    assert json.loads(raw[16 : 16 + meta_len]) == {"global_step": 1, "step": 1}
    msg = wire.decode(raw)
    assert list(msg.tensors) == ["loss", "logits", "activation_gradient"]
    assert msg.tensors["activation_gradient"].shape == (2, *manifest.activation_shape)
    assert msg.tensors["logits"].shape == (2, manifest.num_classes)
