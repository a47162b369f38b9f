"""The device's training run: epochs of private split steps, with data, progress, checkpoints and report.

``run_training`` trains for ``cfg.epochs`` (resumable after a crash of either side); ``run_evaluation``
measures held-out accuracy through head + server. One step is ``split_step.SplitTrainer``.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from dpa.contract import messages
from dpa.contract.atomic import atomic_write_bytes
from dpa.contract.devices import ResolvedDevice, resolve_device
from dpa.contract.errors import UserError
from dpa.contract.manifest import Manifest, load_manifest, manifest_sha256
from dpa.contract.messages import TrainReply
from dpa.contract.server_view import ViewRecorder
from dpa.faces.lfw import FaceIndex, iter_batches
from dpa.privacy.accountant import PrivacyAccountant
from dpa.privacy.mechanism import DPActivations, DPConfig
from dpa.privacy.noise_source import generator_state_json, restore_generator_state
from dpa.privacy.public_parameters import release_parameters
from runtime_client.class_sum_run import (
    compute_class_sums,
    plan_class_sums,
    record_class_sum_view,
    send_class_sums,
)
from runtime_client.config import ClientConfig, ReleaseKind
from runtime_client.dataset import TestActivations, evaluate, load_examples, noise_generator, prepare_data
from runtime_client.edge import EdgeClient, EdgeError
from runtime_client.head import HEAD_CHECKPOINT, HeadModel
from runtime_client.label_privacy import LabelPrivacy
from runtime_client.on_device import GALLERY_FILE, Gallery, save_gallery, template_accuracy
from runtime_client.privacy_plan import RANDOM_FROZEN_HEAD, THREAT_MODEL, privacy_plan, privacy_summary, run_warnings
from runtime_client.release_cache import ReleaseCache
from runtime_client.resume import RunProgress, attach_session
from runtime_client.retry import RetryPolicy
from runtime_client.split_step import SplitTrainer, StepResult

__all__ = ["run_training", "run_evaluation"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Setup:
    """What a training run and an evaluation both start from."""

    manifest: Manifest
    digest: str
    device: ResolvedDevice
    train: FaceIndex
    test: FaceIndex
    ckpt: Path  # the head checkpoint in state_dir
    head: HeadModel


def _set_up(cfg: ClientConfig, *, from_checkpoint: bool) -> _Setup:
    """Load the export, the data split and the head (from state_dir's checkpoint if ``from_checkpoint``)."""
    manifest = load_manifest(cfg.artifacts, verify=("head",))
    train, test = prepare_data(cfg, manifest)
    ckpt = cfg.state_dir / HEAD_CHECKPOINT
    device = resolve_device(cfg.device)
    checkpoint = ckpt if from_checkpoint else None
    head = HeadModel(
        cfg.artifacts, manifest, device, checkpoint=checkpoint, lr=cfg.lr, model_format=cfg.model_format,
        frozen=cfg.frozen_head,
    )  # fmt: skip
    return _Setup(manifest, manifest_sha256(cfg.artifacts), device, train, test, ckpt, head)


@dataclass
class _RunState:
    """Everything a run saves with the head after every step, so a killed device resumes exactly."""

    progress: RunProgress
    data_seed: int
    noise: np.random.Generator
    dp_cfg: DPConfig
    accountant: PrivacyAccountant
    history: list[dict[str, Any]]
    labels: LabelPrivacy

    @classmethod
    def start(cls, cfg: ClientConfig, props: Any, setup: _Setup) -> _RunState:
        """A fresh run's state, or (``cfg.resume``) the one saved in the head checkpoint's properties."""
        resume = cfg.resume
        if resume and "data_seed" in props:
            data_seed = int(props["data_seed"])
        else:
            data_seed = cfg.seed if cfg.seed is not None else secrets.randbits(31)
        noise, data_seed = noise_generator(cfg, data_seed)
        if resume and "run.noise_rng" in props:  # continue the noise stream where the saved step left it
            restore_generator_state(noise, str(props["run.noise_rng"]))
        dp_cfg, accountant = privacy_plan(cfg, dict(props) if resume else {})
        history = json.loads(str(props["run.history"])) if resume and "run.history" in props else []
        progress = RunProgress.load(props) if resume else RunProgress()
        labels = LabelPrivacy(
            epsilon=cfg.label_epsilon, prior=cfg.label_prior, examples=len(setup.train.paths),
            num_classes=setup.manifest.num_classes, seed=cfg.seed,
        )  # fmt: skip
        if resume:
            labels.load(props)
        return cls(progress, data_seed, noise, dp_cfg, accountant, history, labels)

    def save(self, head: HeadModel, ckpt: Path) -> None:
        props = head.properties
        self.progress.store(props)
        props["run.history"] = json.dumps(self.history)
        props["data_seed"] = self.data_seed
        props["run.noise_rng"] = generator_state_json(self.noise)
        for key, value in self.accountant.to_state().items():
            props[key] = value
        self.labels.store(props)
        head.save(ckpt)


_COLUMNS = (
    TextColumn("[bold]epoch {task.fields[epoch]}"),
    BarColumn(),
    MofNCompleteColumn(),
    TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.2f} | {task.fields[privacy]}"),
    TimeElapsedColumn(),
)


