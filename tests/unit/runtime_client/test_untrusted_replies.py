"""The device does not trust the server's replies: a gradient with NaN, of the wrong shape or
missing, or misshapen logits, is refused with a clear error before it reaches a head weight.

The server here is a real aiohttp app on a loopback port that answers like an edge server
but lies in one way per test; the client is the real SplitTrainer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest
from aiohttp import web

from dpa.contract import wire
from dpa.contract.devices import resolve_device
from dpa.contract.manifest import GraphNames, load_manifest
from dpa.privacy.mechanism import DPActivations, DPConfig
from dpa.runs.loopback import free_port
from runtime_client.edge import EdgeClient, EdgeError, TrainReply
from runtime_client.head import HeadModel
from runtime_client.split_step import SplitTrainer

BATCH = 4

Reply = Callable[[int, tuple[int, ...]], dict[str, np.ndarray]]


def _honest(batch: int, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {
        "loss": np.float32(1.0),
        GraphNames.LOGITS: np.zeros((batch, 6), np.float32),
        GraphNames.ACTIVATION_GRADIENT: np.full((batch, *shape), 0.5, np.float32),
    }


def _nan_in_example_2(batch: int, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    tensors = _honest(batch, shape)
    tensors[GraphNames.ACTIVATION_GRADIENT][2].flat[7] = np.nan
    return tensors


def _wrong_shape(batch: int, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    return _honest(batch, shape) | {GraphNames.ACTIVATION_GRADIENT: np.zeros((batch, 5), np.float32)}


def _no_gradient(batch: int, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    tensors = _honest(batch, shape)
    del tensors[GraphNames.ACTIVATION_GRADIENT]
    return tensors


def _bad_logits(batch: int, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    return _honest(batch, shape) | {GraphNames.LOGITS: np.zeros((batch + 1, 6), np.float32)}


async def _lying_server(reply: Reply, shape: tuple[int, ...]) -> tuple[web.AppRunner, str]:
    async def open_session(request: web.Request) -> web.Response:
        return web.json_response({"session_id": "s" * 32, "max_batch": 64, "global_step": 0, "step": 0})

    async def train(request: web.Request) -> web.Response:
        message = wire.decode(await request.read())
        batch = message.tensors[GraphNames.LABELS].shape[0]
        meta = {"global_step": message.meta["step"], "step": message.meta["step"]}
        return web.Response(body=bytes(wire.encode(reply(batch, shape), meta)), content_type=wire.CONTENT_TYPE)

    app = web.Application(client_max_size=1 << 30)
    app.router.add_post("/v1/sessions", open_session)
    app.router.add_post("/v1/sessions/{sid}/train", train)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("micro_batch", [None, 1])
@pytest.mark.parametrize(
    ("reply", "messages"),
    [
        (_nan_in_example_2, ["activation gradient contains NaN or infinity"] * 2),
        (_wrong_shape, ["activation gradient is float32 (4, 5)", "activation gradient is float32 (1, 5)"]),
        (_no_gradient, ["activation gradient is none", "held gradients for 0 of 4 examples"]),
        (_bad_logits, ["logits have shape (5, 6)"] * 2),
    ],
)
def test_a_lying_reply_is_refused_and_moves_no_weight(small_export, reply, messages, micro_batch):
    """Whole batch and streamed (``micro_batch=1``, where the gradient is consumed example by example)."""
    message = messages[micro_batch is not None]
    manifest = load_manifest(small_export)
    head = HeadModel(small_export, manifest, resolve_device("cpu"))
    before = head.parameters()
    rng = np.random.default_rng(0)
    images = rng.standard_normal((BATCH, *manifest.input_shape), dtype=np.float32)
    labels = rng.integers(0, 6, BATCH)

    async def run() -> None:
        runner, url = await _lying_server(reply, manifest.activation_shape)
        try:
            async with EdgeClient(url) as edge:
                session = await edge.open_session("0" * 64)
                dp = DPActivations(DPConfig(clip=1.0, epsilon=8.0), np.random.default_rng(1))
                trainer = SplitTrainer(head, edge, session.session_id, dp, micro_batch=micro_batch)
                with pytest.raises(EdgeError) as info:
                    await trainer.step(images, labels)
                assert info.value.code == "bad_reply" and message in str(info.value)
                assert trainer.step_number == 0
                # Nothing half-accumulated survives: a step whose gradient is zero leaves every weight as it was.
                zero_gradient = np.zeros((BATCH, *manifest.activation_shape), np.float32)
                zero = TrainReply(1.0, np.zeros((BATCH, 6), np.float32), zero_gradient, 1, 1)
                await trainer.step(images, labels, stored=zero)
        finally:
            await runner.cleanup()

    asyncio.run(run())
    for name, value in before.items():
        np.testing.assert_array_equal(head.parameters()[name], value, err_msg=name)
