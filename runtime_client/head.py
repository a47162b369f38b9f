"""The head network on the device: forward for activations, VJP backward, optimizer step.

onnxruntime's training step runs forward and backward together, but the device
needs its activations before it can ask the server for their gradient. So a step
runs the eval graph (images -> activation), then, once the upstream gradient is
back, the training graph (images, upstream_gradient -> accumulated gradients).
For a conv1_1 head the repeated forward is one convolution.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from dpa.base.atomic import atomic_write_bytes, atomic_write_with
from dpa.contract.choices import Choice
from dpa.contract.devices import ResolvedDevice
from dpa.contract.errors import UserError
from dpa.contract.manifest import ARTIFACT_FILES, Manifest, load_release_centre
from dpa.contract.ort_training import CheckpointState, Module, Optimizer, session_options

__all__ = ["HeadModel", "ModelFormat", "HEAD_CHECKPOINT", "run_state_path"]

log = logging.getLogger(__name__)

HEAD_CHECKPOINT = "head_checkpoint"


def run_state_path(checkpoint: Path) -> Path:
    """Where a frozen head's run state (the checkpoint's properties) is kept beside ``checkpoint``."""
    return Path(checkpoint).with_name(Path(checkpoint).name + ".run.json")


class ModelFormat(Choice):
    AUTO = "auto"  # ORT format when the export has it, else ONNX
    ONNX = "onnx"
    ORT = "ort"  # the format ONNX Runtime Mobile loads (dpa export --ort-format)


def _model_paths(head_dir: Path, fmt: ModelFormat) -> tuple[Path, Path, Path, str]:
    names = ARTIFACT_FILES.onnx_models()
    ort = [head_dir / Path(n).with_suffix(".ort").name for n in names]
    if fmt is ModelFormat.ORT or (fmt is ModelFormat.AUTO and all(p.is_file() for p in ort)):
        missing = [p.name for p in ort if not p.is_file()]
        if missing:
            raise UserError(
                f"no ORT-format head in {head_dir} (missing {', '.join(missing)}): export with --ort-format"
            )
        return ort[0], ort[1], ort[2], "ort"
    paths = [head_dir / n for n in names]
    return paths[0], paths[1], paths[2], "onnx"


class HeadModel:
    def __init__(
        self,
        artifacts: Path,
        manifest: Manifest,
        device: ResolvedDevice,
        *,
        checkpoint: Path | None = None,
        lr: float | None = None,
        model_format: ModelFormat = ModelFormat.AUTO,
        frozen: bool = False,
    ) -> None:
        head = Path(artifacts) / "head"
        training, evaluation, optimizer, self.format = _model_paths(head, model_format)
        start = checkpoint if checkpoint is not None and checkpoint.is_file() else head / ARTIFACT_FILES.checkpoint
        self.resumed = start != head / ARTIFACT_FILES.checkpoint
        self.state = CheckpointState.load_checkpoint(str(start))
        options = session_options(device.threads)
        self.module = Module(
            str(training), self.state, str(evaluation), device=device.ort_device, session_options=options
        )
        self.optimizer = Optimizer(str(optimizer), self.module)
        self.activation_shape = manifest.activation_shape
        # Centred releases: the public constant subtracted from every activation before clipping.
        # d(a - c)/da = I, so the VJP the device applies is unchanged.
        self.centre = load_release_centre(artifacts, manifest)
        self.lr = manifest.optimizer.lr if lr is None else lr
        # A frozen head (public weights, never stepped) keeps its optimizer's initial state: saving it
        # with every step's checkpoint tripled the file at pool5 with AdamW for nothing.
        self.frozen = frozen
        self._optimizer_state = manifest.optimizer.name != "sgd" and not frozen
        # A frozen head's run state lives in a small JSON file beside its checkpoint (run_state_path): the
        # trainer saves it after every step, and rewriting the unchanged weights with it each time cost a
        # pool5 demo run 9 ms a step. The weights are written once, on the first save.
        self._props: dict[str, object] | None = None
        self._weights_at: Path | None = None
        if frozen:
            sidecar = run_state_path(start)
            self._props = (
                json.loads(sidecar.read_text()) if self.resumed and sidecar.is_file() else dict(self.state.properties)
            )
        self.optimizer.set_learning_rate(self.lr)

    def forward(self, images: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 -> activation (B, *activation_shape), minus the release centre if any."""
        a = self.embed(images)
        if self.centre is not None:
            a -= self.centre
        return a

    def embed(self, images: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 -> the head's own output, NOT centred: the embedding the public network was
        trained to compare by cosine (CosFace), which verification scores pairs with. A projected export
        (``Manifest.release_dims``) centres inside its graph, so there it is the projected activation."""
        self.module.eval()
        return self.module(images)

    def backward_step(self, images: np.ndarray, upstream_gradient: np.ndarray) -> None:
        """Accumulate d loss / d head parameters = J^T upstream_gradient, then take an optimizer step."""
        self.accumulate(images, upstream_gradient)
        self.step()

    def accumulate(self, images: np.ndarray, upstream_gradient: np.ndarray) -> None:
        """Add J^T upstream_gradient for these examples to the parameter gradients (no update yet).

        The surrogate loss is a sum over examples, so accumulating example by example gives
        exactly the batch's gradient: a device can run its backward in micro-batches.
        """
        self.module.train()
        self.module(images, upstream_gradient)

    def reset_gradients(self) -> None:
        """Drop gradients accumulated since the last step (a retried step starts over)."""
        self.module.lazy_reset_grad()

    def step(self) -> None:
        """Apply the accumulated gradients, then clear them."""
        if self.frozen:
            raise RuntimeError("a frozen head is never stepped (its optimizer state is not saved)")
        self.optimizer.step()
        self.module.lazy_reset_grad()

    def parameters(self) -> dict[str, np.ndarray]:
        return {name: np.array(p.data) for name, p in self.state.parameters}

    @property
    def properties(self):  # type: ignore[no-untyped-def]
        """Checkpoint properties (ints, floats, strings) saved with the weights: the trainer's progress."""
        return self.state.properties if self._props is None else self._props

    def save(self, path: Path) -> None:
        """Weights, optimizer state and properties to ``path``, atomically (temp file, fsync, rename).

        A frozen head writes its weights (and the properties so far) once, then only the properties, to
        ``run_state_path(path)``, atomically: a resumed frozen head reads them from there."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if self._props is not None:
            if self._weights_at != path:
                for key, value in self._props.items():
                    self.state.properties[key] = value
                atomic_write_with(path, lambda tmp: CheckpointState.save_checkpoint(self.state, str(tmp), False))
                self._weights_at = path
            atomic_write_bytes(run_state_path(path), json.dumps(self._props).encode())
            return
        # As the tail (runtime_server/tail.py): SGD's parameter-sized optimizer state is not needed to resume.
        with_state = self._optimizer_state
        atomic_write_with(path, lambda tmp: CheckpointState.save_checkpoint(self.state, str(tmp), with_state))