def _privacy_text(state: _RunState, noise_scale: float) -> str:
    """The progress bar's privacy column; ``.format(fraction clipped, epsilon spent)``."""
    dp, acc = state.dp_cfg, state.accountant
    budget = "" if math.isinf(acc.budget_epsilon) else f"/{acc.budget_epsilon:g}"
    return (
        f"{dp.mechanism.value} eps={dp.epsilon:.3g}/release clip={dp.clip:g} "
        f"noise={noise_scale:.3g} clipped={{:.0%}} spent eps={{:.3g}}{budget}"
    )


async def run_training(cfg: ClientConfig) -> dict[str, Any]:
    """Train the head with the server for cfg.epochs; returns (and optionally writes) the report.
    With ``--release class-sums`` the run is one class-sum release instead (``_run_class_sums``)."""
    if cfg.release is ReleaseKind.CLASS_SUMS:
        return await _run_class_sums(cfg)
    if cfg.resume and not (cfg.state_dir / HEAD_CHECKPOINT).is_file():
        raise UserError(f"--resume: no head checkpoint at {cfg.state_dir / HEAD_CHECKPOINT}")
    if math.isinf(cfg.label_epsilon):
        warnings.warn(
            "--label-epsilon inf: every training label (the identity) is sent to the server in clear",
            UserWarning,
            stacklevel=2,
        )
    setup = _set_up(cfg, from_checkpoint=cfg.resume)
    if cfg.frozen_head and setup.manifest.weights_sha256 is None:
        warnings.warn(RANDOM_FROZEN_HEAD, UserWarning, stacklevel=2)
    state = _RunState.start(cfg, setup.head.properties, setup)
    dp = DPActivations(state.dp_cfg, state.noise)
    run, accountant = state.progress, state.accountant
    steps_per_epoch = math.ceil(len(setup.train.paths) / cfg.batch_size)
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if run.epochs_done < cfg.releases and run.epoch_step == 0 and not accountant.can_release(1):
        accountant.record(1)  # raises BudgetExceeded, before anything is sent or saved
    privacy_text = _privacy_text(state, dp.noise_scale)
    started = time.perf_counter()
    with Progress(*_COLUMNS, disable=not cfg.progress, transient=False) as progress:

        def say(text: str) -> None:
            progress.console.print(text)

        def on_retry(error: EdgeError, wait: float) -> None:
            say(f"[yellow]{error} - retrying in {wait:.1f} s")

        retry = RetryPolicy(total_s=cfg.retry_s)
        async with EdgeClient(cfg.server, token=cfg.token, ca=cfg.ca, retry=retry, on_retry=on_retry) as edge:
            labels_field = messages.labels_field(cfg.label_epsilon)
            run.session_id, step, stored = await attach_session(edge, setup.digest, run, say, labels_field)
            run.session_step = step
            state.save(
                setup.head, setup.ckpt
            )  # the session id, before any step of it: a device killed now resumes in it
            trainer = SplitTrainer(
                setup.head, edge, run.session_id, dp, micro_batch=cfg.micro_batch, step=step,
                release_dtype=cfg.release_dtype,
            )  # fmt: skip
            view = _view_recorder(cfg, setup, state, trainer)
            test_activations = TestActivations(setup.test, setup.manifest) if cfg.frozen_head else None
            for epoch in range(run.epochs_done, cfg.epochs):
                if run.epoch_step == 0:
                    # One epoch releases every example once (training ones here, held-out ones in the
                    # evaluation): refuse before sending anything that would exceed the budget. A frozen
                    # head's epochs after the first K re-send the same releases: nothing new to count.
                    if epoch < cfg.releases:
                        accountant.record(1)
                    run.loss_sum, run.correct, run.seen = 0.0, 0, 0
                task = progress.add_task(
                    "train",
                    total=steps_per_epoch,
                    completed=run.epoch_step,
                    epoch=f"{epoch + 1}/{cfg.epochs}",
                    loss=run.loss_sum / max(run.epoch_step, 1),
                    acc=run.correct / max(run.seen, 1),
                    privacy=privacy_text.format(0.0, accountant.epsilon),
                )
                t0 = time.perf_counter()

                def advance(result: StepResult, task: TaskID = task) -> None:
                    progress.update(
                        task,
                        advance=1,
                        loss=run.loss_sum / run.epoch_step,
                        acc=run.correct / run.seen,
                        privacy=privacy_text.format(result.fraction_clipped, accountant.epsilon),
                    )

                stored = await _train_epoch(cfg, setup, state, trainer, epoch, steps_per_epoch, stored, advance, view)
                test_acc = await evaluate(trainer, setup.test, setup.manifest, cfg.batch_size, test_activations)
                state.history.append(
                    {
                        "epoch": epoch + 1,
                        "train_loss": run.loss_sum / max(run.epoch_step, 1),
                        "train_accuracy": run.correct / max(run.seen, 1),
                        "test_accuracy": test_acc,
                        "epsilon_spent": accountant.epsilon,
                        "seconds": round(time.perf_counter() - t0, 3),
                    }
                )
                run.epochs_done, run.epoch_step = epoch + 1, 0
                state.save(setup.head, setup.ckpt)
                last = state.history[-1]
                say(
                    f"epoch {epoch + 1}: train loss {last['train_loss']:.3f}, "
                    f"train acc {last['train_accuracy']:.3f}, test acc {test_acc:.3f}"
                )
            on_device = None
            if cfg.on_device_templates:
                on_device = await _on_device_accuracy(edge, setup, state.dp_cfg, say)
            await edge.close_session(run.session_id)
            resilience = {"retried_requests": edge.retries, "server_rollbacks": trainer.rollbacks}
            run.session_id = ""  # a later --resume (more epochs) opens a new session
            state.save(setup.head, setup.ckpt)

    resilience["session_steps"] = run.session_step
    report = _report(cfg, setup, state, resilience, seconds=time.perf_counter() - started)
    report["on_device"] = on_device
    if cfg.report is not None:
        cfg.report.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cfg.report, (json.dumps(report, indent=2) + "\n").encode())
    return report


