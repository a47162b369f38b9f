"""``dpa serve``: the edge server for the tail."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from dpa.cli_util import console, user_errors
from dpa.devices import DeviceProfile


def serve_command(
    artifacts: Annotated[Path, typer.Option(help="Export folder (manifest.json + tail/).")] = Path("artifacts"),
    host: Annotated[str, typer.Option(help="Address to bind; loopback unless you mean to expose it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 picks a free one).")] = 8080,
    device: Annotated[str, typer.Option(help="auto, cpu, arm64 or cuda (falls back to cpu, saying why).")] = "auto",
    max_batch: Annotated[int, typer.Option(help="Largest batch per request; sets the body-size limit.")] = 32,
    checkpoint_every: Annotated[int, typer.Option(help="Train steps between tail checkpoints.")] = 50,
    state_dir: Annotated[
        Path | None, typer.Option(help="Running tail checkpoint folder (default <artifacts>/server-state).")
    ] = None,
) -> None:
    """Serve the tail: train it on DP activations from devices, return activation gradients."""
    from aiohttp import web

    from runtime_server.app import init_app
    from runtime_server.config import ServerConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with user_errors():
        config = ServerConfig(
            artifacts=artifacts,
            host=host,
            port=port,
            device=DeviceProfile.parse(device),
            max_batch=max_batch,
            checkpoint_every=checkpoint_every,
            state_dir=state_dir,
        )
        app = init_app(config)
    console.print(f"dpa edge server for {artifacts}/ on http://{host}:{port}  (Ctrl-C saves and stops)")
    web.run_app(app, host=host, port=port, print=None, access_log=None)
