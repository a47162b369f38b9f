"""The browser device (issue 24): the real `dpa serve` and `dpa web-device` processes, headless Chromium on the
page, onnxruntime-web running the export's head. The page's release is checked against the Python device on
the same images, its noise against 2zC, its epsilon against dpa.privacy, its recognition against the Python
device's with the same templates; every bad input gets a message and sends nothing."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from dpa.contract.architecture import ArchConfig
from dpa.contract.devices import DeviceProfile, resolve_device
from dpa.contract.manifest import OptimizerConfig, load_manifest
from dpa.contract.wire import decode
from dpa.faces.lfw import index_faces, load_batch, split_faces
from dpa.faces.synth import SynthConfig, cached_faces
from dpa.privacy.accountant import epsilon_spent
from dpa.privacy.calibration import gaussian_sigma
from dpa.privacy.class_sums import contributions
from dpa.privacy.clipping import clip_factors, l2_norms, scale_examples
from dpa.runs.loopback import free_port, wait_until_healthy
from dpa.runs.shipped_weights import SHIPPED_WEIGHTS
from runtime_client.head import HeadModel
from runtime_client.on_device import template_scores
from tests.browser import Browser

ARCH = ArchConfig(image_size=64, width=0.25, num_classes=6, dropout=0.0)
REPO = Path(__file__).resolve().parents[2]
TOKEN = "web-device-test-token-0123456789"


def _export(root: Path) -> Path:
    from exporter.export import ExportConfig, export
    from exporter.pretrain import PRETRAIN_PIXEL_STD, public_faces

    centre = public_faces(root / "public", 6, 4, 64)
    out = root / "artifacts"
    export(ExportConfig(arch=ARCH, cut="fc7", optimizer=OptimizerConfig(lr=0.01), out=out, weights=SHIPPED_WEIGHTS,
                        pixel_std=PRETRAIN_PIXEL_STD, centre_faces=centre, seed=0))  # fmt: skip
    return out


def _start(args: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dpa.cli.app", *args]
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip


def _get(url: str, token: str = TOKEN) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _python_device(artifacts: Path, train, test, clip: float):
    """What the Python device computes on the same images: the noiseless (K, d + 1) totals, and a scorer."""
    manifest = load_manifest(artifacts)
    head = HeadModel(artifacts, manifest, resolve_device(DeviceProfile.CPU))

    def clipped(index):
        x = load_batch(list(index.paths), size=64, mean=manifest.pixel_mean, std=manifest.pixel_std)
        a = head.forward(x)
        return scale_examples(a, clip_factors(l2_norms(a), clip=clip))

    totals = contributions(clipped(train), train.labels.astype(np.int64), manifest.num_classes, clip)
    return totals, clipped(test)


def _wait_for_page(origin: str, web: subprocess.Popen, log: Path) -> None:
    """Until ``dpa web-device`` answers at ``origin``; its log if it exits or a minute passes."""
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{origin}/config.json", timeout=5)
            return
        except OSError:
            if web.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log.read_text()) from None
            time.sleep(0.1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if shutil.which("chromium") is None or not (REPO / "runtime_web/node_modules/onnxruntime-web").is_dir():
        pytest.fail(
            "the web device needs Chromium and onnxruntime-web: run .ci/install-web (the README's test command)"
        )
    root = tmp_path_factory.mktemp("web")
    artifacts = _export(root)
    faces = cached_faces(root / "device", SynthConfig(identities=6, per_identity=8, size=64, seed=0))
    tokens = root / "tokens.txt"
    tokens.write_text(f"phone {TOKEN}\n")
    tokens.chmod(0o600)
    web_port, edge_port = free_port(), free_port()
    origin = f"http://127.0.0.1:{web_port}"
    serve = [
        "serve",
        "--artifacts",
        str(artifacts),
        "--port",
        str(edge_port),
        "--device",
        "cpu",
        "--tokens",
        str(tokens),
    ]
    edge = _start([*serve, "--state-dir", str(root / "edge"), "--allow-origin", origin], root / "serve.log")
    web = _start(["web-device", "--artifacts", str(artifacts), "--server", f"http://127.0.0.1:{edge_port}", "--port",
                  str(web_port), "--faces", str(faces), "--test-hooks"], root / "web.log")  # fmt: skip
    wait_until_healthy(f"http://127.0.0.1:{edge_port}", edge, timeout_s=60)
    _wait_for_page(origin, web, root / "web.log")
    yield {"root": root, "artifacts": artifacts, "faces": faces, "origin": origin,
           "edge": f"http://127.0.0.1:{edge_port}"}  # fmt: skip
    for proc in (web, edge):
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def _nothing_sent(edge: str, root: Path) -> None:
    status, body = _get(f"{edge}/v1/status")
    assert status == 200 and json.loads(body)["sessions"] == 0
    reply = decode(_get(f"{edge}/v1/templates")[1])  # no release of any kind yet: empty templates
    assert reply.meta["class_sum_releases"] == 0 and not reply.tensors["counts"].any()
    assert not list((root / "edge").glob("class_sums/*.npz"))


def _bad_folders(root: Path, faces: Path) -> tuple[Path, Path]:
    """Two folders a person might pick: an identity with one image; an image that does not decode."""
    names = sorted(p.name for p in faces.iterdir())
    lonely = root / "lonely"
    for name, count in ((names[0], 3), (names[1], 1)):
        (lonely / name).mkdir(parents=True, exist_ok=True)
        for img in sorted((faces / name).iterdir())[:count]:
            shutil.copy(img, lonely / name / img.name)
    broken = root / "broken"
    shutil.copytree(lonely / names[0], broken / names[0], dirs_exist_ok=True)
    (broken / names[0] / "not_a_face.jpg").write_bytes(b"this is not a JPEG")
    return lonely, broken


async def _session(s: dict, other_edge: str) -> dict:
    root, edge = s["root"], s["edge"]
    async with Browser(root / "profile") as b:
        await b.goto(s["origin"] + "/")
        await b.wait_for("document.body.dataset.ready === 'yes'")
        # Bad input: a message each, and nothing sent.
        lonely, broken = _bad_folders(root, s["faces"])
        await b.set_files("#folder", [lonely])
        lonely_name = sorted(p.name for p in lonely.iterdir())[1]
        assert await b.click("prepare") == ("error", f"identity {lonely_name} has 1 image; each needs at least 2")
        await b.set_files("#folder", [broken])
        kind, text = await b.click("prepare")
        assert kind == "error" and text.startswith("cannot decode image broken/") and "not_a_face.jpg" in text
        await b.fill("folder", "")  # back to the built-in faces
        kind, text = await b.click("prepare")
        assert kind == "ok", text
        assert await b.click("send") == ("error", "enter this device's token (dpa token add on the server's machine)")
        await b.fill("token", "a-wrong-token-of-enough-length")
        kind, text = await b.click("send")
        assert kind == "error" and text.startswith("the edge server answered 401 to status (unauthorized")
        await b.fill("token", TOKEN)
        await b.fill("server", f"http://127.0.0.1:{free_port()}")
        kind, text = await b.click("send")
        assert kind == "error" and text.startswith("cannot reach the edge server at http://127.0.0.1:")
        await b.fill("server", other_edge)
        kind, text = await b.click("send")
        assert kind == "error" and text.startswith("the server does not know this head: it serves manifest ")
        _nothing_sent(edge, root)
        # The release: prepared (the epsilon shown first), sent once, templates back, recognition on the page.
        await b.fill("server", edge)
        kind, text = await b.click("prepare")
        assert kind == "ok", text
        shown = await b.js("document.getElementById('privacy').textContent")
        out = {"prepared": await b.js("({...window.dpa.prepared, sums: null, counts: null})"), "shown": shown,
               "noiseless": await b.js("window.dpa.noiseless")}  # fmt: skip
        kind, text = await b.click("send")
        assert kind == "ok" and "1 release(s) on the server" in text, text
        assert await b.click("send") == (
            "error",
            "this page has released already: a second draw of noise would be a second privacy cost",
        )
        assert (await b.click("recognise"))[0] == "ok"
        out["recognised"] = await b.js("window.dpa.recognised")
        await b.screenshot(root / "web_device.png")
        out["normals"] = await b.js("import('/static/privacy.js').then((m) => Array.from(m.secureNormals(20001)))")
    return out


def test_the_page_enrols_in_a_real_browser_as_the_python_device_does(setup, small_export, start_server):
    s = setup
    other = start_server(small_export, allow_origins=(s["origin"],), tokens=None)  # another export's server
    page = asyncio.run(_session(s, other.url))
    p, noiseless = page["prepared"], page["noiseless"]
    manifest = load_manifest(s["artifacts"])
    clip = manifest.release_clip
    d = manifest.activation_numel
    # The epsilon on the page before anything is sent: the analytic Gaussian at the page's z, as dpa.privacy has it.
    assert p["z"] == pytest.approx(gaussian_sigma(epsilon=8.0, delta=1e-5, sensitivity=1.0), rel=1e-6)
    assert p["epsilon"] == pytest.approx(8.0, rel=1e-6) and "epsilon 8.0000, delta 0.00001" in page["shown"]
    pld = epsilon_spent(mechanism="gaussian", noise_multiplier=p["z"], releases=1, delta=1e-5)
    assert 8.0 <= pld <= 8.0 * 1.002  # the PLD accountant, an upper bound, agrees to its discretisation
    assert p["sigma"] == pytest.approx(2 * p["z"] * clip, rel=1e-12) and p["clip"] == pytest.approx(clip)
    # The same images as the Python device (the web device splits the built-in faces as dpa client does).
    train, test = split_faces(index_faces(s["faces"], min_faces_per_person=2), test_fraction=0.25, seed=0)
    totals, test_clipped = _python_device(s["artifacts"], train, test, clip)
    js_totals = np.asarray(noiseless["totals"]).reshape(totals.shape)
    np.testing.assert_allclose(js_totals, totals, rtol=1e-4, atol=1e-4 * np.abs(totals).max())
    # The noise: N(0, (2zC)^2) on every element, on the release grid.
    noise = (np.asarray(noiseless["noisy"]) - js_totals.ravel()) / p["sigma"]
    n = noise.size
    assert abs(noise.std() - 1) < 5 / np.sqrt(2 * n) and abs(noise.mean()) < 5 / np.sqrt(n)
    assert stats.kstest(noise, "norm").pvalue > 1e-4
    step = 2.0 ** (np.frexp(p["sigma"])[1] - 13)
    assert np.all(np.asarray(noiseless["noisy"]) / step == np.round(np.asarray(noiseless["noisy"]) / step))
    normals = np.asarray(page["normals"])
    assert abs(normals.std() - 1) < 5 / np.sqrt(2 * normals.size) and stats.kstest(normals, "norm").pvalue > 1e-4
    # The server kept exactly one release: the page's, byte for byte the noisy sums it showed.
    releases = list((s["root"] / "edge").glob("class_sums/*.npz"))
    assert len(releases) == 1
    status, body = _get(f"{s['edge']}/v1/templates")
    reply = decode(body)
    assert status == 200 and reply.meta["class_sum_releases"] == 1
    templates, counts = reply.tensors["templates"], reply.tensors["counts"]
    noisy = np.asarray(noiseless["noisy"]).reshape(totals.shape)
    want_counts = np.maximum(np.rint((noisy[:, -1] / clip).astype(np.float32)), 0)
    np.testing.assert_array_equal(counts, want_counts.astype(np.int64))
    np.testing.assert_allclose(templates.reshape(len(counts), d) * counts[:, None],
                               noisy[:, :-1].astype(np.float32), rtol=1e-5, atol=1e-3)  # fmt: skip
    # Recognition on the page equals the Python device's with the same templates.
    python_labels = template_scores(test_clipped, templates, counts).argmax(axis=1)
    assert [r["label"] for r in page["recognised"]] == python_labels.tolist()
    assert [r["image"].split("/")[-2] for r in page["recognised"]] == [Path(x).parent.name for x in test.paths]
    # The page is looked at: the screenshot after enrolment and recognition (docs/img/web_device.png).
    shot = (s["root"] / "web_device.png").read_bytes()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000
    if os.environ.get("DPA_DOCS_SCREENSHOT"):
        (REPO / "docs/img/web_device.png").write_bytes(shot)


def test_the_edge_server_allows_only_the_named_origin(setup):
    """CORS: the page's origin gets the headers (and its preflight an answer); any other origin gets none."""
    edge = setup["edge"]
    for origin, allowed in ((setup["origin"], True), ("http://evil.example", False)):
        request = urllib.request.Request(f"{edge}/v1/sessions", method="OPTIONS", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                headers, status = reply.headers, reply.status
        except urllib.error.HTTPError as exc:
            headers, status = exc.headers, exc.code
        assert (headers.get("Access-Control-Allow-Origin") == origin) is allowed
        assert (status == 204) is allowed  # a foreign preflight is not answered as one (the token check refuses it)
        request = urllib.request.Request(f"{edge}/v1/status", headers={"Origin": origin, "Authorization": "Bearer x"})
        try:
            urllib.request.urlopen(request, timeout=30)
        except urllib.error.HTTPError as exc:  # 401 (a wrong token) still tells the allowed page why
            assert exc.code == 401 and (exc.headers.get("Access-Control-Allow-Origin") == origin) is allowed


_PAGE_GRADIENTS = """(async () => {
  const d = window.dpa, m = d.manifest, index = await (await fetch('/faces/index.json')).json();
  const urls = Object.values(index.enrol).flat().slice(0, 4);
  const per = 3 * m.image_size ** 2, images = new Float32Array(urls.length * per);
  for (const [i, url] of urls.entries()) {
    images.set(await d.preprocess(await d.blobOf({ url, name: url }), url), i * per);
  }
  const numel = m.activation_shape.reduce((a, b) => a * b, 1);
  const up = Float32Array.from({ length: urls.length * numel }, (_, k) => Math.fround(Math.sin(0.37 * k)));
  const g = await d.headGradients(images, urls.length, up);
  const grads = Object.entries(g).map(([k, v]) => [k, { shape: v.shape, data: Array.from(v.data) }]);
  return { images: Array.from(images), upstream: Array.from(up), grads: Object.fromEntries(grads) };
})()"""


def test_the_page_computes_the_heads_gradients_as_the_python_device(setup):
    """The page on onnxruntime-web's standard build (no training build) runs the export's gradient graph: its
    parameter gradients for a batch and an upstream gradient equal the Python device's (HeadModel.accumulate,
    plain onnxruntime) on the same images to 1e-4."""

    async def run() -> dict:
        async with Browser(setup["root"] / "profile-gradients") as b:
            await b.goto(setup["origin"] + "/")
            await b.wait_for("document.body.dataset.ready === 'yes'")
            return await b.js(_PAGE_GRADIENTS)

    page = asyncio.run(run())
    manifest = load_manifest(setup["artifacts"])
    head = HeadModel(setup["artifacts"], manifest, resolve_device(DeviceProfile.CPU))
    images = np.asarray(page["images"], dtype=np.float32).reshape(4, 3, manifest.image_size, manifest.image_size)
    upstream = np.asarray(page["upstream"], dtype=np.float32).reshape(4, *manifest.activation_shape)
    head.accumulate(images, upstream)
    assert set(page["grads"]) == set(head._grads) and len(head._grads) > 2
    for name, want in head._grads.items():
        got = np.asarray(page["grads"][name]["data"], dtype=np.float32).reshape(page["grads"][name]["shape"])
        assert got.shape == want.shape and np.abs(want).max() > 0, name
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=name)


