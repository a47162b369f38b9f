"""Shared fixtures: small real exports and a real edge server on a free loopback port."""

from __future__ import annotations

import os

# pytest-xdist runs two workers on the two cores: each takes one core for torch's and OpenMP's threads
# (set before anything imports torch), or the two oversubscribe the cores and every torch test runs
# several times slower. The processes the tests start (servers, devices) inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import asyncio  # noqa: E402
import signal  # noqa: E402
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dpa.contract.architecture import ArchConfig
from dpa.contract.manifest import OptimizerConfig
from dpa.runs.loopback import free_port, wait_until_healthy

SMALL = ArchConfig(image_size=64, width=0.25, num_classes=6, dropout=0.0)

#: Real photographs (Labeled Faces in the Wild, deep-funneled) beside the project, never inside it:
#: ``../shared/data/lfw`` (its README); DPA_LFW overrides. CI has it; a newcomer's clone may not.
LFW = Path(os.environ.get("DPA_LFW", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lfw"))
LFW_IMAGES = LFW / "lfw-deepfunneled"
needs_lfw = pytest.mark.skipif(
    not LFW_IMAGES.is_dir(), reason=f"real faces: LFW is not at {LFW} (see ../shared/data/lfw/README.md)"
)


def export_small(out: Path, *, cut: str = "conv1_1", lr: float = 0.01, arch: ArchConfig = SMALL, **kw) -> Path:
    from exporter.export import ExportConfig, export

    export(ExportConfig(arch=arch, cut=cut, optimizer=OptimizerConfig(lr=lr), out=out, **kw))
    return out


@pytest.fixture(scope="session")
def small_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64x64, width 0.25, 6 classes, no dropout, cut conv1_1, SGD lr 0.01, seed 0."""
    return export_small(tmp_path_factory.mktemp("export") / "artifacts")


class RunningServer:
    """The real aiohttp app on a real loopback port, in a thread with its own event loop."""

    def __init__(self, config) -> None:  # type: ignore[no-untyped-def]
        from aiohttp import web

        from dpa.runs.loopback import free_port
        from runtime_server.app import STATE, init_app
        from runtime_server.tls import server_ssl_context

        self.port = config.port or free_port()
        self.url = f"{config.scheme}://127.0.0.1:{self.port}"
        ssl_context = server_ssl_context(config)
        self.app = init_app(config)
        self._state_key = STATE
        self.loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2)
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=ssl_context)
            self.loop.run_until_complete(site.start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        assert ready.wait(60), "server did not start"

    @property
    def state(self):  # type: ignore[no-untyped-def]
        return self.app[self._state_key]

    def stop(self) -> None:
        """Graceful shutdown (the app saves the tail); a second call does nothing."""
        if not self.thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator:
    """start_server(artifacts, **ServerConfig fields) -> RunningServer; all stopped at teardown."""
    from runtime_server.config import ServerConfig

    servers: list[RunningServer] = []

    def start(artifacts: Path, **kw) -> RunningServer:  # type: ignore[no-untyped-def]
        kw.setdefault("state_dir", tmp_path / f"server-state-{len(servers)}")
        kw.setdefault("device", "cpu")
        kw.setdefault("port", 0)
        server = RunningServer(ServerConfig(artifacts=artifacts, **kw))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def quick_server(small_export, tmp_path, request):  # type: ignore[no-untyped-def]
    """`dpa serve` with short transfer deadlines: 2 s plus the bytes at the rate given (KiB/s; 256 default)."""
    rate = getattr(request, "param", 256)
    port = free_port()
    args = ["serve", "--artifacts", str(small_export), "--port", str(port), "--device", "cpu", "--no-auth"]
    args += ["--state-dir", str(tmp_path / "state"), "--transfer-base-s", "2", "--min-transfer-kib-s", str(rate)]
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed with the process
    cmd = [sys.executable, "-m", "dpa.cli.app", *args]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wait_until_healthy(f"http://127.0.0.1:{port}", server, timeout_s=60)
    yield port, server
    server.send_signal(signal.SIGTERM)
    server.wait(60)
