"""The device's training loop: head forward, DP-A, server step, head backward.

``SplitTrainer.step`` is one private split-training step; ``run_training`` wraps it
in epochs with data loading, progress, checkpoints and the JSON report, and
``run_evaluation`` measures held-out accuracy through head + server.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
import warnings
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dpa import wire
from dpa.atomic import atomic_write_bytes
from dpa.devices import DeviceProfile, resolve_device
from dpa.finite import all_finite
from dpa.manifest import GraphNames, Manifest, load_manifest, manifest_sha256
from runtime_client.accountant import PrivacyAccountant, calibrate_noise_multiplier, epsilon_spent
from runtime_client.edge import EdgeClient, EdgeError, TrainReply
from runtime_client.faces import FaceIndex, index_faces, iter_batches, load_batch, split_faces
from runtime_client.head import HEAD_CHECKPOINT, HeadModel, ModelFormat
from runtime_client.mechanism import DPActivations, DPConfig, ReleaseContext
from runtime_client.retry import RetryPolicy
from runtime_client.synth import SynthConfig, write_synthetic_faces

__all__ = ["ClientConfig", "SplitTrainer", "StepResult", "run_training", "run_evaluation", "THREAT_MODEL"]

log = logging.getLogger(__name__)

THREAT_MODEL = (
    "The edge server sees, per training step, each example's clipped activation plus noise calibrated to "
    "(epsilon, delta) for ONE release, and the example's identity label IN CLEAR. It never sees images. "
    "Each epoch releases every training example once more (and its evaluation every held-out example), so "
    "the privacy loss composes over releases: privacy.total is that composition (dp-accounting PLD, no "
    "amplification by sampling claimed). It covers the activations; labels are not protected."
)


@dataclass(frozen=True)
class ClientConfig:
    server: str = "http://127.0.0.1:8080"  # the edge server's base URL
    artifacts: Path = Path("artifacts")  # export folder; only manifest.json and head/ are read
    data: str = "synthetic"  # "synthetic" (built-in faces) or a folder in LFW layout
    device: DeviceProfile = DeviceProfile.CPU
    epochs: int = 5
    batch_size: int = 8  # the seed's batch size
    lr: float | None = None  # head learning rate; None: the manifest's
    dp: DPConfig = field(default_factory=DPConfig)
    seed: int | None = None  # None: unpredictable noise and shuffling (what deployments want)
    min_faces_per_person: int = 2  # identities with fewer images are skipped (as scikit-learn's LFW loader)
    test_fraction: float = 0.25  # held-out images per identity
    split_seed: int = 0  # fixed so that `dpa eval` sees the same held-out images as training
    synth: SynthConfig = field(default_factory=SynthConfig)  # the built-in data set (size follows the manifest)
    state_dir: Path = Path("runs/client")  # head checkpoint and synthetic-data cache
    resume: bool = False  # continue from state_dir's head checkpoint
    report: Path | None = None  # JSON report path
    model_format: ModelFormat = ModelFormat.AUTO
    max_steps_per_epoch: int | None = None  # cap for quick runs; None: whole epoch
    # Whole-run budget: calibrate the noise so that `epochs` releases of each example stay within
    # this epsilon (dp-accounting's PLD accountant); None: `dp.epsilon` is per release, no budget.
    total_epsilon: float | None = None
    # Examples per head call on the device; None: the whole batch. 1 keeps one example's
    # activations in memory instead of the batch's (a phone's setting; same update).
    micro_batch: int | None = None
    # How the release travels: float16 halves the upload (rounded after the noise: no privacy cost).
    release_dtype: wire.ReleaseDtype = wire.ReleaseDtype.FLOAT32
    progress: bool = True  # rich progress bar
    token: str | None = field(default=None, repr=False)  # bearer token for the server (never printed)
    ca: Path | None = None  # CA certificate (PEM) to trust for an https server, besides the system's
    retry_s: float = 600.0  # keep retrying a request through network errors and server restarts this long

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate must be a positive number, got {self.lr}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test fraction must be in (0, 1), got {self.test_fraction}")
        if not (math.isfinite(self.retry_s) and self.retry_s >= 0):
            raise ValueError(f"retry time must be >= 0 seconds, got {self.retry_s}")
        if self.total_epsilon is not None and not (math.isfinite(self.total_epsilon) and self.total_epsilon > 0):
            raise ValueError(f"total epsilon must be a positive finite number, got {self.total_epsilon}")


@dataclass(frozen=True)
class StepResult:
    loss: float
    correct: int
    batch: int
    fraction_clipped: float
    global_step: int


class SplitTrainer:
    """One device's half of split training, bound to an open server session.

    Each step carries the session step number (``step + 1``); the server applies it once,
    and a retry of the same bytes after a lost answer gets the stored reply. With
    ``micro_batch`` the device never holds a batch of activations: each group of
    examples is run through the head and released straight into the request buffer, and
    for the backward pass their activations are recomputed (for conv1_1, one convolution)
    and their gradients accumulated before one optimizer step. Same update, same privacy
    (every example gets its own noise either way), a fraction of the memory.
    """

    def __init__(
        self,
        head: HeadModel,
        edge: EdgeClient,
        session_id: str,
        dp: DPActivations,
        micro_batch: int | None = None,
        step: int = 0,
        release_dtype: wire.ReleaseDtype = wire.ReleaseDtype.FLOAT32,
    ) -> None:
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"micro batch must be >= 1, got {micro_batch}")
        self.head = head
        self.edge = edge
        self.session_id = session_id
        self.dp = dp
        self.micro_batch = micro_batch
        self.release_dtype = wire.ReleaseDtype.parse(release_dtype)
        self.step_number = step  # the session's last step whose update this head holds
        self.rollbacks = 0  # times the server was found behind this device (see _send)
        self._scratches: dict[str, np.ndarray] = {}

    async def step(self, images: np.ndarray, labels: np.ndarray, stored: TrainReply | None = None) -> StepResult:
        """One private step. With ``stored`` (the server's reply to this very step, fetched after
        the device crashed) nothing is sent: the release is recomputed only to advance the noise
        generator exactly as the first time, and the stored gradient is applied."""
        if self.micro_batch is not None and stored is None:
            return await self._streamed_step(images, labels, self.micro_batch)
        size = self.micro_batch if self.micro_batch is not None else len(labels)
        batch = len(labels)
        body, slots = wire.allocate(self._request_specs(batch), {"step": self.step_number + 1}, self.edge.buffers)
        slots[GraphNames.LABELS][...] = labels
        clipped = 0
        kept: list[ReleaseContext] = []
        for start in range(0, batch, size):
            part = slice(start, start + size)
            slot = slots[GraphNames.ACTIVATION][part]
            if slot.dtype == np.float32:  # the release is written straight into the message
                noisy, ctx = self.dp.release(self.head.forward(images[part]), out=slot)
            else:
                noisy, ctx = self.dp.release(self.head.forward(images[part]), out=self._scratch("release", slot.shape))
                self._on_wire(noisy, out=slot)
            clipped += int(ctx.clipped.sum())
            if self.micro_batch is None:
                kept.append(ctx)
        del slots, noisy, ctx
        reply = stored if stored is not None else await self._send(body)
        del body
        gradient = self._checked(reply.activation_gradient, (batch, *self.head.activation_shape))
        upstream = self._scratch("upstream", gradient.shape)
        for index, start in enumerate(range(0, batch, size)):
            part = slice(start, start + size)
            # Micro-batches recompute the activations instead of keeping them.
            ctx = kept[index] if kept else self.dp.context(self.head.forward(images[part]))
            self.head.accumulate(images[part], self.dp.backward(ctx, gradient[part], out=upstream[part]))
        return self._finish(reply, labels, clipped)

    def _scratch(self, use: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 array kept from step to step, one per use: the clipping VJP's output, and the
        release before it is rounded to float16 (``dpa.buffers`` says why fresh ones cost)."""
        kept = self._scratches.get(use)
        if kept is None or kept.shape != shape:
            kept = self._scratches[use] = np.empty(shape, dtype=np.float32)
        return kept

    def _on_wire(self, noisy: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The release in the dtype it travels in (into ``out`` if given); float16 only where it fits."""
        wire_dtype = self.release_dtype.numpy
        if noisy.dtype == wire_dtype and out is None:
            return noisy
        with np.errstate(over="ignore"):
            if out is None:
                out = noisy.astype(wire_dtype)
            else:
                np.copyto(out, noisy, casting="same_kind")
        if not all_finite(out):
            raise ValueError(
                f"this release exceeds {wire_dtype.name}'s range (largest |value| {float(np.abs(noisy).max()):.3g}); "
                "send it as float32 (--wire-dtype float32)"
            )
        return out

    @staticmethod
    def _checked(gradient: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
        """The server's d loss / d activation, refused before it reaches the head unless it has
        ``shape`` and holds only numbers: the server is not trusted, and one NaN would make
        every head weight NaN."""
        if gradient is None or gradient.shape != shape or gradient.dtype != np.float32:
            got = "none" if gradient is None else f"{gradient.dtype} {gradient.shape}"
            raise EdgeError(0, "bad_reply", f"the server's activation gradient is {got}, expected float32 {shape}")
        if not all_finite(gradient):
            raise EdgeError(0, "bad_reply", "the server's activation gradient contains NaN or infinity")
        return gradient

    def _request_specs(self, batch: int) -> dict[str, wire.Spec]:
        """Shapes and dtypes of a train request's tensors (``docs/protocol.md``)."""
        return {
            GraphNames.ACTIVATION: ((batch, *self.head.activation_shape), self.release_dtype.numpy),
            GraphNames.LABELS: ((batch,), np.int64),
        }

    def _finish(self, reply: TrainReply, labels: np.ndarray, clipped: int) -> StepResult:
        """The optimizer step on the accumulated gradients, and the step's figures."""
        batch = len(labels)
        if reply.logits.ndim != 2 or reply.logits.shape[0] != batch:
            self.head.reset_gradients()
            shape = reply.logits.shape
            raise EdgeError(0, "bad_reply", f"the server's logits have shape {shape}, expected ({batch}, classes)")
        self.head.step()
        self.step_number = reply.step if reply.step > 0 else self.step_number + 1
        correct = int((reply.logits.argmax(axis=1) == labels).sum())
        return StepResult(reply.loss, correct, batch, clipped / max(batch, 1), reply.global_step)

    async def _streamed_step(self, images: np.ndarray, labels: np.ndarray, size: int) -> StepResult:
        """The micro-batch step with neither the request nor the reply ever whole in memory.

        The request is produced while it uploads: ``size`` examples at a time are run through
        the head and released. A retried upload restores the noise generator first, so it
        sends the same bytes. The reply's gradient is consumed example by example: each
        example's activation is recomputed and its gradient accumulated, then one step.
        """
        batch = len(labels)
        specs = self._request_specs(batch)
        start_state = self.dp.rng_state
        clipped = [0]

        async def produce(pieces: list[bytes | str]) -> AsyncIterator[bytes | memoryview]:
            self.dp.rng_state = start_state
            clipped[0] = 0
            for piece in pieces:
                if isinstance(piece, bytes):
                    yield piece
                elif piece == GraphNames.LABELS:
                    yield labels.astype("<i8").tobytes()
                else:
                    for start in range(0, batch, size):
                        noisy, ctx = self.dp.release(self.head.forward(images[start : start + size]))
                        clipped[0] += int(ctx.clipped.sum())
                        yield memoryview(np.ascontiguousarray(self._on_wire(noisy))).cast("B")

        received = [0]

        def on_start() -> None:
            self.head.reset_gradients()  # a retried attempt accumulates from zero again
            received[0] = 0

        def on_example(i: int, gradient: np.ndarray) -> None:
            gradient = self._checked(gradient[None], (1, *self.head.activation_shape))
            ctx = self.dp.context(self.head.forward(images[i : i + 1]))  # recomputed, not kept
            upstream = self.dp.backward(ctx, gradient, out=self._scratch("upstream", gradient.shape))
            self.head.accumulate(images[i : i + 1], upstream)
            received[0] += 1

        try:
            for first_try in (True, False):
                length, pieces = wire.pieces(specs, {"step": self.step_number + 1})
                try:
                    reply = await self.edge.train_streamed(
                        self.session_id, length, partial(produce, pieces), batch, on_start, on_example
                    )
                    break
                except EdgeError as exc:
                    if not (first_try and self._rolled_back(exc)):
                        raise
            if received[0] != batch:  # the gradient was missing or not split by example
                got = f"gradients for {received[0]} of {batch} examples"
                raise EdgeError(0, "bad_reply", f"the server's reply held {got}")
        except BaseException:
            self.head.reset_gradients()  # nothing half-accumulated reaches a later step
            raise
        return self._finish(reply, labels, clipped[0])

    async def _send(self, body: bytearray) -> TrainReply:
        """Send a step; after a rollback (``_rolled_back``) the same release goes again, renumbered."""
        try:
            return await self.edge.train_message(self.session_id, body)
        except EdgeError as exc:
            if not self._rolled_back(exc):
                raise
            message = wire.decode(body)
            renumbered = wire.encode(message.tensors, {"step": self.step_number + 1})
            return await self.edge.train_message(self.session_id, renumbered)

    def _rolled_back(self, exc: EdgeError) -> bool:
        """Whether ``exc`` says the server lost steps (it ran without a journal and crashed) and
        asks for an earlier step number; if so, take that number for the pending release."""
        expected = exc.detail.get("expected_step")
        if exc.code != "step_out_of_order" or not isinstance(expected, int) or expected > self.step_number:
            return False
        log.warning("server rolled back", extra={"fields": {"lost_steps": self.step_number + 1 - expected}})
        self.rollbacks += 1
        self.step_number = expected - 1
        return True

    async def predict(self, images: np.ndarray) -> np.ndarray:
        """Class predictions; the test activations are released with the same DP-A mechanism."""
        noisy, _ = self.dp.release(self.head.forward(images))
        return (await self.edge.evaluate(self.session_id, self._on_wire(noisy))).argmax(axis=1)


def prepare_data(cfg: ClientConfig, manifest: Manifest) -> tuple[FaceIndex, FaceIndex]:
    """Train/test split of the configured data; synthetic faces are generated once and cached."""
    if cfg.data == "synthetic":
        synth = SynthConfig(
            identities=cfg.synth.identities,
            per_identity=cfg.synth.per_identity,
            size=manifest.image_size,
            seed=cfg.synth.seed,
        )
        root = (
            cfg.state_dir / "data" / f"synthetic-{synth.identities}x{synth.per_identity}-{synth.size}px-s{synth.seed}"
        )
        if not root.is_dir():
            root.parent.mkdir(parents=True, exist_ok=True)
            write_synthetic_faces(root, synth)
    else:
        root = Path(cfg.data)
    index = index_faces(root, min_faces_per_person=cfg.min_faces_per_person)
    if len(index.names) > manifest.num_classes:
        raise ValueError(
            f"{root} has {len(index.names)} identities but the export classifies {manifest.num_classes}: "
            f"export with --classes {len(index.names)} or raise --min-faces-per-person"
        )
    return split_faces(index, test_fraction=cfg.test_fraction, seed=cfg.split_seed)


def _load(index: FaceIndex, rows: np.ndarray, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    images = load_batch(
        [index.paths[i] for i in rows], size=manifest.image_size, mean=manifest.pixel_mean, std=manifest.pixel_std
    )
    return images, index.labels[rows].astype(np.int64)


def _rngs(cfg: ClientConfig, data_seed: int) -> tuple[np.random.Generator, int]:
    if cfg.seed is not None:
        warnings.warn(
            f"--seed {cfg.seed}: DP noise is reproducible, which is for experiments only", UserWarning, stacklevel=3
        )
        return np.random.default_rng([cfg.seed, 1]), data_seed
    return np.random.default_rng(), data_seed  # OS entropy: the server cannot predict the noise


async def _evaluate(trainer: SplitTrainer, test: FaceIndex, manifest: Manifest, batch: int) -> float:
    correct = 0
    for start in range(0, len(test.paths), batch):
        rows = np.arange(start, min(start + batch, len(test.paths)))
        images, labels = _load(test, rows, manifest)
        correct += int((await trainer.predict(images) == labels).sum())
    return correct / max(len(test.paths), 1)


def _privacy_summary(dp: DPConfig, releases: int, elements: int) -> dict[str, Any]:
    """The release's parameters, and its signal-to-noise ratio per element.

    A clipped activation has RMS per element at most C / sqrt(d); the noise adds std per
    element. Their ratio says how much of the signal the server's network can still see.
    """
    std = dp.noise_std
    return {
        "mechanism": dp.mechanism.value,
        "clip": dp.clip,
        "epsilon_per_release": dp.epsilon,
        "delta_per_release": dp.delta if dp.mechanism.value == "gaussian" else 0.0,
        "noise_scale": dp.noise_scale,
        "noise_multiplier": dp.noise_multiplier if math.isfinite(dp.epsilon) else 0.0,
        "sensitivity": dp.sensitivity,
        "releases_per_training_example": releases,
        "elements_per_release": elements,
        "snr_per_element": math.inf if std == 0 else dp.clip / math.sqrt(elements) / std,
        "accounting": "epsilon_per_release is one release; 'total' composes all releases so far (PLD)",
    }


@dataclass
class _Progress:
    """Where the run is, saved with the head after every step (checkpoint properties).

    A device killed mid-epoch resumes at the next batch of the same epoch, in the same
    session, with the same noise generator state: nothing is released twice.
    """

    epochs_done: int = 0
    epoch_step: int = 0  # batches of the current epoch whose updates the head holds
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    session_id: str = ""
    session_step: int = 0

    _INT = ("epochs_done", "epoch_step", "correct", "seen", "session_step")

    @classmethod
    def load(cls, props: Any) -> _Progress:
        out = cls()
        for key in (*cls._INT, "loss_sum", "session_id"):
            if f"run.{key}" in props:
                kind = int if key in cls._INT else float if key == "loss_sum" else str
                setattr(out, key, kind(props[f"run.{key}"]))
        if "epochs_done" in props and "run.epochs_done" not in props:  # checkpoints of older versions
            out.epochs_done = int(props["epochs_done"])
        return out

    def store(self, props: Any) -> None:
        for key in (*self._INT, "loss_sum", "session_id"):
            props[f"run.{key}"] = getattr(self, key)
        props["epochs_done"] = self.epochs_done


async def _attach(edge: EdgeClient, digest: str, progress: _Progress, say: Any) -> tuple[str, int, TrainReply | None]:
    """The session to train in: (id, last applied step, stored reply to replay or None).

    A resumed device asks the server where its session stands. The server may be one step
    ahead (the device died after the server applied a step, before the device saved): the
    device then fetches that step's stored reply instead of sending the batch again.
    """
    if progress.session_id:
        try:
            info = await edge.describe_session(progress.session_id)
        except EdgeError as exc:
            if exc.status not in (404, 410):
                raise
            say(f"[yellow]the server no longer has session {progress.session_id[:8]}... ({exc.code}): opening another")
        else:
            server_step, mine = int(info["step"]), progress.session_step
            if server_step == mine:
                return progress.session_id, mine, None
            if server_step == mine + 1:
                return progress.session_id, mine, await edge.stored_reply(progress.session_id, server_step)
            if server_step < mine:
                say(f"[yellow]the server lost steps {server_step + 1}..{mine} (it rolled back to its last checkpoint)")
                return progress.session_id, server_step, None
            raise ValueError(
                f"session {progress.session_id[:8]}... is at step {server_step} on the server but this device saved "
                f"step {mine}: another device uses it, or the head checkpoint is older than the run"
            )
    session = await edge.open_session(digest, client="dpa-client")
    return session.session_id, session.step, None


async def run_training(cfg: ClientConfig) -> dict[str, Any]:
    """Train the head with the server for cfg.epochs; returns (and optionally writes) the report."""
    manifest = load_manifest(cfg.artifacts, verify=("head",))
    digest = manifest_sha256(cfg.artifacts)
    device = resolve_device(cfg.device)
    train_idx, test_idx = prepare_data(cfg, manifest)
    ckpt = cfg.state_dir / HEAD_CHECKPOINT
    if cfg.resume and not ckpt.is_file():
        raise ValueError(f"--resume: no head checkpoint at {ckpt}")
    head = HeadModel(
        cfg.artifacts,
        manifest,
        device,
        checkpoint=ckpt if cfg.resume else None,
        lr=cfg.lr,
        model_format=cfg.model_format,
    )
    props = head.properties
    run = _Progress.load(props) if cfg.resume else _Progress()
    if cfg.resume and "data_seed" in props:
        data_seed = int(props["data_seed"])
    else:
        data_seed = cfg.seed if cfg.seed is not None else secrets.randbits(31)
    noise_rng, data_seed = _rngs(cfg, data_seed)
    if cfg.resume and "run.noise_rng" in props:  # continue the noise stream where the saved step left it
        noise_rng.bit_generator.state = json.loads(str(props["run.noise_rng"]))
    dp_cfg, accountant = _privacy_plan(cfg, dict(props) if cfg.resume else {})
    dp = DPActivations(dp_cfg, noise_rng)
    history: list[dict[str, Any]] = json.loads(str(props["run.history"])) if "run.history" in props else []
    if not cfg.resume:
        history = []
    steps_per_epoch = math.ceil(len(train_idx.paths) / cfg.batch_size)
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)

    def save() -> None:
        run.store(props)
        props["run.history"] = json.dumps(history)
        props["data_seed"] = data_seed
        props["run.noise_rng"] = json.dumps(noise_rng.bit_generator.state)
        for key, value in accountant.to_state().items():
            props[key] = value
        head.save(ckpt)

    columns = (
        TextColumn("[bold]epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.2f} | {task.fields[privacy]}"),
        TimeElapsedColumn(),
    )
    budget = "" if math.isinf(accountant.budget_epsilon) else f"/{accountant.budget_epsilon:g}"
    privacy_text = (
        f"{dp_cfg.mechanism.value} eps={dp_cfg.epsilon:.3g}/release clip={dp_cfg.clip:g} "
        f"noise={dp.noise_scale:.3g} clipped={{:.0%}} spent eps={{:.3g}}{budget}"
    )
    if run.epochs_done < cfg.epochs and run.epoch_step == 0 and not accountant.can_release(1):
        accountant.record(1)  # raises BudgetExceeded, before anything is sent or saved
    started = time.perf_counter()
    with Progress(*columns, disable=not cfg.progress, transient=False) as progress:

        def say(text: str) -> None:
            progress.console.print(text)

        def on_retry(error: EdgeError, wait: float) -> None:
            say(f"[yellow]{error} - retrying in {wait:.1f} s")

        retry = RetryPolicy(total_s=cfg.retry_s)
        async with EdgeClient(cfg.server, token=cfg.token, ca=cfg.ca, retry=retry, on_retry=on_retry) as edge:
            run.session_id, step, stored = await _attach(edge, digest, run, say)
            run.session_step = step
            save()  # the session id, before any step of it: a device killed now resumes in this session
            trainer = SplitTrainer(
                head, edge, run.session_id, dp, micro_batch=cfg.micro_batch, step=step, release_dtype=cfg.release_dtype
            )
            for epoch in range(run.epochs_done, cfg.epochs):
                if run.epoch_step == 0:
                    # One epoch releases every example once (training ones here, held-out ones in the
                    # evaluation): refuse before sending anything that would exceed the budget.
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
                epoch_rng = np.random.default_rng([data_seed, epoch])
                for i, rows in enumerate(iter_batches(train_idx, batch_size=cfg.batch_size, rng=epoch_rng)):
                    if i >= steps_per_epoch:
                        break
                    if i < run.epoch_step:  # done before the device was restarted
                        continue
                    images, labels = _load(train_idx, rows, manifest)
                    result = await trainer.step(images, labels, stored=stored)
                    stored = None
                    run.epoch_step, run.session_step = i + 1, trainer.step_number
                    run.loss_sum += result.loss
                    run.correct += result.correct
                    run.seen += result.batch
                    save()  # every step: the server keeps only the last reply (24 KB at conv1_1)
                    progress.update(
                        task,
                        advance=1,
                        loss=run.loss_sum / run.epoch_step,
                        acc=run.correct / run.seen,
                        privacy=privacy_text.format(result.fraction_clipped, accountant.epsilon),
                    )
                test_acc = await _evaluate(trainer, test_idx, manifest, cfg.batch_size)
                history.append(
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
                save()
                say(
                    f"epoch {epoch + 1}: train loss {history[-1]['train_loss']:.3f}, "
                    f"train acc {history[-1]['train_accuracy']:.3f}, test acc {test_acc:.3f}"
                )
            await edge.close_session(run.session_id)
            retries, rollbacks = edge.retries, trainer.rollbacks
            run.session_id = ""  # a later --resume (more epochs) opens a new session
            save()

    report = {
        "server": cfg.server,
        "manifest_sha256": digest,
        "cut": manifest.cut,
        "device": device.describe(),
        "head_format": head.format,
        "data": {
            "source": cfg.data,
            "identities": len(train_idx.names),
            "train_images": len(train_idx.paths),
            "test_images": len(test_idx.paths),
        },
        "training": {
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "lr": head.lr,
            "seed": cfg.seed,
            "release_dtype": cfg.release_dtype.value,
        },
        "privacy": {
            **_privacy_summary(dp_cfg, releases=cfg.epochs, elements=manifest.activation_numel),
            "total": accountant.summary(),
            "budget_epsilon": accountant.budget_epsilon,
        },
        "threat_model": THREAT_MODEL,
        "warnings": _warnings(cfg),
        "epochs": history,
        "resilience": {"retried_requests": retries, "server_rollbacks": rollbacks, "session_steps": run.session_step},
        "final_test_accuracy": history[-1]["test_accuracy"] if history else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if cfg.report is not None:
        cfg.report.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cfg.report, (json.dumps(report, indent=2) + "\n").encode())
    return report


def _privacy_plan(cfg: ClientConfig, saved: dict[str, Any]) -> tuple[DPConfig, PrivacyAccountant]:
    """The release's noise and the run's accountant (restored from ``saved`` on --resume).

    With ``total_epsilon`` the noise multiplier is calibrated once, for ``epochs`` releases of
    each example, when the run starts. A resumed run keeps that noise and that budget (both
    saved with the head), so asking for more epochs than were planned runs into the budget
    and is refused, instead of being silently re-budgeted; other privacy settings than the
    saved ones are refused by the accountant.
    """
    dp = cfg.dp
    if not any(key.startswith("accountant.") for key in saved):
        budget = math.inf
        if cfg.total_epsilon is not None:
            z = calibrate_noise_multiplier(
                mechanism=dp.mechanism, total_epsilon=cfg.total_epsilon, delta=dp.delta, releases=cfg.epochs
            )
            dp = _with_noise_multiplier(dp, z)
            budget = cfg.total_epsilon
        z = 0.0 if math.isinf(dp.epsilon) else dp.noise_multiplier
        return dp, PrivacyAccountant(mechanism=dp.mechanism, noise_multiplier=z, delta=dp.delta, budget_epsilon=budget)
    saved_budget = float(saved.get("accountant.budget_epsilon", math.inf))
    asked_budget = math.inf if cfg.total_epsilon is None else cfg.total_epsilon
    if not math.isclose(saved_budget, asked_budget, rel_tol=1e-6) and saved_budget != asked_budget:
        raise ValueError(f"--resume: the run was started with a total budget of {saved_budget:g}, not {asked_budget:g}")
    if cfg.total_epsilon is not None:
        dp = _with_noise_multiplier(dp, float(saved["accountant.noise_multiplier"]))
    z = 0.0 if math.isinf(dp.epsilon) else dp.noise_multiplier
    accountant = PrivacyAccountant.from_state(saved, mechanism=dp.mechanism, noise_multiplier=z, delta=dp.delta)
    return dp, accountant


def _with_noise_multiplier(dp: DPConfig, z: float) -> DPConfig:
    per_release = epsilon_spent(mechanism=dp.mechanism, noise_multiplier=z, releases=1, delta=dp.delta)
    return replace(dp, epsilon=per_release, fixed_noise_multiplier=z)


def _warnings(cfg: ClientConfig) -> list[str]:
    out = ["labels are sent to the server in clear"]
    if math.isinf(cfg.dp.epsilon):
        out.append("epsilon = inf: activations were sent without noise")
    if cfg.seed is not None:
        out.append("fixed --seed: noise is reproducible (experiments only)")
    return out


async def run_evaluation(cfg: ClientConfig) -> dict[str, Any]:
    """Held-out accuracy of the current head (state_dir checkpoint if any) + the server's tail."""
    manifest = load_manifest(cfg.artifacts, verify=("head",))
    digest = manifest_sha256(cfg.artifacts)
    device = resolve_device(cfg.device)
    _, test_idx = prepare_data(cfg, manifest)
    ckpt = cfg.state_dir / HEAD_CHECKPOINT
    head = HeadModel(cfg.artifacts, manifest, device, checkpoint=ckpt, model_format=cfg.model_format)
    noise_rng, _ = _rngs(cfg, 0)
    dp = DPActivations(cfg.dp, noise_rng)
    async with EdgeClient(cfg.server, token=cfg.token, ca=cfg.ca, retry=RetryPolicy(total_s=cfg.retry_s)) as edge:
        session = await edge.open_session(digest, client="dpa-eval")
        trainer = SplitTrainer(head, edge, session.session_id, dp, release_dtype=cfg.release_dtype)
        acc = await _evaluate(trainer, test_idx, manifest, cfg.batch_size)
        await edge.close_session(session.session_id)
    return {
        "test_accuracy": acc,
        "test_images": len(test_idx.paths),
        "identities": len(test_idx.names),
        "head_checkpoint": str(ckpt) if head.resumed else None,
        "privacy": _privacy_summary(cfg.dp, releases=1, elements=manifest.activation_numel),
        "config": {k: str(v) for k, v in asdict(cfg).items() if k in ("server", "artifacts", "data")},
    }