async def _dpa_session(s: dict) -> dict:
    async with Browser(s["root"] / "profile-dpa") as b:
        await b.goto(s["origin"] + "/")
        await b.wait_for("document.body.dataset.ready === 'yes'")
        assert await b.click("train-dpa") == (
            "error",
            "plan the training first: its epsilon is shown before anything is sent",
        )
        await b.fill("epochs", "0")
        assert await b.click("plan-dpa") == ("error", 'epochs must be a whole number >= 1, got "0"')
        await b.fill("epochs", "1")
        kind, text = await b.click("plan-dpa")
        assert kind == "ok", text
        shown = await b.js("document.getElementById('dpa-privacy').textContent")
        before = json.loads(_get(f"{s['edge']}/v1/status")[1])["global_step"]  # planned: nothing sent yet
        await b.fill("server", s["edge"])
        await b.fill("token", TOKEN)
        kind, text = await b.click("train-dpa")
        assert kind == "ok", text
        page = await b.js("({plan: window.dpa.dpa.plan, steps: window.dpa.dpa.steps, first: window.dpa.dpa.first, "
                          "session: window.dpa.dpa.session, images: window.dpa.dpa.images.length})")  # fmt: skip
    return {**page, "shown": shown, "before": before}


def test_the_page_trains_the_head_by_dpa_as_the_python_device_does(setup):
    """DP-A in the page: the whole run's epsilon shown before anything is sent (the device's own accountant),
    per-example releases with the page's noise, the server's steps, and on the first step the head's
    gradients equal the Python device's (the clipping's VJP and the gradient graph) on the same images and
    the same server reply, to 1e-4."""
    from dpa.privacy.mechanism import DPActivations, DPConfig

    page = asyncio.run(_dpa_session(setup))
    plan, first = page["plan"], page["first"]
    assert "epsilon 8.0000, delta 0.00001 for the whole run, labels at 4 inside" in page["shown"]
    assert plan["epsilon"] <= 8.0 + 1e-9 and plan["releases"] == 1 and plan["label_epsilon"] == 4.0
    assert page["steps"] == -(-page["images"] // 8)
    status = json.loads(_get(f"{setup['edge']}/v1/status")[1])
    assert status["global_step"] == page["before"] + page["steps"]
    session = json.loads(_get(f"{setup['edge']}/v1/sessions/{page['session']}")[1])
    assert session["labels"] == {"mechanism": "rr-with-prior", "epsilon": 4.0} and session["step"] == page["steps"]
    manifest = load_manifest(setup["artifacts"])
    head = HeadModel(setup["artifacts"], manifest, resolve_device(DeviceProfile.CPU))
    batch = len(first["rows"])
    images = np.asarray(first["images"], dtype=np.float32).reshape(batch, 3, manifest.image_size, manifest.image_size)
    dp = DPActivations(DPConfig(clip=plan["clip"], epsilon=None, delta=1e-5,
                                fixed_noise_multiplier=plan["noise_multiplier"]), np.random.default_rng(0))  # fmt: skip
    ctx = dp.context(head.forward(images))
    assert first["scale"] == pytest.approx(ctx.scale, rel=1e-9)
    # The release: each example clipped to C, plus N(0, sigma^2) drawn in the page, times the public scale.
    clipped = scale_examples(ctx.activation, ctx.factors).reshape(batch, -1)
    noise = (np.asarray(first["release"]).reshape(batch, -1) / first["scale"] - clipped) / plan["sigma"]
    assert abs(noise.std() - 1) < 5 / np.sqrt(2 * noise.size) and stats.kstest(noise.ravel(), "norm").pvalue > 1e-4
    gradient = np.asarray(first["gradient"], dtype=np.float32).reshape(batch, *manifest.activation_shape)
    head.accumulate(images, dp.backward(ctx, gradient))
    assert set(first["grads"]) == set(head._grads)
    for name, want in head._grads.items():
        got = np.asarray(first["grads"][name], dtype=np.float32).reshape(want.shape)
        assert np.abs(want).max() > 0, name
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=name)


