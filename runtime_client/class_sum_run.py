"""A device run that releases its class sums once (``--release class-sums``), then classifies on the device.

The frozen (public) head computes every training example's centred activation; each is clipped to C
and summed into its label's row with a count (``dpa.privacy.class_sums``); one draw of Gaussian
noise at the whole run's epsilon goes on the sums, and that is all that leaves the device: one
request. The server keeps them as class templates; the device fetches them and classifies its
clean held-out images (``runtime_client.on_device``). Labels are inside the same guarantee.

The release is written to the state folder before it is sent, so a device that crashes and is
started again with ``--resume`` re-sends the same bytes (no second draw of noise: nothing new is
released), to its session if the server still has it, else to a new one.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dpa.base.atomic import atomic_write_bytes, atomic_write_many
from dpa.contract import messages
from dpa.contract.errors import UserError
from dpa.contract.manifest import Manifest
from dpa.contract.server_view import ClassSumViewFiles
from dpa.faces.lfw import FaceIndex
from dpa.privacy.accountant import epsilon_spent
from dpa.privacy.class_sums import (
    Adjacency,
    ClassSums,
    class_sums_sensitivity,
    contributions,
    release_class_sums,
    replace_one_noise_multiplier,
)
from dpa.privacy.clipping import clip_factors, l2_norms, scale_examples
from runtime_client.config import ClientConfig
from runtime_client.dataset import load_examples, noise_generator
from runtime_client.edge import EdgeClient, EdgeError
from runtime_client.head import HeadModel
from runtime_client.privacy_plan import RANDOM_FROZEN_HEAD, THREAT_MODEL, privacy_plan, privacy_summary, run_warnings
from runtime_client.retry import RetryPolicy
from runtime_client.run_setup import on_device_accuracy, report_head, set_up, write_report

__all__ = [
    "run_class_sums",
    "ClassSumPlan",
    "plan_class_sums",
    "compute_class_sums",
    "send_class_sums",
    "record_class_sum_view",
    "RELEASE_FILE",
]

RELEASE_FILE = "class_sums.wire"  # the encoded release, kept before it is sent
_RELEASE_META = "class_sums.json"  # its session and digest


class ClassSumPlan:
    """The noise and the account of a class-sum run: one Gaussian release, labels inside it. The
    calibration is the per-example runs' (``privacy_plan``) for one release with no label mechanism."""

    def __init__(self, cfg: ClientConfig) -> None:
        self.dp, self.accountant = privacy_plan(replace(cfg, label_epsilon=math.inf), {})
        self.adjacency = cfg.adjacency

    @property
    def clip(self) -> float:
        return self.dp.clip

    @property
    def noise_multiplier(self) -> float:
        return self.accountant.noise_multiplier

    @property
    def noise_scale(self) -> float:
        """sigma on every element of the sums: z times their sensitivity (``class_sums_sensitivity``: 2C under
        replace-one, one example's and the DPConfig's own; C under add-remove)."""
        return self.noise_multiplier * class_sums_sensitivity(self.clip, self.adjacency)

    def replace_one(self) -> dict[str, float]:
        """The same noise read under replace-one adjacency: its noise multiplier and whole-run epsilon."""
        z = replace_one_noise_multiplier(self.noise_multiplier, self.adjacency)
        eps = math.inf if z == 0 else epsilon_spent(mechanism=self.dp.mechanism, noise_multiplier=z, releases=1,
                                                    delta=self.dp.delta)  # fmt: skip
        return {"noise_multiplier": z, "epsilon": eps, "delta": self.dp.delta}

    def summary(self, elements: int, num_classes: int) -> dict[str, Any]:
        total = self.accountant.summary()
        total["labels"] = "inside the class sums (their sensitivity covers a changed label)"
        total["adjacency"] = self.adjacency.value
        total["replace_one"] = self.replace_one()
        total["covers"] = "activations and labels together: one Gaussian release of the class sums (PLD)"
        return {
            # snr_per_element: one example's clipped RMS per element over the noise on each element (a
            # class's sum of n examples has n times this), the same definition as a per-example release's
            **privacy_summary(self.dp, releases=1, elements=elements),
            "noise_scale": self.noise_scale,
            "sensitivity": class_sums_sensitivity(self.clip, self.adjacency),
            "snr_per_element": math.inf if not self.noise_scale else self.clip / math.sqrt(elements) / self.noise_scale,
            "adjacency": self.adjacency.value,
            "release": "class-sums",
            "epsilon_per_release": total["epsilon"],
            "elements_per_release": num_classes * (elements + 1),
            "frozen_head": True,
            "total": total,
            "budget_epsilon": self.accountant.budget_epsilon,
            "label_epsilon_per_release": math.inf,
            "label_mechanism": messages.LabelMechanism.IN_CLASS_SUMS,
            "accounting": "one release of each example: the class sums, drawn once (dpa.privacy.class_sums)",
        }


