"""Load test: 16 devices with their own tokens train at once against one server.

Every step of every device is applied exactly once (the server's global step and each
session's step count add up), health keeps answering, and the step latencies are printed.
Figures only: no timing is asserted (see BENCHMARKS.md for the paper-size numbers).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from dpa.contract.manifest import load_manifest, manifest_sha256
from runtime_client.edge import EdgeClient
from runtime_server.auth import add_token

CLIENTS, STEPS, BATCH = 16, 6, 4


def test_sixteen_devices_every_step_applied_once(small_export, start_server, tmp_path, capsys):
    tokens_file = tmp_path / "tokens.txt"
    tokens = [add_token(tokens_file, f"phone-{i:02d}") for i in range(CLIENTS)]
    server = start_server(small_export, tokens=tokens_file, max_batch=BATCH)
    manifest = load_manifest(small_export)
    digest = manifest_sha256(small_export)
    shape = tuple(manifest.activation_shape)
    latencies: list[float] = []
    health: list[float] = []

    async def device(index: int) -> tuple[str, str]:
        rng = np.random.default_rng(index)
        async with EdgeClient(server.url, token=tokens[index]) as edge:
            session = await edge.open_session(digest, client=f"load-{index}")
            for step in range(1, STEPS + 1):
                act = rng.standard_normal((BATCH, *shape), dtype=np.float32)
                labels = rng.integers(0, manifest.num_classes, BATCH)
                t0 = time.perf_counter()
                reply = await edge.train(session.session_id, step, act, labels)
                latencies.append(time.perf_counter() - t0)
                assert reply.step == step and reply.activation_gradient.shape == act.shape
            info = await edge.describe_session(session.session_id)
            assert info["step"] == STEPS and info["examples"] == STEPS * BATCH
            return session.session_id, tokens[index]

    async def probe(done: asyncio.Event) -> None:
        async with EdgeClient(server.url) as edge:
            while not done.is_set():
                t0 = time.perf_counter()
                assert (await edge.health())["status"] == "ok"
                health.append(time.perf_counter() - t0)
                await asyncio.sleep(0.02)

    async def run() -> float:
        done = asyncio.Event()
        prober = asyncio.create_task(probe(done))
        t0 = time.perf_counter()
        results = await asyncio.gather(*(device(i) for i in range(CLIENTS)))
        wall = time.perf_counter() - t0
        done.set()
        await prober
        # A session belongs to its token: another device's token is refused.
        async with EdgeClient(server.url, token=results[1][1]) as other:
            try:
                await other.describe_session(results[0][0])
            except Exception as exc:  # EdgeError
                assert getattr(exc, "status", None) == 403, exc
            else:
                raise AssertionError("another device's token could read the session")
        return wall

    wall = asyncio.run(run())
    assert server.state.tail.global_step == CLIENTS * STEPS
    assert server.state.tail.examples_seen == CLIENTS * STEPS * BATCH
    assert server.state.metrics.steps == CLIENTS * STEPS and server.state.metrics.replayed_steps == 0
    ms = np.array(latencies) * 1000
    with capsys.disabled():
        print(
            f"\n[load test] {CLIENTS} devices x {STEPS} steps = {len(latencies)} steps applied in {wall:.2f} s "
            f"({len(latencies) / wall:.1f} steps/s); step latency p50 {np.percentile(ms, 50):.0f} ms, "
            f"p99 {np.percentile(ms, 99):.0f} ms; health p99 {np.percentile(np.array(health) * 1000, 99):.0f} ms "
            f"over {len(health)} probes"
        )
