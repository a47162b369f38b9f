"""SplitFed over Flower: DP-A's per-example split training with K edge servers, FedAvg of their tails.

Each Flower node is an edge server (``partition-id`` k) with its devices (device d belongs to edge server
d mod K). A device releases each training example once, as ``dpa client --frozen-head
--releases-per-example 1`` does (``runtime_client``: the frozen public head, the clipped, noisy, rescaled
activation, and its label randomised with RRWithPrior under a uniform prior), and keeps the release: later
rounds re-send it, so its accountant counts one release, as on one server. Each round, every edge server
loads the global tail, trains it on its devices' releases for ``local_epochs`` (``runtime_server.tail``, the
tail ``dpa serve`` trains: batches in device order, then example order) and returns it with its example
count; Flower's own FedAvg strategy averages the tails, weighted by examples. The heads stay frozen, so
every device's guarantee is its releases' alone; the averaged tail is post-processing of them.
"""

from __future__ import annotations

import io
import json
import logging
import math
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from dpa.base.atomic import atomic_write_bytes
from dpa.contract.devices import DeviceProfile, resolve_device
from dpa.contract.errors import UserError
from dpa.contract.manifest import load_manifest
from dpa.federation.config import FederationConfig
from dpa.federation.device_app import _head, device_dir
from dpa.federation.population import device_data, draw_faces
from dpa.privacy.mechanism import DPActivations, DPConfig
from dpa.privacy.noise_source import secure_generator
from dpa.privacy.release_clip import release_clip
from runtime_client.dataset import load_examples
from runtime_client.label_privacy import LabelPrivacy
from runtime_client.privacy_plan import privacy_plan
from runtime_client.recipes import Budget, Recipe
from runtime_server.tail import TailModel

__all__ = ["splitfed", "device_releases", "RELEASES", "TAIL_FILE"]

RELEASES = "releases.npz"  # a device's kept per-example releases: activation (as sent) and labels (as sent)
TAIL_FILE = "splitfed_tail.npz"  # the averaged tail after the last round


def _plan(cfg: FederationConfig) -> tuple[DPConfig, Any]:
    client = Recipe.PUBLIC.client_config(
        artifacts=cfg.artifacts, clip=release_clip(load_manifest(cfg.artifacts), source=cfg.artifacts),
        budget=Budget(cfg.total_epsilon, delta=cfg.delta, label_epsilon=cfg.label_epsilon),
        releases_per_example=1, on_device_templates=False, progress=False,
    )  # fmt: skip
    return privacy_plan(client, {})


