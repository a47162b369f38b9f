"""A headless Chromium driven over the DevTools protocol (CDP), for the web device's tests (issue 24).

Debian's ``chromium`` (installed by ``.ci/install-web``) with a fresh profile, a DevTools port of its own
choosing, and the flags that keep a headless browser from calling home. The protocol is a JSON message
per WebSocket frame (``{"id", "method", "params"}`` answered by ``{"id", "result" | "error"}``), spoken here
with aiohttp's client: no Node, no browser download.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-port=0", "--remote-allow-origins=*"]  # fmt: skip


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("Chromium is not installed: run .ci/install-web (Debian's chromium package)")
    return path


class Browser:
    """One Chromium process and one page; ``async with Browser(profile) as b: await b.goto(url)``."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self._ids = itertools.count(1)

    async def __aenter__(self) -> Browser:
        self.process = subprocess.Popen([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (active.is_file() and len(active.read_text().split()) >= 2):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("Chromium did not open its DevTools port")
            await asyncio.sleep(0.1)
        port = int(active.read_text().split()[0])
        self.http = aiohttp.ClientSession()
        async with self.http.get(f"http://127.0.0.1:{port}/json/list") as reply:
            page = next(t for t in await reply.json() if t["type"] == "page")
        self.ws = await self.http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.call("Emulation.setDeviceMetricsOverride", width=1100, height=900, deviceScaleFactor=1, mobile=False)
        await self.call("Page.enable")
        await self.call("Runtime.enable")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        await self.http.close()
        self.process.terminate()
        self.process.wait(30)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        mid = next(self._ids)
        await self.ws.send_str(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive(timeout=300)).data)
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited), or the page's exception."""
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 120) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{expression} stayed false for {timeout_s} s; page status: {await self.status()}")

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'")

    async def status(self) -> tuple[str, str]:
        return tuple(await self.js("[document.getElementById('status').className, "
                                   "document.getElementById('status').textContent]"))  # fmt: skip

    async def click(self, button: str) -> tuple[str, str]:
        """Click a button and wait until the page has answered; (status class, status text)."""
        await self.js(f"document.getElementById('{button}').disabled = false")
        await self.js(f"document.body.dataset.busy = 'yes'; document.getElementById('{button}').click()")
        await self.wait_for("document.body.dataset.busy === 'no'", timeout_s=300)
        return await self.status()

    async def set_files(self, selector: str, files: list[Path]) -> None:
        """Give a file input these files (or folders) and wait for its ``change`` event: Chromium lists a
        folder for a ``webkitdirectory`` input after the call returns, and a click before that still
        sees the input's previous files (seen once: the page answered for the folder picked before)."""
        listen = "addEventListener('change', () => { window.__dpaFilesChanged = true; }, { once: true })"
        await self.js(f"window.__dpaFilesChanged = false; document.querySelector({json.dumps(selector)}).{listen}")
        doc = await self.call("DOM.getDocument")
        node = await self.call("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector=selector)
        await self.call("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[str(f) for f in files])
        await self.wait_for("window.__dpaFilesChanged === true")

    async def fill(self, field: str, value: str) -> None:
        await self.js(f"document.getElementById('{field}').value = {json.dumps(value)}")

    async def screenshot(self, path: Path) -> None:
        data = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(data["data"]))
