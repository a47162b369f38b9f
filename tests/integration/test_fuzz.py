"""Fuzz test: hostile bytes at the wire parser and at every endpoint of a running server.

The parser either decodes a message or raises ``WireError`` (the server's 400) - never
anything else. The server, with auth on, answers every generated request - truncated,
oversized, wrong dtype or shape, NaN/Inf, random bytes, bad tokens, bad step numbers,
unknown sessions and paths - with a 4xx, keeps serving, and its model does not change.
"""

from __future__ import annotations

import http.client
import json
import string
import struct
from collections import Counter

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpa.contract import wire
from dpa.contract.manifest import load_manifest, manifest_sha256
from runtime_server.auth import add_token

WIRE_EXAMPLES = 1500
ENDPOINT_EXAMPLES = 400


def _valid_message(shape: tuple[int, ...], batch: int = 2, step: int = 1) -> bytes:
    tensors = {"activation": np.ones((batch, *shape), np.float32), "labels": np.zeros(batch, np.int64)}
    return bytes(wire.encode(tensors, {"step": step}))


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """A valid message with bytes flipped, cut, inserted or a header field replaced."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "extend", "field"]))
        if kind == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif kind == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
        elif kind == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
        elif kind == "field" and len(data) >= 64:
            # count, meta length, a tensor header or a dimension: the fields a parser trusts
            offset = draw(st.sampled_from([6, 8, 12, 16, 40, 42, 43, 44, 48, 52, 56, 60]))
            fmt = draw(st.sampled_from(["<H", "<I", "<B"]))
            value = draw(st.integers(0, 2 ** (8 * struct.calcsize(fmt)) - 1))
            struct.pack_into(fmt, data, offset, value)
    return bytes(data)


def test_wire_parser_raises_only_wire_errors(capsys):
    base = _valid_message((3, 4, 4))
    outcomes: Counter[str] = Counter()

    @settings(max_examples=WIRE_EXAMPLES, deadline=None, database=None)
    @given(st.one_of(st.binary(max_size=512), mutated(base), st.just(b"DPAW" + bytes(12))))
    def check(data: bytes) -> None:
        try:
            message = wire.decode(data)
        except wire.WireError:
            outcomes["WireError"] += 1
            return
        outcomes["decoded"] += 1
        for array in message.tensors.values():
            assert array.nbytes <= len(data)  # views into the buffer, never an allocation from a header

    check()
    with capsys.disabled():
        print(f"\n[fuzz wire] {sum(outcomes.values())} inputs: {dict(outcomes)}; no other exception")
    assert outcomes["WireError"] > 0 and outcomes["decoded"] > 0


@st.composite
def hostile_request(draw: st.DrawFn, ctx: dict) -> tuple[str, str, dict[str, str], bytes]:
    """(method, path, headers, body) with at least one defect, so no request may change the model."""
    shape = ctx["shape"]
    sid = ctx["session"]
    good_auth = {"Authorization": f"Bearer {ctx['token']}"}
    defect = draw(
        st.sampled_from(
            [
                "no_token", "bad_token", "wrong_scheme", "random_body", "mutated_body", "wrong_dtype", "wrong_shape",
                "non_finite", "bad_labels", "bad_step", "wrong_ctype", "unknown_session", "random_path",
                "bad_open", "wrong_method", "huge_length",
            ]
        )
    )  # fmt: skip
    headers = dict(good_auth)
    headers["Content-Type"] = wire.CONTENT_TYPE
    method, path = "POST", f"/v1/sessions/{sid}/{draw(st.sampled_from(['train', 'eval']))}"
    body = _valid_message(shape, step=draw(st.sampled_from([1, 5])))  # step 1 is valid: defects below
    if defect == "no_token":
        headers.pop("Authorization")
    elif defect == "bad_token":
        alphabet = string.ascii_letters + string.digits + "-._~+/= "
        headers["Authorization"] = "Bearer " + draw(st.text(alphabet=alphabet, max_size=80))
    elif defect == "wrong_scheme":
        headers["Authorization"] = f"Basic {ctx['token']}"
    elif defect == "random_body":
        body = draw(st.binary(max_size=2048))
    elif defect == "mutated_body":
        body = draw(mutated(body))
        if body.startswith(b"DPAW") and len(body) == len(_valid_message(shape)):
            path = f"/v1/sessions/{sid}/eval" if draw(st.booleans()) else path.replace(sid, "nope")
    elif defect == "wrong_dtype":
        dtype = draw(st.sampled_from([np.int32, np.uint8, np.int64]))
        tensors = {"activation": np.ones((2, *shape), dtype), "labels": np.zeros(2, np.int64)}
        body = bytes(wire.encode(tensors, {"step": 1}))
    elif defect == "wrong_shape":
        dims = draw(st.lists(st.integers(0, 9), min_size=0, max_size=5).filter(lambda d: tuple(d[1:]) != shape))
        tensors = {"activation": np.ones(dims, np.float32), "labels": np.zeros(dims[0] if dims else 2, np.int64)}
        body = bytes(wire.encode(tensors, {"step": 1}))
    elif defect == "non_finite":
        act = np.ones((2, *shape), np.float32)
        act.flat[draw(st.integers(0, act.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        body = bytes(wire.encode({"activation": act, "labels": np.zeros(2, np.int64)}, {"step": 1}))
    elif defect == "bad_labels":
        labels = np.array([draw(st.sampled_from([-1, 6, 2**40, -(2**62)])), 0], np.int64)
        body = bytes(wire.encode({"activation": np.ones((2, *shape), np.float32), "labels": labels}, {"step": 1}))
        path = f"/v1/sessions/{sid}/train"
    elif defect == "bad_step":
        step = draw(st.sampled_from([0, -1, 2, 10**12, "1", 1.0, None, [1], True]))
        tensors = {"activation": np.ones((2, *shape), np.float32), "labels": np.zeros(2, np.int64)}
        body = bytes(wire.encode(tensors, {"step": step} if step is not None else {}))
        path = f"/v1/sessions/{sid}/train"
    elif defect == "wrong_ctype":
        headers["Content-Type"] = draw(st.sampled_from(["application/json", "text/plain", "", "application/x-dpa"]))
    elif defect == "unknown_session":
        near = sid[:-1] + ("B" if sid.endswith("A") else "A")  # one character off
        path = path.replace(sid, draw(st.sampled_from(["nope", "x" * 200, "%2e%2e", "..", near])))
    elif defect == "random_path":
        path = "/" + draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz/_.-%0123456789", max_size=60))
        method = draw(st.sampled_from(["GET", "POST", "DELETE", "PUT"]))
        if path.rstrip("/") in ("/v1/health", "/v1/status", "/metrics", "/v1/sessions") or path.startswith(
            "/v1/sessions/"
        ):
            path = "/nowhere" + path
    elif defect == "bad_open":
        path, headers["Content-Type"] = "/v1/sessions", "application/json"
        body = draw(
            st.one_of(
                st.binary(max_size=256),
                st.just(b'{"manifest_sha256": "' + b"0" * 64 + b'"}'),
                st.just(b"[]"),
                st.just(b'{"manifest_sha256": 7}'),
            )
        )
    elif defect == "wrong_method":
        method = draw(st.sampled_from(["PUT", "PATCH", "GET"]))
        if method == "GET" and path.endswith(("/train", "/eval")):
            pass  # GET on a POST route: 405
    elif defect == "huge_length":
        headers["Content-Length"] = str(10**12)
        body = body[:100]
    return method, path, headers, body


def _send(port: int, method: str, path: str, headers: dict[str, str], body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        length_given = "Content-Length" in headers
        for key, value in headers.items():
            conn.putheader(key, value)
        if not length_given:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        try:
            conn.send(body)
            return conn.getresponse().status
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
            return 499  # the server hung up on a lying Content-Length: refused, not crashed
    finally:
        conn.close()


def test_endpoints_answer_hostile_requests_with_4xx_and_keep_the_model(small_export, start_server, tmp_path, capsys):
    tokens = tmp_path / "tokens.txt"
    token = add_token(tokens, "phone")
    server = start_server(small_export, tokens=tokens, max_batch=4, session_rate=1e6, session_burst=10**6)
    manifest = load_manifest(small_export)
    before = server.state.tail.parameters()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(
        "POST",
        "/v1/sessions",
        json.dumps({"manifest_sha256": manifest_sha256(small_export)}),
        {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    session = json.loads(conn.getresponse().read())["session_id"]
    conn.close()
    ctx = {"shape": tuple(manifest.activation_shape), "session": session, "token": token}
    statuses: Counter[int] = Counter()

    @settings(
        max_examples=ENDPOINT_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(hostile_request(ctx))
    def check(request: tuple[str, str, dict[str, str], bytes]) -> None:
        method, path, headers, body = request
        status = _send(server.port, method, path, headers, body)
        statuses[status] += 1
        assert status < 500, (status, method, path, headers, body[:64])
        assert status >= 400 or path.endswith("/eval"), (status, method, path)  # only eval may succeed

    check()
    after = server.state.tail.parameters()
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    assert server.state.tail.global_step == 0
    # Still serving: a valid step from the same session is applied.
    status = _send(
        server.port,
        "POST",
        f"/v1/sessions/{session}/train",
        {"Authorization": f"Bearer {token}", "Content-Type": wire.CONTENT_TYPE},
        _valid_message(ctx["shape"]),
    )
    assert status == 200 and server.state.tail.global_step == 1
    with capsys.disabled():
        tried, by_status = sum(statuses.values()), dict(sorted(statuses.items()))
        print(f"\n[fuzz endpoints] {tried} hostile requests, statuses {by_status}")