def device_releases(cfg: FederationConfig, device: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(activations (n, d) as sent, labels as sent, the device's account): kept, or released once and kept."""
    dp, accountant = _plan(cfg)
    accountant.record(1)  # every example released once (BudgetExceeded before anything is drawn)
    account = {"epsilon": accountant.epsilon, "delta": cfg.delta, "noise_multiplier": accountant.noise_multiplier,
               "label_epsilon": cfg.label_epsilon}  # fmt: skip
    kept = device_dir(cfg, device) / RELEASES
    if kept.is_file():
        with np.load(kept, allow_pickle=False) as z:
            return z["activation"], z["labels"], account
    manifest = load_manifest(cfg.artifacts)
    if manifest.num_classes != cfg.identities:
        raise UserError(f"SplitFed trains one tail over the gallery's {cfg.identities} identities: export with "
                        f"--classes {cfg.identities}, not {manifest.num_classes}")  # fmt: skip
    data = device_data(cfg, device, manifest.image_size)
    images, local = load_examples(data.train, np.arange(len(data.train.paths)), manifest)
    labels = np.asarray(data.identities, dtype=np.int64)[local]
    seed = None if cfg.seed is None else [cfg.seed, device]
    release, _ = DPActivations(dp, secure_generator(None if seed is None else [*seed, 1])).release(
        _head(cfg.artifacts).forward(images)
    )
    scaled = (release * np.float32(dp.release_scale(manifest.activation_numel))).reshape(len(images), -1)
    sent = LabelPrivacy(epsilon=cfg.label_epsilon, prior="uniform", examples=len(labels),
                        num_classes=manifest.num_classes, seed=None if cfg.seed is None else cfg.seed * 100003 + device,
                        ).randomize(np.arange(len(labels)), labels)  # fmt: skip
    buf = io.BytesIO()
    np.savez(buf, activation=scaled.astype(np.float32), labels=sent.astype(np.int64))
    kept.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(kept, buf.getvalue())
    return scaled.astype(np.float32), sent.astype(np.int64), account


@cache
def _tail(artifacts: Path, edge: int, state_dir: Path) -> TailModel:
    # a fresh tail per edge server and worker process; its weights are the global ones at every round
    return TailModel(artifacts, load_manifest(artifacts), resolve_device(DeviceProfile.CPU), state_dir / "unused")


def edge_server_app(cfg: FederationConfig) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        edge = int(context.node_config["partition-id"])
        tail = _tail(cfg.artifacts, edge, cfg.state_dir / f"splitfed-edge-{edge}")
        tail.load_parameters({k: v.numpy() for k, v in msg.content["arrays"].items()})
        data = [device_releases(cfg, d) for d in range(cfg.devices) if cfg.edge_of(d) == edge]
        loss_sum, examples = 0.0, 0
        for _ in range(cfg.local_epochs):
            for act, labels, _ in data:
                for start in range(0, len(labels), cfg.batch_size):
                    rows = slice(start, start + cfg.batch_size)
                    loss_sum += tail.train_step(act[rows], labels[rows]).loss * len(labels[rows])
                    examples += len(labels[rows])
        arrays = ArrayRecord({k: Array(v) for k, v in tail.parameters().items()})
        n = sum(len(labels) for _, labels, _ in data)
        metrics = MetricRecord({"num-examples": n, "train_loss": loss_sum / max(examples, 1)})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app


def splitfed(cfg: FederationConfig) -> dict[str, Any]:
    """R rounds of SplitFed in Flower's simulation engine; the report and the averaged tail (``TAIL_FILE``)."""
    manifest = load_manifest(cfg.artifacts)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    draw_faces(cfg, manifest.image_size)
    start = TailModel(cfg.artifacts, manifest, resolve_device(DeviceProfile.CPU), cfg.state_dir / "unused").parameters()
    report: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=cfg.edge_servers,
                          min_available_nodes=cfg.edge_servers)  # fmt: skip
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord({k: Array(v) for k, v in start.items()}),
                                num_rounds=cfg.rounds, timeout=cfg.round_timeout_s)  # fmt: skip
        final = {k: v.numpy() for k, v in result.arrays.items()}
        buf = io.BytesIO()
        np.savez(buf, **final)
        atomic_write_bytes(cfg.state_dir / TAIL_FILE, buf.getvalue())
        losses = {r: float(m["train_loss"]) for r, m in result.train_metrics_clientapp.items()}
        changed = any(not np.array_equal(final[k], start[k]) for k in start)
        report.update({"edge_servers": cfg.edge_servers, "devices": cfg.devices, "rounds": cfg.rounds,
                       "train_loss": losses, "tail": str(cfg.state_dir / TAIL_FILE),
                       "changed_from_start": changed})  # fmt: skip

    backend = {"client_resources": {"num_cpus": 1},
               "init_args": {"num_cpus": cfg.actors, "include_dashboard": False, "log_to_driver": False,
                             "logging_level": logging.ERROR}}  # fmt: skip
    run_simulation(server, edge_server_app(cfg), num_supernodes=cfg.edge_servers, backend_config=backend)
    if not report:
        raise RuntimeError("the Flower ServerApp ended without a report (see Flower's log above)")
    report["accounts"] = {str(d): device_releases(cfg, d)[2] for d in range(cfg.devices)}
    report["epsilon"] = max(a["epsilon"] for a in report["accounts"].values()) if report["accounts"] else math.nan
    atomic_write_bytes(cfg.state_dir / "splitfed_report.json", (json.dumps(report, indent=1) + "\n").encode())
    return report
