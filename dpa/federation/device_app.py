"""The Flower ClientApp that is a dpa device: the same frozen head, class-sum release and accountant as
``dpa client --release class-sums`` (``runtime_client``), one release kept and re-sent, never redrawn.

Three messages reach it (``query``): ``hello`` asks which device it is; ``enrol`` answers with the
device's class-sum release (the wire bytes ``dpa serve`` would receive,
``dpa.contract.messages.encode_class_sums``), the global ids of its local classes, and its accountant's
epsilon; ``gallery`` brings the templates of its identities back and answers with its held-out accuracy,
recognised on the device. The release is written to the device's state folder before it is answered,
so a retried round, a restarted server or a replayed message gets the same bytes: the device's epsilon
is spent once.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dpa.base.atomic import atomic_write_bytes
from dpa.contract import messages
from dpa.contract.devices import DeviceProfile, resolve_device
from dpa.contract.manifest import load_manifest
from dpa.federation.config import FederationConfig
from dpa.federation.population import DeviceData, device_data
from dpa.privacy.noise_source import secure_generator
from dpa.privacy.release_clip import release_clip
from runtime_client.class_sum_run import ClassSumPlan, compute_class_sums
from runtime_client.config import ClientConfig
from runtime_client.dataset import load_examples
from runtime_client.head import HeadModel
from runtime_client.on_device import clean_embeddings, template_scores
from runtime_client.recipes import Budget, Recipe

__all__ = ["device_app", "device_dir", "device_release", "RELEASE", "HELLO", "ENROL", "GALLERY"]

HELLO, ENROL, GALLERY = "hello", "enrol", "gallery"  # the ServerApp's instructions (ConfigRecord "do")
RELEASE = "class_sums.wire"  # the kept release in a device's state folder


def device_dir(cfg: FederationConfig, device: int) -> Path:
    return cfg.state_dir / "devices" / f"device-{device:04d}"


@cache
def _head(artifacts: Path) -> HeadModel:  # one per worker process: loading it is most of a small device's work
    return HeadModel(artifacts, load_manifest(artifacts), resolve_device(DeviceProfile.CPU))


def _client_config(cfg: FederationConfig, device: int) -> ClientConfig:
    return Recipe.CLASS_SUMS.client_config(
        artifacts=cfg.artifacts, clip=release_clip(load_manifest(cfg.artifacts), source=cfg.artifacts),
        budget=Budget(cfg.total_epsilon, delta=cfg.delta), on_device_templates=False,
        state_dir=device_dir(cfg, device), progress=False,
    )  # fmt: skip


def _release(cfg: FederationConfig, data: DeviceData, plan: ClassSumPlan) -> bytes:
    """The kept release, or a new one (drawn once, kept before it is answered)."""
    kept = device_dir(cfg, data.device) / RELEASE
    if kept.is_file():
        return kept.read_bytes()
    rng = secure_generator(None if cfg.seed is None else [cfg.seed, data.device, 1])
    sums = compute_class_sums(_head(cfg.artifacts), data.train, load_manifest(cfg.artifacts), plan, rng)
    body = bytes(messages.encode_class_sums(sums.sums, sums.counts))
    kept.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(kept, body)
    return body


def device_release(cfg: FederationConfig, device: int) -> tuple[bytes, DeviceData, ClassSumPlan]:
    """The device's one class-sum release (drawn once and kept, ``_release``), its data and its plan with the
    release recorded: what it sends, whether to a ServerApp (the simulation) or to its edge server's
    ``dpa serve`` (the deployment, ``dpa.runs.flower_deployment``)."""
    manifest = load_manifest(cfg.artifacts)
    data = device_data(cfg, device, manifest.image_size)
    if len(data.identities) != manifest.num_classes:
        raise ValueError(f"device {device} holds {len(data.identities)} identities; the export classifies "
                         f"{manifest.num_classes}")  # fmt: skip
    plan = ClassSumPlan(_client_config(cfg, device))
    plan.accountant.record(1)  # the one release (BudgetExceeded before anything is drawn, as dpa client)
    return _release(cfg, data, plan), data, plan


def _enrol(cfg: FederationConfig, device: int) -> RecordDict:
    if device in cfg.drop_devices:
        raise RuntimeError(f"device {device} dropped out (a fault drill: --drop-device)")
    body, data, plan = device_release(cfg, device)
    account = plan.accountant.summary()
    return RecordDict({
        "release": ArrayRecord({"body": Array(np.frombuffer(body, dtype=np.uint8).copy())}),
        "device": ConfigRecord({"device": device, "identities": list(data.identities),
                                "sha256": hashlib.sha256(body).hexdigest(), "noise_multiplier": plan.noise_multiplier,
                                "epsilon": float(account["epsilon"]), "delta": cfg.delta}),
    })  # fmt: skip


def _gallery(cfg: FederationConfig, device: int, msg: Message) -> RecordDict:
    head, manifest = _head(cfg.artifacts), load_manifest(cfg.artifacts)
    data = device_data(cfg, device, manifest.image_size)
    templates = msg.content["gallery"]["templates"].numpy()
    counts = msg.content["gallery"]["counts"].numpy()
    clip = _client_config(cfg, device).dp.clip
    images, labels = load_examples(data.test, np.arange(len(data.test.paths)), manifest)
    x = clean_embeddings(head, images, clip, 1.0).reshape(len(images), -1)
    correct = int((template_scores(x, templates, counts).argmax(axis=1) == labels).sum())
    return RecordDict({"recognition": MetricRecord({"device": device, "correct": correct, "probes": len(labels)})})


def device_app(cfg: FederationConfig) -> ClientApp:
    app = ClientApp()

    @app.query()
    def answer(msg: Message, context: Context) -> Message:
        device = int(context.node_config["partition-id"])
        what = msg.content["do"]["what"]
        if what == HELLO:  # which device this node is, so that one that drops later is reported by name
            content = RecordDict({"device": ConfigRecord({"device": device})})
        elif what == ENROL:
            content = _enrol(cfg, device)
        else:
            content = _gallery(cfg, device, msg)
        return Message(content, reply_to=msg)

    return app
