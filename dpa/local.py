"""Run the edge server and a device client in one process, over real loopback HTTP.

The demo and the sweep train this way: the server is the real aiohttp app on a free
127.0.0.1 port with its own fresh (or resumed) tail, and the client is the real
``run_training`` talking HTTP to it.
"""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

__all__ = ["free_port", "serve_and_train"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def serve_and_train(artifacts: Path, state: Path, client_cfg: Any) -> dict[str, Any]:
    """Start a server on loopback for ``artifacts`` (tail state in ``state``), train, stop; the report."""
    from aiohttp import web

    from runtime_client.trainer import run_training
    from runtime_server.app import init_app
    from runtime_server.config import ServerConfig

    port = free_port()
    # Server and client share this process, so a crash takes both: a journal would buy nothing
    # here (the tail is still saved at the end).
    config = ServerConfig(artifacts=artifacts, port=port, device="cpu", state_dir=state, journal=False)  # type: ignore[arg-type]
    app = init_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        return await run_training(replace(client_cfg, server=f"http://127.0.0.1:{port}"))
    finally:
        await runner.cleanup()
