"""The journal: entries appear only for applied steps, whole, and a crash's leftovers are dropped."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
import numpy as np

from dpa.contract import wire
from dpa.contract.manifest import load_manifest, manifest_sha256
from runtime_client.edge import EdgeClient
from runtime_server.journal import JOURNAL_DIR, Journal

BODY = bytes(range(256)) * 4096  # 1 MiB


def test_an_appended_entry_holds_the_whole_request(tmp_path):
    journal = Journal(tmp_path)
    journal.append(7, "s1", bytearray(BODY))
    (entry,) = journal.entries()
    assert (entry.global_step, entry.session_id) == (7, "s1")
    assert entry.path.read_bytes() == BODY + hashlib.sha256(BODY).digest()  # the request, then its checksum
    assert [p.name for p in (tmp_path / JOURNAL_DIR).iterdir()] == ["000000000007-s1.dpaw"]


def test_a_write_cut_short_by_a_crash_is_dropped_on_restart(tmp_path):
    """atomic_write_bytes' temp file, as a SIGKILL mid-append leaves it: that step was never answered."""
    (tmp_path / JOURNAL_DIR).mkdir()
    (tmp_path / JOURNAL_DIR / ".000000000003-s1.dpaw.abc123.tmp").write_bytes(BODY[:1000])
    assert Journal(tmp_path).entries() == []
    assert list((tmp_path / JOURNAL_DIR).iterdir()) == []


def test_a_step_the_tail_refuses_leaves_no_journal_entry(small_export, start_server):
    server = start_server(small_export)
    shape = load_manifest(small_export).activation_shape
    # Finite, so validation lets it through; the tail's sums overflow, so the tail refuses it.
    act = np.full((2, *shape), 3e38, dtype=np.float32)
    body = bytes(wire.encode({"activation": act, "labels": np.array([0, 1])}, {"step": 1}))

    async def run() -> None:
        async with EdgeClient(server.url) as edge:
            sid = (await edge.open_session(manifest_sha256(small_export))).session_id
        async with aiohttp.ClientSession() as http:
            url = f"{server.url}/v1/sessions/{sid}/train"
            async with http.post(url, data=body, headers={"Content-Type": wire.CONTENT_TYPE}) as resp:
                assert resp.status == 422 and (await resp.json())["error"] == "non_finite_step"

    asyncio.run(run())
    assert server.state.tail.global_step == 0
    journal_dir = server.state.journal.dir
    assert not journal_dir.exists() or list(journal_dir.iterdir()) == []
