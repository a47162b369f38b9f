"""Run the edge server and a device client in one process, over real loopback HTTP.

The demo and the sweep train this way: the server is the real aiohttp app on a free
127.0.0.1 port with its own fresh (or resumed) tail, and the client is the real
``run_training`` talking HTTP to it.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from dpa.contract.messages import Route, route
from dpa.runs.accuracy import add_clean_accuracy
from runtime_client.trainer import run_training
from runtime_server.app import init_app
from runtime_server.config import ServerConfig

__all__ = ["free_port", "serve_and_train", "wait_until_healthy"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_healthy(url: str, server: subprocess.Popen, timeout_s: float = 120.0) -> None:  # type: ignore[type-arg]
    """Block until the server process at ``url`` answers /v1/health; RuntimeError if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url + route(Route.HEALTH), timeout=1)
            return
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"the server at {url} exited with status {server.returncode}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server at {url} did not answer within {timeout_s:g} s") from None
            time.sleep(0.1)


async def serve_and_train(
    artifacts: Path, state: Path, client_cfg: Any, *, clean: bool = True, templates: bool = False
) -> dict[str, Any]:
    """Start a server on loopback for ``artifacts`` (tail state in ``state``), train, stop; the report,
    with the clean held-out accuracy of the trained model beside the private one (``clean``)."""

    port = free_port()
    # Server and client share this process, so a crash takes both: a journal would buy nothing
    # here (the tail is still saved at the end).
    config = ServerConfig(
        artifacts=artifacts,
        port=port,
        device="cpu",
        state_dir=state,
        journal=False,
        templates=templates,  # type: ignore[arg-type]
        session_rate=1e4,  # one trusted device on loopback: a frozen head's steps come faster than 20/s
        session_burst=10_000,
    )
    app = init_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    client_cfg = replace(client_cfg, server=f"http://127.0.0.1:{port}")
    try:
        report = await run_training(client_cfg)
    finally:
        await runner.cleanup()  # saves the tail
    return add_clean_accuracy(report, client_cfg, state) if clean else report