def plan_class_sums(cfg: ClientConfig) -> ClassSumPlan:
    """The plan, its one release recorded: BudgetExceeded before anything is computed or sent."""
    plan = ClassSumPlan(cfg)
    plan.accountant.record(1)
    return plan


def compute_class_sums(
    head: HeadModel, train: FaceIndex, manifest: Manifest, plan: ClassSumPlan, rng: np.random.Generator,
    batch: int = 64, on_batch: Callable[[int], None] | None = None,
) -> ClassSums:  # fmt: skip
    """Every training example through the head, clipped and summed per label; then one draw of noise."""
    totals = np.zeros((manifest.num_classes, manifest.activation_numel + 1), dtype=np.float64)
    for start in range(0, len(train.paths), batch):
        rows = np.arange(start, min(start + batch, len(train.paths)))
        images, labels = load_examples(train, rows, manifest)
        a = head.forward(images)
        clipped = scale_examples(a, clip_factors(l2_norms(a), clip=plan.clip))
        totals += contributions(clipped, labels, manifest.num_classes, plan.clip,
                                counts=plan.adjacency is Adjacency.REPLACE_ONE)  # fmt: skip
        if on_batch is not None:
            on_batch(len(rows))
    out = release_class_sums(totals, clip=plan.clip, noise_multiplier=plan.noise_multiplier, rng=rng,
                             adjacency=plan.adjacency)  # fmt: skip
    shape = (manifest.num_classes, *manifest.activation_shape)  # as the wire carries them
    return ClassSums(out.sums.reshape(shape), out.counts, out.noise_scale)


def _kept(state_dir: Path) -> tuple[bytes, str] | None:
    """The release kept by an earlier try of this run and its session, or None."""
    body_path, meta_path = state_dir / RELEASE_FILE, state_dir / _RELEASE_META
    if not (body_path.is_file() and meta_path.is_file()):
        return None
    body = body_path.read_bytes()
    try:
        meta = json.loads(meta_path.read_text())
        session, digest = str(meta["session_id"]), str(meta["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{meta_path} is unreadable; remove it and {body_path} to release afresh") from None
    if hashlib.sha256(body).hexdigest() != digest:
        raise UserError(f"{body_path} does not match its digest in {meta_path}; remove both to release afresh")
    return body, session


async def send_class_sums(
    cfg: ClientConfig, edge: EdgeClient, digest: str, release: Callable[[], ClassSums], say: Callable[[str], None]
) -> tuple[str, bytes, bool]:
    """(session id, the release's bytes, whether a kept release was re-sent): the release is kept in
    ``cfg.state_dir`` before it is sent, and with ``cfg.resume`` a kept one is re-sent as it was."""
    labels = {"mechanism": messages.LabelMechanism.IN_CLASS_SUMS}
    kept = _kept(cfg.state_dir) if cfg.resume else None
    if kept is not None:
        body, session_id = kept
        try:
            await edge.describe_session(session_id)
        except EdgeError as exc:
            if exc.status not in (404, 410):
                raise
            say("[yellow]the kept class sums' session is gone: re-sending the same bytes in a new session")
            session_id = (await edge.open_session(digest, labels=labels, gallery_rows=cfg.gallery_rows)).session_id
    else:
        sums = release()
        body = bytes(messages.encode_class_sums(sums.sums, sums.counts))
        session_id = (await edge.open_session(digest, labels=labels, gallery_rows=cfg.gallery_rows)).session_id
        meta = {"session_id": session_id, "sha256": hashlib.sha256(body).hexdigest()}
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_many(
            [(cfg.state_dir / RELEASE_FILE, body), (cfg.state_dir / _RELEASE_META, json.dumps(meta).encode())]
        )
    await edge.class_sums(session_id, body)
    return session_id, body, kept is not None


def record_class_sum_view(
    out: Path, body: bytes, header: dict[str, Any], train: FaceIndex, test: FaceIndex, head: HeadModel
) -> None:
    """What the server received (the release's bytes, the head that made it, the public centre) and,
    device-only, which images were summed into which class and which were held out (for scoring
    attacks): docs/server_view.md, "A class-sum view"."""
    out.mkdir(parents=True, exist_ok=True)

    def by_class(index: FaceIndex) -> dict[str, list[str]]:
        return {str(k): [str(p) for p, y in zip(index.paths, index.labels, strict=True) if y == k]
                for k in sorted({int(y) for y in index.labels})}  # fmt: skip

    truth = {"members": by_class(train), "held_out": by_class(test)}
    params = io.BytesIO()
    np.savez(params, **head.parameters())
    f = ClassSumViewFiles
    files = [(out / f.BODY, body), (out / f.TRUTH, json.dumps(truth).encode()), (out / f.HEAD, params.getvalue())]
    if head.centre is not None:
        files.append((out / f.CENTRE, _npy(head.centre)))
    atomic_write_many(files)
    atomic_write_bytes(out / f.HEADER, (json.dumps(header, indent=2) + "\n").encode())


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, dtype=np.float32))
    return buf.getvalue()


