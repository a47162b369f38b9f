"""The per-example recipes' device run (DP-A): epochs of private split steps, with data, progress,
checkpoints and report. A frozen head releases each example K times and re-sends; a trained one releases
every example every epoch.

``run_examples`` trains for ``cfg.epochs`` (resumable after a crash of either side); ``run_evaluation``
measures held-out accuracy through head + server. One step is ``split_step.SplitTrainer``.
"""

from __future__ import annotations

import json
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
from dpa.contract.errors import UserError
from dpa.contract.messages import TrainReply
from dpa.contract.server_view import ViewRecorder
from dpa.faces.lfw import iter_batches
from dpa.privacy.accountant import PrivacyAccountant
from dpa.privacy.mechanism import DPActivations, DPConfig
from dpa.privacy.noise_source import generator_state_json, restore_generator_state
from dpa.privacy.public_parameters import release_parameters
from runtime_client.config import ClientConfig
from runtime_client.dataset import TestActivations, evaluate, load_examples, noise_generator
from runtime_client.edge import EdgeClient, EdgeError
from runtime_client.head import HEAD_CHECKPOINT, HeadModel
from runtime_client.label_privacy import LabelPrivacy
from runtime_client.privacy_plan import RANDOM_FROZEN_HEAD, THREAT_MODEL, privacy_plan, privacy_summary, run_warnings
from runtime_client.release_cache import ReleaseCache
from runtime_client.resume import RunProgress, attach_session
from runtime_client.retry import RetryPolicy
from runtime_client.run_setup import RunSetup, on_device_accuracy, report_head, set_up, write_report
from runtime_client.split_step import SplitTrainer, StepResult

__all__ = ["run_examples", "run_evaluation"]


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
    def start(cls, cfg: ClientConfig, props: Any, setup: RunSetup) -> _RunState:
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


async def run_examples(cfg: ClientConfig) -> dict[str, Any]:
    """Train with the server for cfg.epochs, releasing examples one by one; returns (and optionally writes)
    the report."""
    if cfg.resume and not (cfg.state_dir / HEAD_CHECKPOINT).is_file():
        raise UserError(f"--resume: no head checkpoint at {cfg.state_dir / HEAD_CHECKPOINT}")
    if math.isinf(cfg.label_epsilon):
        warnings.warn(
            "--label-epsilon inf: every training label (the identity) is sent to the server in clear",
            UserWarning,
            stacklevel=2,
        )
    setup = set_up(cfg, from_checkpoint=cfg.resume)
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
            epochs = _Epochs(cfg, setup, state, trainer, progress, privacy_text, steps_per_epoch, view, say)
            for epoch in range(run.epochs_done, cfg.epochs):
                stored = await epochs.run(epoch, stored)
            on_device = None
            if cfg.on_device_templates:
                on_device = await on_device_accuracy(edge, setup, state.dp_cfg, say)
            await edge.close_session(run.session_id)
            resilience = {"retried_requests": edge.retries, "server_rollbacks": trainer.rollbacks}
            run.session_id = ""  # a later --resume (more epochs) opens a new session
            state.save(setup.head, setup.ckpt)

    resilience["session_steps"] = run.session_step
    report = _report(cfg, setup, state, resilience, seconds=time.perf_counter() - started)
    report["on_device"] = on_device
    write_report(cfg, report)
    return report


@dataclass
class _Epochs:
    """One epoch at a time of a run: the budget counted, the steps taken, the held-out accuracy measured, the
    history saved, the progress shown."""

    cfg: ClientConfig
    setup: RunSetup
    state: _RunState
    trainer: SplitTrainer
    progress: Progress
    privacy_text: str
    steps_per_epoch: int
    view: _ViewSources | None
    say: Callable[[str], None]

    def __post_init__(self) -> None:
        # a frozen head's held-out activations, computed once for every epoch's evaluation
        self.test_activations = TestActivations(self.setup.test, self.setup.manifest) if self.cfg.frozen_head else None

    async def run(self, epoch: int, stored: TrainReply | None) -> TrainReply | None:
        cfg, setup, state, run, accountant = (
            self.cfg,
            self.setup,
            self.state,
            self.state.progress,
            self.state.accountant,
        )
        if run.epoch_step == 0:
            # One epoch releases every example once (training ones here, held-out ones in the
            # evaluation): refuse before sending anything that would exceed the budget. A frozen
            # head's epochs after the first K re-send the same releases: nothing new to count.
            if epoch < cfg.releases:
                accountant.record(1)
            run.loss_sum, run.correct, run.seen = 0.0, 0, 0
        task = self.progress.add_task(
            "train", total=self.steps_per_epoch, completed=run.epoch_step, epoch=f"{epoch + 1}/{cfg.epochs}",
            loss=run.loss_sum / max(run.epoch_step, 1), acc=run.correct / max(run.seen, 1),
            privacy=self.privacy_text.format(0.0, accountant.epsilon),
        )  # fmt: skip
        t0 = time.perf_counter()

        def advance(result: StepResult, task: TaskID = task) -> None:
            self.progress.update(
                task, advance=1, loss=run.loss_sum / run.epoch_step, acc=run.correct / run.seen,
                privacy=self.privacy_text.format(result.fraction_clipped, accountant.epsilon),
            )  # fmt: skip

        stored = await _train_epoch(
            cfg, setup, state, self.trainer, epoch, self.steps_per_epoch, stored, advance, self.view
        )
        test_acc = await evaluate(self.trainer, setup.test, setup.manifest, cfg.batch_size, self.test_activations)
        state.history.append({
            "epoch": epoch + 1, "train_loss": run.loss_sum / max(run.epoch_step, 1),
            "train_accuracy": run.correct / max(run.seen, 1), "test_accuracy": test_acc,
            "epsilon_spent": accountant.epsilon, "seconds": round(time.perf_counter() - t0, 3),
        })  # fmt: skip
        run.epochs_done, run.epoch_step = epoch + 1, 0
        state.save(setup.head, setup.ckpt)
        last = state.history[-1]
        self.say(
            f"epoch {epoch + 1}: train loss {last['train_loss']:.3f}, "
            f"train acc {last['train_accuracy']:.3f}, test acc {test_acc:.3f}"
        )
        return stored


async def _train_epoch(
    cfg: ClientConfig,
    setup: RunSetup,
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


def _view_recorder(cfg: ClientConfig, setup: RunSetup, state: _RunState, trainer: SplitTrainer) -> _ViewSources | None:
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
        "flip_average": m.flip_average,
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


def _report(
    cfg: ClientConfig, setup: RunSetup, state: _RunState, resilience: dict[str, int], *, seconds: float
) -> dict[str, Any]:
    """The run's JSON report (``docs/`` and README describe its fields)."""
    return {
        **report_head(cfg, setup),
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
    setup = set_up(cfg, from_checkpoint=True)
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