async def _run_class_sums(cfg: ClientConfig) -> dict[str, Any]:
    """One class-sum release of the training set through the frozen head, then the device classifies its
    clean held-out images with the templates the server made of it (``runtime_client.class_sum_run``)."""
    setup = _set_up(cfg, from_checkpoint=False)
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
                on_device = await _on_device_accuracy(
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
            "adjacency": plan.adjacency.value,
        }  # fmt: skip
        record_class_sum_view(cfg.record_view, body, header, setup.train, setup.test, setup.head)
    report = {
        **_report_head(cfg, setup),
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
    if cfg.report is not None:
        cfg.report.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cfg.report, (json.dumps(report, indent=2) + "\n").encode())
    return report


async def _on_device_accuracy(
    edge: EdgeClient, setup: _Setup, dp: DPConfig, say: Callable[[str], None],
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


async def _train_epoch(
    cfg: ClientConfig,
    setup: _Setup,
    state: _RunState,
    trainer: SplitTrainer,
    epoch: int,
    steps_per_epoch: int,
    stored: TrainReply | None,
    advance: Callable[[StepResult], None],
    view: _ViewSources | None = None,
) -> TrainReply | None:
    """The epoch's remaining steps (a resumed run skips those done); the state is saved after each.

    ``stored`` (the server's reply to the step a crashed device had not saved) is applied by the
    first step taken; returned if this epoch had none left to take."""
    run = state.progress
    epoch_rng = np.random.default_rng([state.data_seed, epoch])
    for i, rows in enumerate(iter_batches(setup.train, batch_size=cfg.batch_size, rng=epoch_rng)):
        if i >= steps_per_epoch:
            break
        if i < run.epoch_step:  # done before the device was restarted
            continue
        if cfg.frozen_head and epoch >= cfg.releases:  # a kept release is re-sent: no image is needed
            images, labels = None, setup.train.labels[rows].astype(np.int64)
        else:
            images, labels = load_examples(setup.train, rows, setup.manifest)
        if view is not None:
            view.sources, view.epoch = [str(setup.train.paths[r]) for r in rows], epoch + 1
            view.labels = labels
        if cfg.frozen_head:
            result = await _frozen_step(cfg, state, trainer, epoch, rows, images, labels, stored)
        else:
            sent = state.labels.randomize(rows, labels)  # the only labels that leave the device
            result = await trainer.step(images, sent, stored=stored)
        state.labels.observe(rows, result.logits)
        stored = None
        run.epoch_step, run.session_step = i + 1, trainer.step_number
        run.loss_sum += result.loss
        # against the true labels (the server's loss is against the labels it was sent)
        run.correct += int((result.logits.argmax(axis=1) == labels).sum()) if result.logits is not None else 0
        run.seen += result.batch
        state.save(setup.head, setup.ckpt)  # every step: the server keeps only the last reply
        advance(result)
    return stored


async def _frozen_step(
    cfg: ClientConfig,
    state: _RunState,
    trainer: SplitTrainer,
    epoch: int,
    rows: np.ndarray,
    images: np.ndarray | None,
    labels: np.ndarray,
    stored: TrainReply | None,
) -> StepResult:
    """One step of a frozen head: its first K epochs release (and keep) each example; later ones
    re-send a kept release, the same bytes and the same randomised label."""
    cache = ReleaseCache(cfg.state_dir / "release_cache")
    k = epoch % cfg.releases
    if epoch < cfg.releases:
        # Drawn even when a resumed device finds this step's release kept: the generators must move on
        # exactly as they did, or the next example would get this one's noise again. The draw is the
        # same bytes (the generators were saved before the step), kept before it is sent.
        assert images is not None
        activation, clipped = trainer.release(images)
        sent = state.labels.randomize(rows, labels)
        cache.put(k, rows, activation, sent)
        return await trainer.send_release(activation, sent, clipped=clipped, stored=stored)
    activation, sent = cache.get(k, rows)
    return await trainer.send_release(activation, sent, stored=stored, record=False)


@dataclass
class _ViewSources:
    """What the recorded view's callback needs to know of the step in flight (set by ``_train_epoch``)."""

    sources: list[str]
    epoch: int
    labels: np.ndarray | None = None  # the true labels (device-only, for scoring attacks)


def _view_recorder(cfg: ClientConfig, setup: _Setup, state: _RunState, trainer: SplitTrainer) -> _ViewSources | None:
    """With ``cfg.record_view``: a recorder of every training release (docs/server_view.md) wired to the trainer."""
    if cfg.record_view is None:
        return None
    m = setup.manifest
    header = {
        "recorded_by": "dpa client (device side): what the edge server received",
        "manifest_sha256": setup.digest,
        "arch": m.arch,
        "cut": m.cut,
        "image_size": m.image_size,
        "width": m.width,
        "num_classes": m.num_classes,
        "activation_shape": list(m.activation_shape),
        "pixel_mean": list(m.pixel_mean),
        "pixel_std": list(m.pixel_std),
        "wire_dtype": cfg.release_dtype.value,
        "labels": messages.labels_field(cfg.label_epsilon),
    }
    recorder = ViewRecorder(cfg.record_view, header, limit=cfg.record_view_limit, append=cfg.resume)
    recorder.write_centre(setup.head.centre)
    params = release_parameters(state.dp_cfg, m.activation_numel)
    current = _ViewSources([], 0)

    def on_sent(step: int, activation: np.ndarray, labels: np.ndarray) -> None:
        if recorder.full:
            recorder.skip(step)  # view.json then says it is not the whole run
        else:
            release = {"kind": "train", "epoch": current.epoch, **params, "label_epsilon": cfg.label_epsilon}
            recorder.record(
                step=step, activation=activation, labels=labels, head=setup.head.parameters(), release=release,
                sources=current.sources, true_labels=current.labels,
            )  # fmt: skip

    trainer.on_sent = on_sent
    return current


def _report_head(cfg: ClientConfig, setup: _Setup) -> dict[str, Any]:
    """What every run's report starts with: the server, the export, the device and the data."""
    return {
        "server": cfg.server,
        "manifest_sha256": setup.digest,
        "cut": setup.manifest.cut,
        "device": setup.device.describe(),
        "head_format": setup.head.format,
        "data": {
            "source": cfg.data,
            "identities": len(setup.train.names),
            "train_images": len(setup.train.paths),
            "test_images": len(setup.test.paths),
        },
    }


def _report(
    cfg: ClientConfig, setup: _Setup, state: _RunState, resilience: dict[str, int], *, seconds: float
) -> dict[str, Any]:
    """The run's JSON report (``docs/`` and README describe its fields)."""
    return {
        **_report_head(cfg, setup),
        "training": {
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "lr": setup.head.lr,
            "seed": cfg.seed,
            "release_dtype": cfg.release_dtype.value,
        },
        "privacy": {
            **privacy_summary(state.dp_cfg, releases=cfg.releases, elements=setup.manifest.activation_numel),
            "frozen_head": cfg.frozen_head,
            "total": state.accountant.summary(),
            "budget_epsilon": state.accountant.budget_epsilon,
            "label_epsilon_per_release": cfg.label_epsilon,
            "label_mechanism": "clear" if math.isinf(cfg.label_epsilon) else "rr-with-prior",
            "label_prior": cfg.label_prior,
        },
        "threat_model": THREAT_MODEL,
        "warnings": run_warnings(cfg, setup.manifest),
        "epochs": state.history,
        "resilience": resilience,
        "final_test_accuracy": state.history[-1]["test_accuracy"] if state.history else None,
        "view": str(cfg.record_view) if cfg.record_view is not None else None,
        "seconds": round(seconds, 3),
    }


async def run_evaluation(cfg: ClientConfig) -> dict[str, Any]:
    """Held-out accuracy of the current head (state_dir checkpoint if any) + the server's tail."""
    setup = _set_up(cfg, from_checkpoint=True)
    noise, _ = noise_generator(cfg, 0)
    dp = DPActivations(cfg.dp, noise)
    async with EdgeClient(cfg.server, token=cfg.token, ca=cfg.ca, retry=RetryPolicy(total_s=cfg.retry_s)) as edge:
        session = await edge.open_session(setup.digest, client="dpa-eval")
        trainer = SplitTrainer(setup.head, edge, session.session_id, dp, release_dtype=cfg.release_dtype)
        acc = await evaluate(trainer, setup.test, setup.manifest, cfg.batch_size)
        await edge.close_session(session.session_id)
    return {
        "test_accuracy": acc,
        "test_images": len(setup.test.paths),
        "identities": len(setup.test.names),
        "head_checkpoint": str(setup.ckpt) if setup.head.resumed else None,
        "privacy": privacy_summary(cfg.dp, releases=1, elements=setup.manifest.activation_numel),
        "config": {k: str(v) for k, v in asdict(cfg).items() if k in ("server", "artifacts", "data")},
    }
