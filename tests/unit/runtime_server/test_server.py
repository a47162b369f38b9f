"""The edge server's happy paths: status, checkpoint and resume, health during a step."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np

from dpa.contract import wire
from dpa.contract.manifest import load_manifest, manifest_sha256
from runtime_server.state_lock import STATE_LOCK
from runtime_server.tail import CHECKPOINT_NAME


async def _train_steps(url: str, digest: str, shape, steps: int, batch: int = 2) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/sessions", json={"manifest_sha256": digest}) as resp:
            sid = (await resp.json())["session_id"]
        for step in range(1, steps + 1):
            body = wire.encode(
                {
                    "activation": rng.standard_normal((batch, *shape), dtype=np.float32),
                    "labels": rng.integers(0, 6, batch),
                },
                {"step": step},
            )
            async with http.post(
                f"{url}/v1/sessions/{sid}/train", data=bytes(body), headers={"Content-Type": wire.CONTENT_TYPE}
            ) as resp:
                assert resp.status == 200, await resp.text()


def test_checkpoint_every_n_steps_and_resume(small_export, start_server, tmp_path):
    shape = load_manifest(small_export).activation_shape
    digest = manifest_sha256(small_export)
    state = tmp_path / "state"
    first = start_server(small_export, state_dir=state, checkpoint_every=3)
    asyncio.run(_train_steps(first.url, digest, shape, steps=4))
    assert (state / CHECKPOINT_NAME).is_file()  # written at step 3
    weights = first.state.tail.parameters()
    first.stop()  # shutdown saves step 4 too
    second = start_server(small_export, state_dir=state)
    assert second.state.tail.resumed and second.state.tail.global_step == 4
    assert second.state.tail.examples_seen == 8
    for name, value in weights.items():
        np.testing.assert_array_equal(second.state.tail.parameters()[name], value)
    want = [
        CHECKPOINT_NAME,
        CHECKPOINT_NAME + ".sha256",
        "export.json",
        "journal",
        "replies",
        "sessions.json",
        STATE_LOCK,
    ]
    assert sorted(p.name for p in state.iterdir()) == sorted(want)  # with the checkpoint's checksum and the export
    assert list((state / "journal").iterdir()) == []  # the shutdown checkpoint holds every journalled step


def test_health_answers_while_a_step_is_in_flight(small_export, start_server):
    """Health checks sent while a 64-example step is received, validated and run return before it does.

    (They are answered while the body is read and validated; during onnxruntime's own train
    call the loop waits, see BENCHMARKS.md.)
    """
    server = start_server(small_export, max_batch=64)
    shape = load_manifest(small_export).activation_shape
    digest = manifest_sha256(small_export)
    done: list[tuple[str, float]] = []

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{server.url}/v1/sessions", json={"manifest_sha256": digest}) as resp:
                sid = (await resp.json())["session_id"]
            body = bytes(
                wire.encode(
                    {"activation": np.ones((64, *shape), np.float32), "labels": np.zeros(64, np.int64)}, {"step": 1}
                )
            )

            async def step() -> None:
                async with http.post(
                    f"{server.url}/v1/sessions/{sid}/train", data=body, headers={"Content-Type": wire.CONTENT_TYPE}
                ) as resp:
                    assert resp.status == 200
                done.append(("step", time.perf_counter()))

            async def health() -> None:
                while "step" not in (name for name, _ in done):
                    async with http.get(f"{server.url}/v1/health") as resp:
                        assert resp.status == 200
                    done.append(("health", time.perf_counter()))
                    await asyncio.sleep(0.005)

            await asyncio.gather(step(), health())

    asyncio.run(run())
    order = [name for name, _ in done]
    # At least two health answers arrived before the step's answer (one more may land just after it).
    assert "step" in order and order.index("step") >= 2, order
    print(f"health answered {order.index('step')} times during one 64-example step")


def test_status_counts(small_export, start_server):
    server = start_server(small_export)
    asyncio.run(
        _train_steps(server.url, manifest_sha256(small_export), load_manifest(small_export).activation_shape, 2)
    )

    async def status() -> dict:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/v1/status") as resp:
                return await resp.json()

    data = asyncio.run(status())
    assert (data["global_step"], data["examples_seen"], data["sessions"]) == (2, 4, 1)
    assert data["manifest_sha256"] == manifest_sha256(small_export) and data["cut"] == "conv1_1"


def test_message_buffers_are_reused_and_change_nothing(small_export, start_server):
    """Both sides reuse their request and reply buffers (dpa.contract.buffers) from the second step on, and
    training with reuse gives the very bits of training without it."""
    from dpa.contract.buffers import BufferPool
    from dpa.contract.devices import resolve_device
    from dpa.privacy.mechanism import DPActivations, DPConfig
    from runtime_client.edge import EdgeClient
    from runtime_client.head import HeadModel
    from runtime_client.split_step import SplitTrainer

    manifest = load_manifest(small_export)
    rng = np.random.default_rng(3)
    batches = [
        (rng.standard_normal((8, *manifest.input_shape), dtype=np.float32), rng.integers(0, 6, 8)) for _ in range(3)
    ]

    async def train(pooled: bool) -> tuple[list[np.ndarray], dict[str, np.ndarray], int, int]:
        server = start_server(small_export)
        if not pooled:
            server.state.buffers = BufferPool(keep=0)
        head = HeadModel(small_export, manifest, resolve_device("cpu"))
        dp = DPActivations(DPConfig(clip=1.0, epsilon=8.0), np.random.default_rng(1))
        async with EdgeClient(server.url) as edge:
            if not pooled:
                edge.buffers = BufferPool(keep=0)
            session = await edge.open_session(manifest_sha256(small_export))
            trainer = SplitTrainer(head, edge, session.session_id, dp)
            logits = []
            for images, labels in batches:
                await trainer.step(images, labels)
                probe = np.ones((1, *manifest.activation_shape), np.float32)
                logits.append(np.array(server.state.tail.eval_step(probe)))
            return logits, head.parameters(), edge.buffers.reused, server.state.buffers.reused

    plain_logits, plain_head, *_ = asyncio.run(train(pooled=False))
    logits, head, client_reused, server_reused = asyncio.run(train(pooled=True))
    assert client_reused >= 4 and server_reused >= 4  # request and reply, steps 2 and 3
    for ours, theirs in zip(logits, plain_logits, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    for name, value in plain_head.items():
        np.testing.assert_array_equal(head[name], value)
