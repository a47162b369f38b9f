"""Stored replies are fsynced at the checkpoint that ends the journal, not with every step.

The journal's replay stores a journalled step's reply again, so a reply needs to survive a power cut only
once its step has left the journal: ``checkpoint`` fsyncs the replies written since the last one first.
"""

from __future__ import annotations

import os

from runtime_server import records
from runtime_server.records import Reservation, read_sealed, sync_files


def _count_fsyncs(monkeypatch) -> list[int]:  # type: ignore[no-untyped-def]
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(records.os, "fsync", counting)
    monkeypatch.setattr("dpa.base.atomic.os.fsync", counting)
    return calls


def test_a_reply_committed_without_durability_is_whole_and_unsynced(tmp_path, monkeypatch):
    calls = _count_fsyncs(monkeypatch)
    body = os.urandom(4096)
    Reservation(tmp_path / "r.dpaw", len(body)).commit(body, durable=False)
    assert calls == []
    assert read_sealed(tmp_path / "r.dpaw", what="stored reply") == body  # whole, with its checksum
    Reservation(tmp_path / "j.dpaw", len(body)).commit(body)  # the journal's entries stay durable
    assert len(calls) == 2  # the file and its folder


def test_sync_files_fsyncs_each_remaining_file_and_each_folder_once(tmp_path, monkeypatch):
    for name in ("a", "b"):
        Reservation(tmp_path / f"{name}.dpaw", 10).commit(b"0123456789", durable=False)
    calls = _count_fsyncs(monkeypatch)
    sync_files({tmp_path / "a.dpaw", tmp_path / "b.dpaw", tmp_path / "closed.dpaw"})  # one removed since
    assert len(calls) == 3  # two files, one folder


def test_the_checkpoint_syncs_the_replies_before_the_journal_ends(tmp_path, start_server, small_export):
    """A real server: after the checkpoint's step no reply is left unsynced."""
    import asyncio

    import numpy as np

    from dpa.contract.devices import resolve_device
    from dpa.contract.manifest import load_manifest, manifest_sha256
    from dpa.privacy.mechanism import DPActivations, DPConfig
    from runtime_client.edge import EdgeClient
    from runtime_client.head import HeadModel
    from runtime_client.split_step import SplitTrainer

    server = start_server(small_export, checkpoint_every=3)
    m = load_manifest(small_export)
    head = HeadModel(small_export, m, resolve_device("cpu"))
    rng = np.random.default_rng(0)
    images = rng.standard_normal((4, *m.input_shape), dtype=np.float32)
    labels = rng.integers(0, m.num_classes, 4)

    async def steps(n: int) -> None:
        async with EdgeClient(server.url) as edge:
            session = await edge.open_session(manifest_sha256(small_export))
            dp = DPActivations(DPConfig(clip=10.0, epsilon=8.0), np.random.default_rng(1))
            trainer = SplitTrainer(head, edge, session.session_id, dp)
            for _ in range(n):
                await trainer.step(images, labels)

    asyncio.run(steps(2))
    assert len(server.state.sessions.unsynced_replies) == 1  # step 2's reply: its step is in the journal
    asyncio.run(steps(1))  # global step 3: a checkpoint
    assert server.state.sessions.unsynced_replies == set()
