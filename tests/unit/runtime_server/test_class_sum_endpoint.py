"""POST /v1/sessions/{id}/class-sums on the real server: kept durably, once, served as the templates;
bad releases refused with their codes and nothing kept; the files are what a restart rebuilds from."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from dpa.contract import messages, wire
from dpa.contract.errors import UserError
from dpa.contract.manifest import load_manifest, manifest_sha256
from runtime_client.edge import EdgeClient, EdgeError
from runtime_server.class_sums import CLASS_SUMS_DIR, ClassSumStore


def _release(manifest, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    k, shape = manifest.num_classes, tuple(manifest.activation_shape)
    sums = rng.normal(0, 1, (k, *shape)).astype(np.float32)
    counts = np.array([5.4, 4.6, 0.2, -1.3, 7.0, 2.5], dtype=np.float32)[:k]
    return sums, counts


async def _post(url: str, body: bytes) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=body, headers={"Content-Type": wire.CONTENT_TYPE}) as resp:
            return resp.status, await resp.json(content_type=None)


def _expected_templates(sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The formula the protocol states: each noisy count rounded, floored at 0; sums over it; 0 if 0."""
    n = np.maximum(np.rint(counts.astype(np.float64)), 0).astype(np.int64)
    flat = sums.reshape(len(sums), -1).astype(np.float64)
    means = np.where(n[:, None] > 0, flat / np.maximum(n, 1)[:, None], 0.0)
    return means.astype(np.float32).reshape(sums.shape), n


def test_a_release_is_kept_once_and_served_as_the_templates(small_export, start_server):
    manifest, digest = load_manifest(small_export), manifest_sha256(small_export)
    # Templates off: class sums are served all the same. A batch of one: a release of 6 classes is larger
    # than the largest train request (413 body_too_large before the class-sum limit was its own).
    server = start_server(small_export, max_batch=1)
    sums, counts = _release(manifest)
    body = bytes(messages.encode_class_sums(sums, counts))

    async def run() -> tuple:
        async with EdgeClient(server.url) as edge:
            sid = (await edge.open_session(digest, labels={"mechanism": "in-class-sums"})).session_id
            first = await edge.class_sums(sid, body)
            again = await edge.class_sums(sid, body)  # a retry: the same bytes
            means, n, _ = await edge.templates()
            other = (await edge.open_session(digest)).session_id
            resent = await edge.class_sums(other, body)  # the same release in a new session: kept once
            conflict = await _post(f"{server.url}/v1/sessions/{sid}/class-sums",
                                   bytes(messages.encode_class_sums(sums + 1, counts)))  # fmt: skip
            means2, n2, _ = await edge.templates()
            described = await edge.describe_session(sid)
            return first, again, means, n, resent, conflict, means2, n2, described

    first, again, means, n, resent, conflict, means2, n2, described = asyncio.run(run())
    assert (first["retry"], again["retry"], resent["retry"]) == (False, True, True)
    assert described["labels"] == {"mechanism": "in-class-sums"}
    want_means, want_n = _expected_templates(sums, counts)
    np.testing.assert_array_equal(n, want_n)
    assert n.tolist() == [5, 5, 0, 0, 7, 2]
    np.testing.assert_allclose(means, want_means, rtol=1e-6)
    assert conflict[0] == 409 and conflict[1]["error"] == "already_released"
    np.testing.assert_array_equal(means2, means)
    np.testing.assert_array_equal(n2, n)
    files = list((server.state.config.state_dir / CLASS_SUMS_DIR).glob("*.npz"))
    assert len(files) == 1
    # The file is what a restart reads: a new store over the same folder holds the same totals.
    server.stop()
    store = ClassSumStore(server.state.config.state_dir, manifest.num_classes, manifest.activation_numel)
    restored_means, restored_n = store.templates()
    np.testing.assert_array_equal(restored_means.reshape(means.shape), means)
    np.testing.assert_array_equal(restored_n, n)


def test_bad_releases_are_refused_and_nothing_is_kept(small_export, start_server):
    manifest, digest = load_manifest(small_export), manifest_sha256(small_export)
    server = start_server(small_export)
    sums, counts = _release(manifest)
    nan = sums.copy()
    nan[1, 0, 0, 0] = np.nan
    cases = {
        "flat sums": (wire.encode({"class_sums": sums.reshape(len(sums), -1), "counts": counts}), "wrong_shape"),
        "int64 counts": (wire.encode({"class_sums": sums, "counts": counts.astype(np.int64)}), "wrong_dtype"),
        "missing counts": (wire.encode({"class_sums": sums}), "wrong_tensors"),
        "a class short": (wire.encode({"class_sums": sums[:-1], "counts": counts[:-1]}), "wrong_shape"),
        "NaN": (wire.encode({"class_sums": nan, "counts": counts}), "non_finite"),
        "not a wire message": (b"DPAT" + b"\0" * 40, "malformed_body"),
    }

    async def run() -> dict[str, tuple[int, str]]:
        async with EdgeClient(server.url) as edge:
            sid = (await edge.open_session(digest)).session_id
        out = {}
        for name, (body, _) in cases.items():
            status, reply = await _post(f"{server.url}/v1/sessions/{sid}/class-sums", bytes(body))
            out[name] = (status, reply["error"])
        out["unknown session"] = (await _post(f"{server.url}/v1/sessions/nope/class-sums", b""))[0], ""
        async with EdgeClient(server.url) as edge:
            try:
                await edge.templates()
                out["templates"] = (200, "")
            except EdgeError as exc:
                out["templates"] = (exc.status, exc.code)
        return out

    got = asyncio.run(run())
    for name, (_, code) in cases.items():
        assert got[name] == (422 if code != "malformed_body" else 400, code), name
    assert got["unknown session"][0] == 404
    assert got["templates"] == (404, "no_templates")  # nothing was kept
    assert not (server.state.config.state_dir / CLASS_SUMS_DIR).exists()


def test_an_unreadable_release_file_stops_the_start_with_its_name(small_export, tmp_path: Path):
    manifest = load_manifest(small_export)
    folder = tmp_path / CLASS_SUMS_DIR
    folder.mkdir()
    (folder / "abc.npz").write_bytes(b"not an npz")
    with pytest.raises(UserError, match=r"abc\.npz is unreadable"):
        ClassSumStore(tmp_path, manifest.num_classes, manifest.activation_numel)
