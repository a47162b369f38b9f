"""``dpa bench``: the device and edge figures against torch eager, measured in one run.

Every ratio is ours / torch on the same machine, the same weights and the same batch,
so a ratio below 1 means dpa is faster. Timings are medians over repeats after a
warm-up, ours and torch's taken in turns. torch is a reference here (imported
lazily); the measured paths are the deployed ones: onnxruntime artifacts, the DP-A
mechanism, the wire format and the real aiohttp server on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import torch

from dpa.base.atomic import atomic_write_bytes
from dpa.base.cpu import cpu_info
from dpa.base.timing import median_seconds, timed
from dpa.contract import messages, wire
from dpa.contract.architecture import ArchConfig
from dpa.contract.devices import resolve_device
from dpa.contract.manifest import GraphNames, OptimizerConfig, load_manifest, manifest_sha256
from dpa.contract.messages import Route, SessionField, route
from dpa.contract.ort_training import CheckpointState, Module, Optimizer, ort_version, session_options
from dpa.faces.lfw import load_batch
from dpa.faces.synth import SynthConfig, write_synthetic_faces
from dpa.privacy.mechanism import DPActivations, DPConfig
from dpa.runs.device_cost import forward_cost
from dpa.runs.loopback import free_port, wait_until_healthy
from exporter.export import ExportConfig, export
from exporter.vggface import build_parts, init_weights
from runtime_client.edge import EdgeClient
from runtime_client.head import HeadModel
from runtime_client.split_step import SplitTrainer
from runtime_server.journal import Journal
from runtime_server.tail import CHECKPOINT_NAME, TailModel

__all__ = ["BenchConfig", "CONFIGS", "run_bench"]


@dataclass(frozen=True)
class BenchConfig:
    name: str
    arch: ArchConfig
    cut: str = "conv1_1"  # the seed's cut
    batch: int = 8  # the seed's batch size
    repeats: int = 5  # timed repeats per figure (median reported)
    clients: tuple[int, ...] = (1, 4, 16)  # concurrency levels for server throughput
    steps_per_client: int = 4  # train steps each concurrent client sends


CONFIGS = {
    # The seed's configuration: VGG-Face as published, cut after conv1_1, batch 8.
    "paper": BenchConfig(
        "paper", ArchConfig(image_size=224, width=1.0, num_classes=2622, dropout=0.0), repeats=5, steps_per_client=1
    ),
    # A CPU-sized network for quick comparisons.
    "small": BenchConfig(
        "small", ArchConfig(image_size=64, width=0.25, num_classes=10, dropout=0.0), repeats=7, steps_per_client=8
    ),
}


#: Pause after a split step before torch is timed, so the server's disk writes are done (they take 0.1-0.3 s).
_SETTLE_S = 1.0


def _paired_medians(ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median seconds of ``ours`` and of ``theirs``, timed in turns after one warm-up each.

    In turns, not one series after the other: this VM's speed drifts by 10-15% over a
    minute (torch's tail step measured 3.4 s in one run and 4.05 s in another), and
    alternating puts both sides of a ratio in the same drift.
    """
    ours(), theirs()  # warm-up: allocations, kernel selection
    pairs = [(timed(ours), timed(theirs)) for _ in range(repeats)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def _export(cfg: BenchConfig, out: Path) -> Path:

    export(ExportConfig(arch=cfg.arch, cut=cfg.cut, optimizer=OptimizerConfig(lr=1e-3), out=out, verify=False))
    return out


def _head_and_tail_ratios(cfg: BenchConfig, artifacts: Path, report: dict[str, Any]) -> Callable[[], None]:
    """1. and 2.; returns the monolithic torch train step, which the split step is timed against."""
    device = resolve_device("cpu")
    rng = np.random.default_rng(0)
    size = cfg.arch.image_size
    images = rng.standard_normal((cfg.batch, 3, size, size), dtype=np.float32)
    labels = rng.integers(0, cfg.arch.num_classes, cfg.batch)
    head, tail = build_parts(cfg.arch, cfg.cut)
    init_weights((head, tail), 0)
    torch.set_num_threads(device.threads)
    x = torch.from_numpy(images)
    _head_ratio(cfg, artifacts, report, images, head, rng)
    activation = np.ascontiguousarray(head(x).detach().numpy())
    _tail_ratio(cfg, artifacts, report, activation, labels, tail)

    # Monolithic torch train step of the whole network: the reference of the split step.
    fopt = torch.optim.SGD(list(head.parameters()) + list(tail.parameters()), lr=1e-3)
    tl = torch.from_numpy(labels)

    def torch_full() -> None:
        loss = torch.nn.functional.cross_entropy(tail(head(x)), tl)
        fopt.zero_grad()
        loss.backward()
        fopt.step()

    return torch_full


def _head_ratio(
    cfg: BenchConfig, artifacts: Path, report: dict[str, Any], images: np.ndarray, head: Any,
    rng: np.random.Generator,
) -> None:  # fmt: skip
    """1. Device head step: forward + clip + noise + backward + optimizer step, against torch's."""
    manifest = load_manifest(artifacts)
    dp_cfg = DPConfig(clip=100.0, epsilon=8.0)
    ours_head = HeadModel(artifacts, manifest, resolve_device("cpu"))
    dp = DPActivations(dp_cfg, np.random.default_rng(1))
    upstream = rng.standard_normal((cfg.batch, *manifest.activation_shape), dtype=np.float32)

    # As SplitTrainer: the release goes into the (reused) request buffer, the VJP into a reused array, and the
    # release's forward keeps what the backward reads (a whole batch: exporter.saved_forward).
    message_slot = np.empty_like(upstream)
    vjp = np.empty_like(upstream)

    def ort_head() -> None:
        _, ctx = dp.release(ours_head.forward(images, keep=True), out=message_slot)
        ours_head.backward_step(images, dp.backward(ctx, upstream, out=vjp))

    opt = torch.optim.SGD(head.parameters(), lr=1e-3)
    x = torch.from_numpy(images)
    g = torch.from_numpy(upstream)
    sigma, clip = dp.noise_scale, dp_cfg.clip

    def torch_head() -> None:
        a = head(x)
        factor = torch.clamp(clip / a.flatten(1).norm(dim=1), max=1.0).view(-1, *([1] * (a.dim() - 1)))
        released = a * factor + sigma * torch.randn_like(a)
        opt.zero_grad()
        released.backward(g)
        opt.step()

    t_ours, t_torch = _paired_medians(ort_head, torch_head, cfg.repeats)
    report["head_step_s"] = {"ours": t_ours, "torch": t_torch}
    report["head_step_ratio"] = t_ours / t_torch


def _tail_ratio(
    cfg: BenchConfig, artifacts: Path, report: dict[str, Any], activation: np.ndarray, labels: np.ndarray, tail: Any
) -> None:
    """2. Edge tail step (onnxruntime-training) vs torch eager on the same tail."""
    options = session_options(resolve_device("cpu").threads)
    state = CheckpointState.load_checkpoint(str(artifacts / "tail" / "checkpoint"))
    module = Module(
        str(artifacts / "tail" / "training_model.onnx"), state, str(artifacts / "tail" / "eval_model.onnx"),
        device="cpu", session_options=options,
    )  # fmt: skip
    optimizer = Optimizer(str(artifacts / "tail" / "optimizer_model.onnx"), module)

    def ort_tail() -> None:
        module.train()
        module(activation, labels)
        optimizer.step()
        module.lazy_reset_grad()

    topt = torch.optim.SGD(tail.parameters(), lr=1e-3)
    ta = torch.from_numpy(activation)
    tl = torch.from_numpy(labels)

    def torch_tail() -> None:
        a = ta.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(tail(a), tl)
        topt.zero_grad()
        loss.backward()  # parameter gradients and d loss / d activation, as the server returns
        topt.step()

    t_ours, t_torch = _paired_medians(ort_tail, torch_tail, cfg.repeats)
    report["tail_step_s"] = {"ours": t_ours, "torch": t_torch}
    report["tail_step_ratio"] = t_ours / t_torch


def _split_device(cfg: BenchConfig, artifacts: Path) -> tuple[np.ndarray, np.ndarray, HeadModel, DPActivations]:
    """What every timed split step sends: a fixed batch, the device's head, its DP-A mechanism."""
    rng = np.random.default_rng(0)
    size = cfg.arch.image_size
    images = rng.standard_normal((cfg.batch, 3, size, size), dtype=np.float32)
    labels = rng.integers(0, cfg.arch.num_classes, cfg.batch).astype(np.int64)
    head = HeadModel(artifacts, load_manifest(artifacts), resolve_device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = DPActivations(DPConfig(clip=100.0, epsilon=8.0), np.random.default_rng(1))
    return images, labels, head, dp


async def _split_and_throughput(
    cfg: BenchConfig, artifacts: Path, report: dict[str, Any], torch_full: Callable[[], None]
) -> None:
    """3. split step over loopback HTTP, in turns with ``torch_full``; 4. wire bytes; 6. server
    throughput with concurrent clients. The server is idle while torch runs."""

    manifest = load_manifest(artifacts)
    digest = manifest_sha256(artifacts)
    with _server_process(artifacts, artifacts.parent / "bench-server") as url:
        images, labels, head, dp = _split_device(cfg, artifacts)
        # The whole batch at once (the default), then streamed one example at a time (--micro-batch 1).
        monolithic: list[float] = []
        for key, micro in (("split_step", None), ("split_step_streamed", 1)):
            async with EdgeClient(url) as edge:
                session = await edge.open_session(digest)
                trainer = SplitTrainer(head, edge, session.session_id, dp, micro_batch=micro)
                await trainer.step(images, labels)  # warm-up
                torch_full()
                times, torch_times = [], []
                for _ in range(cfg.repeats):  # in turns, as _paired_medians
                    t0 = time.perf_counter()
                    await trainer.step(images, labels)
                    times.append(time.perf_counter() - t0)
                    # The server may still be storing the reply (it is not held back without a journal):
                    # torch gets the machine to itself, as the split step had.
                    await asyncio.sleep(_SETTLE_S)
                    torch_times.append(timed(torch_full))
            report[f"{key}_s"] = statistics.median(times)
            report[f"{key}_ratio"] = report[f"{key}_s"] / statistics.median(torch_times)
            monolithic += torch_times
        report["monolithic_torch_step_s"] = statistics.median(monolithic)

        request_tensors, reply_tensors = _step_tensors(manifest, cfg.batch)
        act = request_tensors[GraphNames.ACTIVATION]
        request = wire.encoded_size(request_tensors, messages.train_request_meta(10**9))
        reply = wire.encoded_size(reply_tensors, messages.train_reply_meta(global_step=10**9, step=10**9))
        raw = sum(np.asarray(t).nbytes for t in (*request_tensors.values(), *reply_tensors.values()))
        report["wire_bytes_per_step"] = request + reply
        report["raw_tensor_bytes_per_step"] = raw
        report["wire_overhead_ratio"] = (request + reply) / raw
        # --wire-dtype float16: the release travels as float16, the reply stays float32.
        half_tensors = messages.train_request_tensors(act.astype(np.float16), request_tensors[GraphNames.LABELS])
        half = wire.encoded_size(half_tensors, messages.train_request_meta(10**9))
        report["wire_bytes_per_step_float16"] = half + reply
        report["float16_wire_bytes_ratio"] = (half + reply) / (request + reply)

        report["throughput"] = {}
        for clients in cfg.clients:
            report["throughput"][str(clients)] = await _throughput(
                url, digest, messages.train_request_tensors(act, labels), clients, cfg.steps_per_client
            )


async def _journalled_split(cfg: BenchConfig, artifacts: Path, report: dict[str, Any]) -> None:
    """The whole-batch split step against a server that journals every step before answering it."""
    with _server_process(artifacts, artifacts.parent / "journal-server", journal=True) as url:
        images, labels, head, dp = _split_device(cfg, artifacts)
        async with EdgeClient(url) as edge:
            session = await edge.open_session(manifest_sha256(artifacts))
            trainer = SplitTrainer(head, edge, session.session_id, dp)
            await trainer.step(images, labels)  # warm-up
            times = []
            for _ in range(2 * cfg.repeats):  # more repeats: every 20th step also writes a checkpoint
                t0 = time.perf_counter()
                await trainer.step(images, labels)
                times.append(time.perf_counter() - t0)
        report["split_step_journal_s"] = statistics.median(times)


def _overheads(report: dict[str, Any]) -> None:
    """The fixed cost of a split step: what is neither the head's step nor the tail's (HTTP, the hop to
    the tail process, copies, the commit), as seconds and as a ratio to head + tail."""
    parts = report["head_step_s"]["ours"] + report["tail_step_s"]["ours"]
    for key in ("split_step", "split_step_streamed", "split_step_journal"):
        report[f"{key}_overhead_s"] = report[f"{key}_s"] - parts
        report[f"{key}_over_parts"] = report[f"{key}_s"] / parts
    tp = report["throughput"]
    report["throughput_scaling"] = {k: v["steps_per_s"] / tp["1"]["steps_per_s"] for k, v in tp.items()}


async def _throughput(
    url: str, digest: str, tensors: dict[str, np.ndarray], clients: int, steps: int
) -> dict[str, float]:

    latencies: list[float] = []
    health: list[float] = []
    done = asyncio.Event()

    async def one(http: aiohttp.ClientSession) -> None:
        opening = {SessionField.MANIFEST_SHA256: digest}
        async with http.post(url + route(Route.SESSIONS), json=opening) as resp:
            sid = (await resp.json())[SessionField.SESSION_ID]
        for step in range(1, steps + 1):
            body = wire.encode(tensors, messages.train_request_meta(step))
            t0 = time.perf_counter()
            async with http.post(
                url + route(Route.TRAIN, session_id=sid), data=body, headers={"Content-Type": wire.CONTENT_TYPE}
            ) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            latencies.append(time.perf_counter() - t0)

    async def probe(http: aiohttp.ClientSession) -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            async with http.get(url + route(Route.HEALTH)) as resp:
                await resp.read()
            health.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)

    connector = aiohttp.TCPConnector(limit=clients + 2)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3600)) as http:
        prober = asyncio.create_task(probe(http))
        t0 = time.perf_counter()
        await asyncio.gather(*(one(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
        done.set()
        await prober
    lat = np.array(latencies) * 1000
    return {
        "steps_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "health_p99_ms": float(np.percentile(np.array(health) * 1000, 99)) if health else float("nan"),
    }


@contextlib.contextmanager
def _server_process(artifacts: Path, state: Path, *, journal: bool = False) -> Iterator[str]:
    """`dpa serve` in its own process, as deployed: it shares no event loop or GIL with the clients."""

    port = free_port()
    args = ["serve", "--artifacts", str(artifacts), "--port", str(port), "--device", "cpu"]
    # Compute is compared with torch: no checkpoints or journal (BENCHMARKS.md gives their cost),
    # except for the one figure of the default deployment (``journal``: every step durable before its answer).
    args += ["--state-dir", str(state), "--no-auth", "--no-templates"]
    args += ["--checkpoint-every", "20"] if journal else ["--checkpoint-every", str(10**9), "--no-journal"]
    server = subprocess.Popen(
        [sys.executable, "-m", "dpa.cli.app", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", server)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(60)


def _client_rss_and_load(cfg: BenchConfig, artifacts: Path, report: dict[str, Any]) -> None:
    """5. The device client's peak RSS (a separate process, as on a phone) and batch loading time."""

    # The device setting for phones (--micro-batch 1) and the whole-batch default.
    with _server_process(artifacts, artifacts.parent / "rss-server") as url:
        for micro, key in (("1", "client_peak_rss_mb"), ("none", "client_peak_rss_mb_whole_batch")):
            script = [
                sys.executable,
                "-m",
                "runtime_client.bench_device",
                str(artifacts),
                url,
                str(cfg.batch),
                "3",
                micro,
            ]
            out = subprocess.run(script, capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            report[key] = result["peak_rss_mb"]
            report["torch_loaded"] = report.get("torch_loaded", False) or result["torch_loaded"]

    manifest = load_manifest(artifacts)
    faces = artifacts.parent / "faces"
    # LFW's images are 250x250 JPEGs; the loader crops and resizes them to the model's input.
    write_synthetic_faces(faces, SynthConfig(identities=2, per_identity=cfg.batch, size=250))
    paths = sorted(faces.rglob("*.jpg"))[: cfg.batch]
    report["batch_load_s"] = median_seconds(
        lambda: load_batch(paths, size=manifest.image_size, mean=manifest.pixel_mean, std=manifest.pixel_std),
        cfg.repeats,
    )


def _class_sum_device(cfg: BenchConfig, artifacts: Path, report: dict[str, Any]) -> None:
    """7. The class-sum recipe's device cost: its frozen head's forward per batch (onnxruntime, in a fresh
    process, with that process's peak RSS) against torch inference of the same head, at the bench's cut (the
    seed's phone figures are for conv1_1) and at fc7 (the recipe's default cut: the head is nearly all of
    the network)."""
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((cfg.batch, 3, cfg.arch.image_size,
                                                                   cfg.arch.image_size), dtype=np.float32))  # fmt: skip
    report["class_sum_device"] = {}
    for cut in dict.fromkeys((cfg.cut, "fc7")):
        art = artifacts if cut == cfg.cut else artifacts.parent / f"artifacts-{cut}"
        if cut != cfg.cut:
            export(ExportConfig(arch=cfg.arch, cut=cut, optimizer=OptimizerConfig(lr=1e-3), out=art, verify=False))
        measured = forward_cost(art, batch=cfg.batch, repeats=cfg.repeats)
        head, rest = build_parts(cfg.arch, cut)
        init_weights((head, rest), 0)
        head.eval()
        with torch.no_grad():
            t_torch = median_seconds(lambda h=head: h(x), cfg.repeats)
        report["class_sum_device"][cut] = {**measured, "torch_forward_s": t_torch,
                                           "forward_ratio": measured["forward_s"] / t_torch}  # fmt: skip
        del head, rest
        if cut != cfg.cut:
            shutil.rmtree(art, ignore_errors=True)  # the paper size's fc7 export is over a gigabyte


def _step_tensors(manifest: Any, batch: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Zero-filled tensors of one train request and its reply, at the export's shapes."""
    act = np.zeros((batch, *manifest.activation_shape), np.float32)
    request = messages.train_request_tensors(act, np.zeros(batch, np.int64))
    logits = np.zeros((batch, manifest.num_classes), np.float32)
    return request, messages.train_reply_tensors(loss=0.0, logits=logits, activation_gradient=act)


def _durability(cfg: BenchConfig, artifacts: Path, report: dict[str, Any]) -> None:
    """What the server writes per step to be crash-safe: journal entry, stored reply, checkpoint."""

    manifest = load_manifest(artifacts)
    request_tensors, reply_tensors = _step_tensors(manifest, cfg.batch)
    request = wire.encode(request_tensors, messages.train_request_meta(1))
    reply = wire.encode(reply_tensors, messages.train_reply_meta(global_step=1, step=1))
    state = artifacts.parent / "durability"
    journal = Journal(state)
    counter = iter(range(1, 10**6))
    report["journal_append_s"] = median_seconds(lambda: journal.append(next(counter), "bench", request), cfg.repeats)
    state.mkdir(parents=True, exist_ok=True)
    report["reply_write_s"] = median_seconds(lambda: atomic_write_bytes(state / "reply.dpaw", reply), cfg.repeats)
    tail = TailModel(artifacts, manifest, resolve_device("cpu"), state)
    report["checkpoint_s"] = median_seconds(lambda: tail.save({"bench": [1, cfg.batch]}), cfg.repeats)
    report["checkpoint_mb"] = (state / CHECKPOINT_NAME).stat().st_size / 1e6


def run_bench(cfg: BenchConfig, *, say: Callable[[str], None] = print) -> dict[str, Any]:

    report: dict[str, Any] = {
        "config": {**asdict(cfg), "arch": asdict(cfg.arch)},
        # The CPU decides the kernels both sides run (AVX-512 or AVX2, bf16): BENCHMARKS.md keeps figures per kind.
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "cpu": cpu_info().as_json(),
            "threads": resolve_device("cpu").threads,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels torch dispatches to
            "onnxruntime": ort_version(),
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        say(f"exporting the {cfg.name} configuration")
        artifacts = _export(cfg, Path(tmp) / "artifacts")
        say("head and tail steps: onnxruntime vs torch eager")
        torch_full = _head_and_tail_ratios(cfg, artifacts, report)
        say("split step over loopback HTTP, wire bytes, server throughput")
        asyncio.run(_split_and_throughput(cfg, artifacts, report, torch_full))
        say("split step with the journal on (the default deployment)")
        asyncio.run(_journalled_split(cfg, artifacts, report))
        _overheads(report)
        del torch_full
        say("device client peak RSS (own process) and batch loading")
        _client_rss_and_load(cfg, artifacts, report)
        say("class sums on the device: the frozen head's forward and peak RSS, at the cut and at fc7")
        _class_sum_device(cfg, artifacts, report)
        say("crash safety: journal entry, stored reply and tail checkpoint writes")
        _durability(cfg, artifacts, report)
    return report
