"""``dpa web-device``: serve the browser device's page, the export's head and (for tests) built-in faces.

This is the device side of a browser device (issue 24), not the edge server: the page it serves reads the
person's images and releases only what ``dpa client --release class-sums`` releases (docs/web_device.md).
It is kept apart from ``dpa serve`` on purpose: an untrusted edge server that served the page could serve
a page that sends the images themselves. So this small static server runs where the device's owner trusts
it (the same machine, or their own web host), and the page calls the edge server across origins, which the
operator allows with ``dpa serve --allow-origin``.

What it serves, and nothing else: the page's own files (``runtime_web/static``); the onnxruntime-web
bundle and its WASM from the npm package the repo pins (``runtime_web/package-lock.json``, installed by
``.ci/install-web``: no CDN); ``manifest.json`` and the head's files the manifest lists (the page checks
each against its SHA-256); and, with ``faces``, a folder of built-in faces split as a Python device splits
them (the enrolment images and the held-out ones to recognise).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from dpa.contract.errors import UserError
from dpa.contract.manifest import load_manifest
from dpa.faces.lfw import index_faces, split_faces
from dpa.privacy.mechanism import DPConfig
from dpa.privacy.release_plan import plan_releases

__all__ = ["WebDeviceConfig", "web_app", "ORT_DIST", "PROVIDERS", "STATIC"]

STATIC = Path(__file__).resolve().parent / "static"
ORT_DIST = Path(__file__).resolve().parent / "node_modules" / "onnxruntime-web" / "dist"
#: The onnxruntime-web files the page loads: the standard builds (the head runs as inference graphs, its
#: backward too: head/gradient_model.onnx), not the training build, which stopped at 1.19.2. The WASM build,
#: and the WebGPU build (WebGPU with WASM beside it, on its JSEP runtime) where the page runs on WebGPU.
_ORT_FILES = (
    "ort.wasm.min.mjs",
    "ort-wasm-simd-threaded.mjs",
    "ort-wasm-simd-threaded.wasm",
    "ort.webgpu.min.mjs",
    "ort-wasm-simd-threaded.jsep.mjs",
    "ort-wasm-simd-threaded.jsep.wasm",
)
#: The page's execution providers (docs/web_device.md): auto = WebGPU where the browser has an adapter, else
#: WebAssembly; wasm; webgpu (refused with a message where the browser has none).
PROVIDERS = ("auto", "wasm", "webgpu")
_PAGE_FILES = ("device.js", "dpa_step.js", "privacy.js", "wire.js", "npy.js", "npz.js", "page.css")
_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".css": "text/css",
          ".html": "text/html", ".json": "application/json", ".npy": "application/octet-stream"}  # fmt: skip


@dataclass(frozen=True)
class WebDeviceConfig:
    artifacts: Path
    server: str = ""  # the edge server's base URL the page starts with (the person may change it)
    faces: Path | None = None  # built-in faces (LFW layout) the page may enrol without a folder picker
    test_fraction: float = 0.25  # of each identity's built-in faces held out to recognise, as dpa client splits
    split_seed: int = 0
    epsilon: float = 8.0  # the page's starting whole-run epsilon and delta (the person may change them)
    delta: float = 1e-5
    test_hooks: bool = False  # expose the noiseless sums to the page's state (tests only)
    provider: str = "auto"  # the page's execution provider (PROVIDERS)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0 and 0 < self.delta < 1):
            raise UserError(f"the page needs epsilon > 0 and delta in (0, 1), got {self.epsilon}, {self.delta}")
        if self.provider not in PROVIDERS:
            raise UserError(f"the page's provider must be one of {', '.join(PROVIDERS)}, got {self.provider!r}")
        if not 0 < self.test_fraction < 1:
            raise UserError(f"test fraction must be in (0, 1), got {self.test_fraction}")
        if not (ORT_DIST / _ORT_FILES[0]).is_file():
            raise UserError(f"onnxruntime-web is not installed ({ORT_DIST} is missing): run .ci/install-web")


def _file(path: Path) -> web.FileResponse:
    return web.FileResponse(path, headers={"Content-Type": _TYPES.get(path.suffix, "application/octet-stream"),
                                           "Cache-Control": "no-store"})  # fmt: skip


def web_app(cfg: WebDeviceConfig) -> web.Application:
    manifest = load_manifest(cfg.artifacts, verify=("head",))  # a wrong or altered export stops here
    raw = json.loads((cfg.artifacts / "manifest.json").read_text())
    head_files = {p for p in raw["files"] if p.startswith("head/")}
    enrol: dict[str, list[str]] = {}
    probe: list[dict[str, str]] = []
    faces: dict[str, Path] = {}
    if cfg.faces is not None:
        train, test = split_faces(index_faces(cfg.faces, min_faces_per_person=2), test_fraction=cfg.test_fraction,
                                  seed=cfg.split_seed)  # fmt: skip
        for index, into_probe in ((train, False), (test, True)):
            for path, label in zip(index.paths, index.labels, strict=True):
                rel = Path(path).relative_to(cfg.faces).as_posix()
                faces[rel] = Path(path)
                if into_probe:
                    probe.append({"url": f"/faces/{rel}", "identity": index.names[label]})
                else:
                    enrol.setdefault(index.names[label], []).append(f"/faces/{rel}")
    page_config = {"server": cfg.server, "epsilon": cfg.epsilon, "delta": cfg.delta, "test_hooks": cfg.test_hooks,
                   "builtin": f"{len(enrol)} identities from {cfg.faces.name}" if cfg.faces else None,
                   "num_classes": manifest.num_classes, "provider": cfg.provider}  # fmt: skip

    async def index_page(_: web.Request) -> web.StreamResponse:
        return _file(STATIC / "index.html")

    async def page_file(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in _PAGE_FILES:
            raise web.HTTPNotFound()
        return _file(STATIC / name)

    async def ort_file(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in _ORT_FILES:
            raise web.HTTPNotFound()
        return _file(ORT_DIST / name)

    async def artifact(request: web.Request) -> web.StreamResponse:
        rel = request.match_info["path"]
        if rel != "manifest.json" and rel not in head_files:
            raise web.HTTPNotFound()  # the tail and anything else in the folder are not the device's
        return _file(cfg.artifacts / rel)

    async def config_json(_: web.Request) -> web.Response:
        return web.json_response(page_config, headers={"Cache-Control": "no-store"})

    async def plan(request: web.Request) -> web.Response:
        """DP-A's plan for the page: the noise for a whole-run budget over ``releases`` releases of each
        example, labels inside, by the device's own accountant (``dpa.privacy.release_plan``, PLD)."""
        return web.json_response(_plan(request.query), headers={"Cache-Control": "no-store"})

    async def faces_index(_: web.Request) -> web.Response:
        if cfg.faces is None:
            raise web.HTTPNotFound()
        return web.json_response({"enrol": enrol, "probe": probe})

    async def face(request: web.Request) -> web.StreamResponse:
        path = faces.get(request.match_info["path"])
        if path is None:
            raise web.HTTPNotFound()
        return _file(path)

    app = web.Application()
    app.router.add_get("/", index_page)
    app.router.add_get("/config.json", config_json)
    app.router.add_get("/static/{name}", page_file)
    app.router.add_get("/ort/{name}", ort_file)
    app.router.add_get("/artifacts/{path:.+}", artifact)
    app.router.add_get("/plan", plan)
    app.router.add_get("/faces/index.json", faces_index)
    app.router.add_get("/faces/{path:.+}", face)
    return app


def _plan(query: Mapping[str, str]) -> dict[str, object]:
    try:
        eps, delta, clip = float(query["epsilon"]), float(query["delta"]), float(query["clip"])
        releases, label_eps = int(query["releases"]), float(query["label_epsilon"])
        planned = plan_releases(DPConfig(clip=clip, epsilon=None, delta=delta), total_epsilon=eps, releases=releases,
                                label_epsilon=label_eps)  # fmt: skip
        planned.accountant.record(releases)
    except (KeyError, ValueError, UserError) as exc:
        raise web.HTTPBadRequest(text=f"no plan: {exc}") from None
    return {"noise_multiplier": planned.dp.noise_multiplier, "sigma": planned.dp.noise_std,
            "epsilon": planned.accountant.epsilon, "delta": delta, "label_epsilon": label_eps, "releases": releases,
            "clip": clip}  # fmt: skip
