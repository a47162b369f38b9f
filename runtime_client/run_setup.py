"""What every device run starts from and ends with, whichever recipe it runs: the export, the data split and
the head (``set_up``); the report's common head; the on-device accuracy with the server's class templates;
the report written whole.

The recipes' runs (``runtime_client.example_run``, ``runtime_client.class_sum_run``) share these, so a
report field or a gallery means the same in both.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpa.base.atomic import atomic_write_bytes
from dpa.contract.devices import ResolvedDevice, resolve_device
from dpa.contract.errors import UserError
from dpa.contract.manifest import Manifest, load_manifest, manifest_sha256
from dpa.faces.lfw import FaceIndex
from dpa.privacy.mechanism import DPConfig
from runtime_client.config import ClientConfig
from runtime_client.dataset import prepare_data
from runtime_client.edge import EdgeClient, EdgeError
from runtime_client.head import HEAD_CHECKPOINT, HeadModel
from runtime_client.on_device import GALLERY_FILE, Gallery, save_gallery, template_accuracy

__all__ = ["RunSetup", "set_up", "report_head", "on_device_accuracy", "write_report"]


@dataclass(frozen=True)
class RunSetup:
    """What a training run and an evaluation both start from."""

    manifest: Manifest
    digest: str
    device: ResolvedDevice
    train: FaceIndex
    test: FaceIndex
    ckpt: Path  # the head checkpoint in state_dir
    head: HeadModel


def set_up(cfg: ClientConfig, *, from_checkpoint: bool) -> RunSetup:
    """Load the export, the data split and the head (from state_dir's checkpoint if ``from_checkpoint``)."""
    device = resolve_device(cfg.device)
    if device.fallback_reason is not None:  # the device runs where it was asked to, or not at all
        raise UserError(f"--device {device.requested.value} is not available here: {device.fallback_reason}")
    manifest = load_manifest(cfg.artifacts, verify=("head",))
    train, test = prepare_data(cfg, manifest)
    ckpt = cfg.state_dir / HEAD_CHECKPOINT
    checkpoint = ckpt if from_checkpoint else None
    head = HeadModel(
        cfg.artifacts, manifest, device, checkpoint=checkpoint, lr=cfg.lr, model_format=cfg.model_format,
        frozen=cfg.frozen_head,
    )  # fmt: skip
    return RunSetup(manifest, manifest_sha256(cfg.artifacts), device, train, test, ckpt, head)


def report_head(cfg: ClientConfig, setup: RunSetup) -> dict[str, Any]:
    """What every run's report starts with: the server, the export, the device and the data."""
    return {
        "server": cfg.server,
        "manifest_sha256": setup.digest,
        "cut": setup.manifest.cut,
        "device": setup.device.describe(),
        "head_format": setup.head.format,
        "execution_providers": list(setup.head.providers),  # what ran the head, in onnxruntime's order
        "data": {
            "source": cfg.data,
            "identities": len(setup.train.names),
            "train_images": len(setup.train.paths),
            "test_images": len(setup.test.paths),
        },
    }


async def on_device_accuracy(
    edge: EdgeClient, setup: RunSetup, dp: DPConfig, say: Callable[[str], None],
    classifier: str = "class templates (GET /v1/templates)",
) -> dict[str, Any] | None:  # fmt: skip
    """Clean held-out accuracy of the device classifying with the server's class templates; None (and
    a warning) when the server keeps none: the run itself is complete, only this figure is missing.
    ``dp``: the run's mechanism, for the clip and the public rescale of the clean activations."""
    try:
        means, counts, at_step = await edge.templates()
    except EdgeError as exc:
        if exc.code != "no_templates":
            raise
        say("[yellow]the server keeps no class templates (start it with --templates): no on-device classifier")
        return None
    acc = template_accuracy(setup.head, dp, setup.test, setup.manifest, means, counts)
    scale = dp.release_scale(setup.manifest.activation_numel)
    names = tuple(setup.train.names)  # the export may have more classes than the data has identities
    names += tuple(f"class {k}" for k in range(len(names), len(means)))
    save_gallery(setup.ckpt.parent / GALLERY_FILE, Gallery(means, counts, names, dp.clip, scale))
    say(f"on the device, with the server's class templates: clean test acc {acc:.3f}")
    return {"classifier": classifier, "test_accuracy": acc,
            "templates_global_step": at_step, "releases_in_templates": int(counts.sum())}  # fmt: skip


def write_report(cfg: ClientConfig, report: dict[str, Any]) -> None:
    """``report`` to ``cfg.report`` (if set), whole or not at all."""
    if cfg.report is not None:
        cfg.report.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cfg.report, (json.dumps(report, indent=2) + "\n").encode())