def test_the_page_runs_where_its_provider_is_and_refuses_a_missing_one(setup):
    """auto: WebGPU where the browser has an adapter, else WebAssembly, and the page says which ran; a page
    started for WebGPU in a browser without it (headless Chromium, --disable-gpu) refuses, saying how to go on."""
    port = free_port()
    web = _start(["web-device", "--artifacts", str(setup["artifacts"]), "--port", str(port), "--provider", "webgpu"],
                 setup["root"] / "web-webgpu.log")  # fmt: skip

    async def run() -> tuple[str, str, str]:
        async with Browser(setup["root"] / "profile-provider") as b:
            await b.goto(setup["origin"] + "/")
            await b.wait_for("document.body.dataset.ready === 'yes'")
            auto = await b.js("window.dpa.provider + ' | ' + document.getElementById('head').textContent")
            await b.goto(f"http://127.0.0.1:{port}/")
            await b.wait_for("document.getElementById('status').className === 'error'")
            status = await b.js("document.getElementById('status').textContent")
            ready = await b.js("document.body.dataset.ready")
            return auto, status, ready

    try:
        _wait_for_page(f"http://127.0.0.1:{port}", web, setup["root"] / "web-webgpu.log")
        auto, status, ready = asyncio.run(run())
    finally:
        web.send_signal(signal.SIGTERM)
        web.wait(60)
    provider, head = auto.split(" | ")
    assert provider.startswith("wasm (") and head.endswith(f"on {provider}")
    assert status.startswith("this page was started to run on WebGPU, but ") and "--provider auto or wasm" in status
    assert ready == "no"
