"""What an edge server of a federation adds (docs/protocol.md): sessions that name their classes' gallery
rows, and the operators' GET/PUT /v1/tail. On the real server over loopback, against the protocol's
formula and bytes."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest

from dpa.contract import messages, wire
from dpa.contract.manifest import load_manifest, manifest_sha256
from runtime_client.edge import EdgeClient, EdgeError
from runtime_server.auth import add_token
from runtime_server.tail_exchange import tail_digest


def _release(k: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (k, d)).astype(np.float32), rng.uniform(2, 6, k).astype(np.float32)


def test_sessions_keep_their_class_sums_at_the_gallery_rows_they_name(small_export, start_server):
    manifest, digest = load_manifest(small_export), manifest_sha256(small_export)
    k, shape = manifest.num_classes, tuple(manifest.activation_shape)
    size = 3 * k
    server = start_server(small_export, gallery_size=size)
    rows_a, rows_b = list(range(k)), list(range(k - 2, 2 * k - 2))  # two classes in common
    (sa, ca), (sb, cb) = _release(k, manifest.activation_numel, 0), _release(k, manifest.activation_numel, 1)

    async def run():  # type: ignore[no-untyped-def]
        async with EdgeClient(server.url) as edge:
            for rows, s, c in ((rows_a, sa, ca), (rows_b, sb, cb)):
                sid = (await edge.open_session(digest, gallery_rows=tuple(rows))).session_id
                assert (await edge.describe_session(sid))["gallery_rows"] == rows
                await edge.class_sums(sid, bytes(messages.encode_class_sums(s.reshape(k, *shape), c)))
            refused = []
            for bad in ([0] * k, list(range(size - k + 1, size + 1)), list(range(k - 1)), [True] * k):
                with pytest.raises(EdgeError) as err:
                    await edge.open_session(digest, gallery_rows=tuple(bad))
                refused.append((err.value.status, err.value.code))
            return await edge.templates(), refused

    (means, counts, _), refused = asyncio.run(run())
    assert refused == [(400, "malformed_body")] * 4
    sums, n = np.zeros((size, manifest.activation_numel)), np.zeros(size)
    for rows, s, c in ((rows_a, sa, ca), (rows_b, sb, cb)):
        sums[rows] += s
        n[rows] += c
    want_n = np.maximum(np.rint(n), 0).astype(np.int64)  # the protocol's formula
    want = np.where(want_n[:, None] > 0, sums / np.maximum(want_n, 1)[:, None], 0.0)
    assert means.shape == (size, *shape) and np.array_equal(counts, want_n)
    np.testing.assert_allclose(means.reshape(size, -1), want, rtol=1e-5, atol=1e-6)


def test_only_operators_read_and_replace_the_tail_and_a_moved_tail_is_refused(small_export, start_server, tmp_path):
    tokens = tmp_path / "tokens.txt"
    phone, bridge = add_token(tokens, "phone"), add_token(tokens, "bridge")
    server = start_server(small_export, tokens=tokens, operators=("bridge",))

    async def run():  # type: ignore[no-untyped-def]
        async with EdgeClient(server.url, token=phone) as device, EdgeClient(server.url, token=bridge) as op:
            with pytest.raises(EdgeError) as denied:
                await device.tail()
            got = await op.tail()
            params = {name: (v + 0.5).astype(np.float32) for name, v in got[0].items()}
            step = int(got[1]["global_step"])
            first = await op.load_tail(params, step)
            again = await op.load_tail(params, step)  # a retried round: the same state, once
            with pytest.raises(EdgeError) as moved:
                await op.load_tail(params, step - 1)
            bad = dict(params, **{next(iter(params)): np.full_like(next(iter(params.values())), np.nan)})
            with pytest.raises(EdgeError) as nan:
                await op.load_tail(bad, step)
            return denied.value, got, params, first, again, moved.value, nan.value, await op.tail()

    denied, got, params, first, again, moved, nan, after = asyncio.run(run())
    assert (denied.status, denied.code) == (403, "operator_only")
    assert (moved.status, moved.code, moved.detail["expected_step"]) == (409, "tail_moved", got[1]["global_step"])
    assert (nan.status, nan.code) == (422, "non_finite")
    assert first == again == {"global_step": got[1]["global_step"], "examples_seen": got[1]["examples_seen"],
                              "sha256": tail_digest(params)}  # fmt: skip
    for name, value in params.items():  # loaded, bytes for bytes, and checkpointed
        assert np.array_equal(after[0][name], value)
    server.stop()
    restarted = start_server(
        small_export, tokens=tokens, operators=("bridge",), state_dir=server.state.config.state_dir
    )

    async def reread():  # type: ignore[no-untyped-def]
        async with EdgeClient(restarted.url, token=bridge) as op:
            return await op.tail()

    for name, value in asyncio.run(reread())[0].items():
        assert np.array_equal(value, params[name])


def test_a_tail_put_without_its_step_is_malformed(small_export, start_server, tmp_path):
    tokens = tmp_path / "tokens.txt"
    bridge = add_token(tokens, "bridge")
    server = start_server(small_export, tokens=tokens, operators=("bridge",))

    async def run() -> tuple[int, dict]:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {bridge}"}) as http:
            body = messages.encode_tail({"x": np.zeros(1, np.float32)}, {})
            async with http.put(f"{server.url}/v1/tail", data=bytes(body),
                                headers={"Content-Type": wire.CONTENT_TYPE}) as resp:  # fmt: skip
                return resp.status, await resp.json()

    status, answer = asyncio.run(run())
    assert (status, answer["error"]) == (400, "malformed_body")
