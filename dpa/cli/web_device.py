"""``dpa web-device``: the browser device's page (runtime_web), on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dpa.cli.errors import console, user_errors


def web_device_command(
    artifacts: Annotated[
        Path, typer.Option(help="Export folder (manifest.json + head/); the tail is never served.")
    ] = Path("artifacts"),
    server: Annotated[str, typer.Option(help="The edge server's URL the page starts with.")] = "http://127.0.0.1:8080",
    host: Annotated[str, typer.Option(help="Address to bind (loopback: the page is for this machine's browser).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port of the page.")] = 8090,
    faces: Annotated[
        Path | None, typer.Option(help="Built-in faces (LFW layout) the page can enrol without a folder picker.")
    ] = None,
    epsilon: Annotated[float, typer.Option(help="The page's starting whole-run epsilon.")] = 8.0,
    delta: Annotated[float, typer.Option(help="The page's starting delta.")] = 1e-5,
    test_hooks: Annotated[bool, typer.Option("--test-hooks", help="Expose the noiseless sums (tests only).")] = False,
    provider: Annotated[
        str, typer.Option(help="The page's execution provider: auto (WebGPU where the browser has it), wasm, webgpu.")
    ] = "auto",
) -> None:
    """Serve the browser device: a page that enrols privately with onnxruntime-web (docs/web_device.md)."""
    from aiohttp import web

    from runtime_web.web_device import WebDeviceConfig, web_app

    with user_errors():
        app = web_app(WebDeviceConfig(artifacts=artifacts, server=server, faces=faces, epsilon=epsilon, delta=delta,
                                      test_hooks=test_hooks, provider=provider))  # fmt: skip
    origin = f"http://{host}:{port}"
    console.print(f"web device on {origin}/ (open it in a browser); the edge server must allow this page: "
                  f"[bold]dpa serve --allow-origin {origin} ...[/]")  # fmt: skip
    web.run_app(app, host=host, port=port, print=None, access_log=None)