async def run_class_sums(cfg: ClientConfig) -> dict[str, Any]:
    """One class-sum release of the training set through the frozen head, then the device classifies its
    clean held-out images with the templates the server made of it (``runtime_client.class_sum_run``)."""
    setup = set_up(cfg, from_checkpoint=False)
    if setup.manifest.weights_sha256 is None:
        warnings.warn(RANDOM_FROZEN_HEAD, UserWarning, stacklevel=3)
    plan = plan_class_sums(cfg)  # BudgetExceeded here: nothing computed, nothing sent
    noise, _ = noise_generator(cfg, 0)
    started = time.perf_counter()
    columns = (TextColumn("[bold]class sums"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not cfg.progress, transient=False) as progress:
        task = progress.add_task("class sums", total=len(setup.train.paths))

        def say(text: str) -> None:
            progress.console.print(text)

        def release() -> Any:
            return compute_class_sums(
                setup.head, setup.train, setup.manifest, plan, noise,
                on_batch=lambda n: progress.update(task, advance=n),
            )  # fmt: skip

        retry = RetryPolicy(total_s=cfg.retry_s)
        async with EdgeClient(cfg.server, token=cfg.token, ca=cfg.ca, retry=retry) as edge:
            session_id, body, resent = await send_class_sums(cfg, edge, setup.digest, release, say)
            progress.update(task, completed=len(setup.train.paths))
            on_device = None
            if cfg.on_device_templates:
                on_device = await on_device_accuracy(
                    edge, setup, plan.dp, say, classifier="class templates of the class sums (GET /v1/templates)"
                )
            await edge.close_session(session_id)
            retries = edge.retries
    m = setup.manifest
    if cfg.record_view is not None:
        header = {
            "recorded_by": "dpa client (device side): what the edge server received", "kind": "class-sums",
            "manifest_sha256": setup.digest, "arch": m.arch, "cut": m.cut, "image_size": m.image_size,
            "width": m.width,
            "num_classes": m.num_classes, "activation_shape": list(m.activation_shape),
            "pixel_mean": list(m.pixel_mean), "pixel_std": list(m.pixel_std), "clip": plan.clip,
            "noise_scale": plan.noise_scale, "noise_multiplier": plan.noise_multiplier,
            "adjacency": plan.adjacency.value, "flip_average": m.flip_average,
        }  # fmt: skip
        record_class_sum_view(cfg.record_view, body, header, setup.train, setup.test, setup.head)
    report = {
        **report_head(cfg, setup),
        "training": {"release": cfg.release.value, "seed": cfg.seed},
        "privacy": plan.summary(m.activation_numel, m.num_classes),
        "threat_model": THREAT_MODEL,
        "warnings": run_warnings(cfg, m),
        "epochs": [],
        "resilience": {"retried_requests": retries, "kept_release_resent": resent},
        "final_test_accuracy": None,
        "on_device": on_device,
        "view": str(cfg.record_view) if cfg.record_view is not None else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_report(cfg, report)
    return report
