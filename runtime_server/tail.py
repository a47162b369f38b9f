"""The tail network on the edge server: onnxruntime training, checkpoints, counters.

Not thread-safe by itself: the app runs every call on one worker thread, which is
what applies updates one at a time with none lost.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpa.base.atomic import TEMP_GLOB, atomic_write_with
from dpa.base.finite import all_finite
from dpa.contract.devices import ResolvedDevice
from dpa.contract.manifest import ARTIFACT_FILES, Manifest
from dpa.contract.ort_training import CheckpointState, Module, Optimizer, session_options, train_step_into
from runtime_server.records import write_digests

__all__ = ["TailModel", "TrainResult", "StepOutputs", "NonFiniteStep", "CHECKPOINT_NAME"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "tail_checkpoint"  # inside the server's state dir
_STEP = "global_step"  # checkpoint properties: counters travel with the weights, atomically
_EXAMPLES = "examples_seen"
_SESSIONS = "sessions"  # JSON {session id: [applied steps, examples]}: see runtime_server.sessions


class NonFiniteStep(ValueError):
    """The batch gave a NaN/inf loss or gradient; the step was not applied."""


@dataclass(frozen=True)
class TrainResult:
    loss: float
    logits: np.ndarray  # (B, num_classes), float32, training mode (dropout on)
    activation_gradient: np.ndarray  # (B, *activation_shape), float32
    global_step: int


@dataclass(frozen=True)
class StepOutputs:
    """Preallocated arrays a train step writes its outputs into (batch-sized views)."""

    loss: np.ndarray  # shape (), float32
    logits: np.ndarray  # (B, num_classes), float32
    activation_gradient: np.ndarray  # (B, *activation_shape), float32


class TailModel:
    def __init__(self, artifacts: Path, manifest: Manifest, device: ResolvedDevice, state_dir: Path) -> None:
        self.manifest = manifest
        self.state_dir = state_dir
        tail = artifacts / "tail"
        resume = state_dir / CHECKPOINT_NAME
        self.resumed = resume.is_file()
        self.state = CheckpointState.load_checkpoint(str(resume if self.resumed else tail / ARTIFACT_FILES.checkpoint))
        options = session_options(device.threads)
        self.module = Module(
            str(tail / ARTIFACT_FILES.training),
            self.state,
            str(tail / ARTIFACT_FILES.eval),
            device=device.ort_device,
            session_options=options,
        )
        self.optimizer = Optimizer(str(tail / ARTIFACT_FILES.optimizer), self.module)
        self.optimizer.set_learning_rate(manifest.optimizer.lr)
        props = self.state.properties
        self.global_step = int(props[_STEP]) if _STEP in props else 0
        self.examples_seen = int(props[_EXAMPLES]) if _EXAMPLES in props else 0
        self.committed_sessions: dict[str, list[int]] = json.loads(str(props[_SESSIONS])) if _SESSIONS in props else {}
        for stale in state_dir.glob(TEMP_GLOB.format(name=CHECKPOINT_NAME)):  # a save cut short by a crash
            stale.unlink(missing_ok=True)
        if self.resumed:
            log.info("tail resumed", extra={"fields": {"global_step": self.global_step}})

    def train_step(self, activation: np.ndarray, labels: np.ndarray, out: StepOutputs | None = None) -> TrainResult:
        """One SGD/AdamW step on a batch: returns the mean cross-entropy and d loss / d activation.

        With ``out`` the graph writes its outputs into those arrays (shared memory, in the
        tail worker) and the result's arrays are views of them.
        """
        self.module.train()
        activation = np.asarray(activation, dtype=np.float32)  # a float16 release, widened: the graph takes float32
        if out is None:
            loss, logits, grad = self.module(activation, labels)
        else:
            train_step_into(self.module, (activation, labels), (out.loss, out.logits, out.activation_gradient))
            loss, logits, grad = out.loss[()], out.logits, out.activation_gradient
        if not (np.isfinite(loss) and all_finite(grad)):
            # Applying it would poison the shared tail for every device: drop the gradients instead.
            self.module.lazy_reset_grad()
            raise NonFiniteStep("this batch gives a non-finite loss or gradient (activations too large?); not applied")
        self.optimizer.step()
        self.module.lazy_reset_grad()
        self.global_step += 1
        self.examples_seen += int(labels.shape[0])
        return TrainResult(float(loss), logits, grad, self.global_step)

    def eval_step(self, activation: np.ndarray) -> np.ndarray:
        self.module.eval()
        return self.module(np.asarray(activation, dtype=np.float32))

    def parameters(self) -> dict[str, np.ndarray]:
        """Copies of the current weights, by name (tests compare them against torch)."""
        return {name: np.array(p.data) for name, p in self.state.parameters}

    def load_parameters(self, values: dict[str, np.ndarray]) -> None:
        """Replace every weight (by name, same shapes), e.g. with the average of several edge servers' tails
        (SplitFed, ``dpa.federation.splitfed``). ValueError naming what does not fit; nothing changes then."""
        have = {name: p.data.shape for name, p in self.state.parameters}
        bad = sorted(set(have) ^ set(values)) + [
            f"{n} {np.shape(v)} != {have[n]}" for n, v in values.items() if n in have and np.shape(v) != have[n]
        ]
        if bad:
            raise ValueError(f"tail parameters do not fit this export: {', '.join(bad)}")
        for name, value in values.items():
            self.state.parameters[name] = np.ascontiguousarray(value, dtype=np.float32)

    def save(self, sessions: dict[str, list[int]] | None = None) -> Path:
        """Write weights, optimizer state, counters and session steps to one file, atomically."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / CHECKPOINT_NAME
        self.state.properties[_STEP] = self.global_step
        self.state.properties[_EXAMPLES] = self.examples_seen
        if sessions is not None:
            self.state.properties[_SESSIONS] = json.dumps(sessions, separators=(",", ":"))
        # onnxruntime's SGD has no momentum, yet its optimizer state is parameter-sized (it doubles the
        # checkpoint). Resuming without it trains identically (kill test).
        with_state = self.manifest.optimizer.name != "sgd"

        def write(tmp: Path) -> None:
            CheckpointState.save_checkpoint(self.state, str(tmp), with_state)
            write_digests(path, tmp)  # before the rename: a crash between them still leaves a checkpoint that verifies

        atomic_write_with(path, write)
        log.debug("tail checkpoint saved", extra={"fields": {"global_step": self.global_step}})
        return path
