"""The head network on the device, on plain onnxruntime: forward for activations, VJP backward, optimizer step.

The device needs its activations before it can ask the server for their gradient, so a step runs the eval
graph (images and parameters -> activation), then, once the upstream gradient is back, the export's
gradient graph (images, upstream gradient and parameters -> each parameter's gradient; built by
``exporter.gradient_graph`` from onnxruntime's own autodiff, in standard ONNX ops) and applies the
manifest's optimizer in numpy (``runtime_client.optimizers``). Neither needs onnxruntime-training, which has
no wheel for Python 3.12 or later, nor for aarch64: plain onnxruntime is current on both.

The parameters live in numpy; the device's checkpoint (``HEAD_CHECKPOINT`` in its state folder) is a zip of
``.npy`` arrays: the parameters, the optimizer's state and the run's properties (``properties.json``),
written whole or not at all.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dpa.base.atomic import atomic_write_bytes
from dpa.base.npz import npz_bytes
from dpa.contract.choices import Choice
from dpa.contract.devices import ResolvedDevice
from dpa.contract.errors import UserError
from dpa.contract.manifest import ARTIFACT_FILES, GraphNames, Manifest, load_release_centre
from dpa.contract.ort_sessions import inference_session
from runtime_client.optimizers import HeadOptimizer

__all__ = ["HeadModel", "ModelFormat", "HEAD_CHECKPOINT", "run_state_path", "load_head_checkpoint", "GRAD_SUFFIX"]

log = logging.getLogger(__name__)

HEAD_CHECKPOINT = "head_checkpoint"
GRAD_SUFFIX = ".grad"  # the gradient graph's output for a parameter (exporter.gradient_graph)
_PROPERTIES = "properties.json"


def run_state_path(checkpoint: Path) -> Path:
    """Where a frozen head's run state (the checkpoint's properties) is kept beside ``checkpoint``."""
    return Path(checkpoint).with_name(Path(checkpoint).name + ".run.json")


class ModelFormat(Choice):
    AUTO = "auto"  # ORT format when the export has it, else ONNX
    ONNX = "onnx"
    ORT = "ort"  # the format ONNX Runtime Mobile loads (dpa export --ort-format)


def _eval_path(head_dir: Path, fmt: ModelFormat) -> tuple[Path, str]:
    ort = head_dir / Path(ARTIFACT_FILES.eval).with_suffix(".ort").name
    if fmt is ModelFormat.ORT or (fmt is ModelFormat.AUTO and ort.is_file()):
        if not ort.is_file():
            raise UserError(f"no ORT-format head in {head_dir} (missing {ort.name}): export with --ort-format")
        return ort, "ort"
    return head_dir / ARTIFACT_FILES.eval, "onnx"


def _read_npz(source: Path) -> tuple[dict[str, np.ndarray], dict[str, bytes]]:
    """(the ``.npy`` members as arrays, any other member as its bytes), in one reading of the file."""
    with np.load(source, allow_pickle=False) as z:
        members = {k: z[k] for k in z.files}
    return {k: v for k, v in members.items() if isinstance(v, np.ndarray)}, {
        k: v for k, v in members.items() if isinstance(v, bytes)
    }


def load_head_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """(parameters, optimizer state, properties) of a device's head checkpoint; a clear error otherwise."""
    try:
        arrays, files = _read_npz(Path(path))
        props = json.loads(files[_PROPERTIES]) if _PROPERTIES in files else {}
    except (OSError, zipfile.BadZipFile, ValueError, KeyError) as exc:
        raise UserError(
            f"{path} is not a dpa head checkpoint ({exc}); a checkpoint written by onnxruntime-training (dpa "
            "before the device moved to plain onnxruntime) cannot be resumed: start the run again"
        ) from None
    params = {k[2:]: v for k, v in arrays.items() if k.startswith("p/")}
    state = {k[2:]: v for k, v in arrays.items() if k.startswith("o/")}
    return params, state, props


def _json(props: Mapping[str, Any]) -> str:
    """The properties as JSON: numbers, strings (numpy scalars as their Python values)."""
    return json.dumps(dict(props), default=lambda v: v.item() if isinstance(v, np.generic) else str(v))


def _checkpoint_bytes(
    params: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray], props: Mapping[str, Any]
) -> bytes:
    arrays = {f"p/{k}": params[k] for k in sorted(params)} | {f"o/{k}": state[k] for k in sorted(state)}
    return npz_bytes(arrays, {_PROPERTIES: _json(props).encode()})


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
        self._head_dir = Path(artifacts) / "head"
        evaluation, self.format = _eval_path(self._head_dir, model_format)
        self._device = device
        self.resumed = checkpoint is not None and Path(checkpoint).is_file()
        if self.resumed:
            assert checkpoint is not None
            self._params, state, props = load_head_checkpoint(checkpoint)
        else:
            self._params, state, props = self._exported_parameters(), {}, {}
        self._session = inference_session(str(evaluation), device.threads, device.providers)
        self.providers = tuple(self._session.get_providers())  # what actually runs the head
        self._inputs = [i.name for i in self._session.get_inputs() if i.name != GraphNames.IMAGES]
        missing = [n for n in self._inputs if n not in self._params]
        if missing:
            raise UserError(f"{self._head_dir}: the head's parameters lack {', '.join(missing[:3])}")
        self._gradient: Any = None  # the gradient graph's session, opened on the first backward
        self._saving: tuple[Any, ...] | None = None  # the kept-forward pair's sessions (() where absent)
        self._saving_names: tuple[list[str], ...] = ([], [], [], [])
        self._kept: tuple[np.ndarray, dict[str, np.ndarray]] | None = None  # a training forward's images and tensors
        self._grads: dict[str, np.ndarray] = {}
        self.activation_shape = manifest.activation_shape
        # Centred releases: the public constant subtracted from every activation before clipping.
        # d(a - c)/da = I, so the VJP the device applies is unchanged.
        self.centre = load_release_centre(artifacts, manifest)
        self.lr = manifest.optimizer.lr if lr is None else lr
        self.optimizer = HeadOptimizer(manifest.optimizer, self.lr, state)
        # A frozen head (public weights, never stepped) keeps no optimizer state; its run state lives in a
        # small JSON file beside its checkpoint (run_state_path), rewritten after every step, while the
        # unchanged weights are written once, on the first save.
        self.frozen = frozen
        self._props: dict[str, Any] = props
        self._weights_at: Path | None = None
        if frozen and self.resumed:
            assert checkpoint is not None
            sidecar = run_state_path(checkpoint)
            if sidecar.is_file():
                self._props = json.loads(sidecar.read_text())

    def _exported_parameters(self) -> dict[str, np.ndarray]:
        path = self._head_dir / ARTIFACT_FILES.parameters
        if not path.is_file():
            raise UserError(f"{path} is missing: export again with this dpa (it writes the head's parameters)")
        return {k: np.array(v, dtype=np.float32) for k, v in _read_npz(path)[0].items()}

    def _feeds(self, names: list[str]) -> dict[str, np.ndarray]:
        return {n: self._params[n] for n in names}

    def forward(self, images: np.ndarray, keep: bool = False) -> np.ndarray:
        """(B, 3, H, W) float32 -> activation (B, *activation_shape), minus the release centre if any.

        ``keep``: a training step's forward; the tensors the backward reads are kept, so that the next
        ``accumulate`` of these same images runs the backward alone (``exporter.saved_forward``) instead of
        the gradient graph, which runs the forward again."""
        a = self._forward_keeping(images) if keep else self.embed(images)
        if self.centre is not None:
            a -= self.centre
        return a

    def embed(self, images: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 -> the head's own output, NOT centred: the embedding the public network was
        trained to compare by cosine (CosFace), which verification scores pairs with. A projected export
        (``Manifest.release_dims``) centres inside its graph, so there it is the projected activation."""
        feeds = {GraphNames.IMAGES: np.ascontiguousarray(images, dtype=np.float32), **self._feeds(self._inputs)}
        return self._session.run(None, feeds)[0]

    def _saving_sessions(self) -> tuple[Any, Any] | None:
        """The forward that keeps and the backward that takes (None where the export has no such pair); their
        input and output names, read once (``_saving_names``: forward inputs, kept outputs, backward inputs, the
        parameters whose gradients the backward gives)."""
        if self._saving is None:
            paths = [self._head_dir / ARTIFACT_FILES.forward_saving, self._head_dir / ARTIFACT_FILES.backward]
            if not all(p.is_file() for p in paths):
                self._saving = ()
                return None
            fwd, bwd = (inference_session(str(p), self._device.threads, self._device.providers) for p in paths)
            self._saving = (fwd, bwd)
            self._saving_names = (
                [i.name for i in fwd.get_inputs() if i.name != GraphNames.IMAGES],
                [o.name for o in fwd.get_outputs()][1:],
                [i.name for i in bwd.get_inputs()],
                [o.name.removesuffix(GRAD_SUFFIX) for o in bwd.get_outputs()],
            )
        return self._saving or None

    def _forward_keeping(self, images: np.ndarray) -> np.ndarray:
        sessions = self._saving_sessions()
        if sessions is None:
            return self.embed(images)
        x = np.ascontiguousarray(images, dtype=np.float32)
        inputs, kept = self._saving_names[:2]
        outputs = sessions[0].run(None, {GraphNames.IMAGES: x, **self._feeds(inputs)})
        self._kept = (x, dict(zip(kept, outputs[1:], strict=True)))
        return outputs[0]

    def _backward_kept(
        self, images: np.ndarray, upstream_gradient: np.ndarray
    ) -> tuple[list[str], list[np.ndarray]] | None:  # fmt: skip
        """(parameter names, their gradients) from the kept forward of these same images, or None (nothing kept
        for them)."""
        kept, self._kept = self._kept, None
        sessions = self._saving_sessions()
        if kept is None or sessions is None or kept[0].shape != images.shape or not np.array_equal(kept[0], images):
            return None
        x, saved = kept
        given = {GraphNames.UPSTREAM_GRAD: np.ascontiguousarray(upstream_gradient, dtype=np.float32),
                 GraphNames.IMAGES: x, **saved}  # fmt: skip
        feeds = {n: given[n] if n in given else self._params[n] for n in self._saving_names[2]}
        return self._saving_names[3], sessions[1].run(None, feeds)

    def backward_step(self, images: np.ndarray, upstream_gradient: np.ndarray) -> None:
        """Accumulate d loss / d head parameters = J^T upstream_gradient, then take an optimizer step."""
        self.accumulate(images, upstream_gradient)
        self.step()

    def _gradient_session(self) -> Any:
        if self._gradient is None:
            path = self._head_dir / ARTIFACT_FILES.gradient
            if not path.is_file():
                raise UserError(
                    f"{path.parent} has no gradient graph (its training ops have no standard ONNX form, or it was "
                    "exported before plain-onnxruntime training): this head can only be used frozen"
                )
            self._gradient = inference_session(str(path), self._device.threads, self._device.providers)
            self._grad_inputs = [
                i.name for i in self._gradient.get_inputs()
                if i.name not in (GraphNames.IMAGES, GraphNames.UPSTREAM_GRAD)
            ]  # fmt: skip
            self._grad_names = [o.name.removesuffix(GRAD_SUFFIX) for o in self._gradient.get_outputs()]
        return self._gradient

    def accumulate(self, images: np.ndarray, upstream_gradient: np.ndarray) -> None:
        """Add J^T upstream_gradient for these examples to the parameter gradients (no update yet).

        The surrogate loss is a sum over examples, so accumulating example by example gives
        exactly the batch's gradient: a device can run its backward in micro-batches.
        """
        named = self._backward_kept(images, upstream_gradient)
        if named is None:  # the gradient graph, which runs the forward again (opened only where it is needed)
            session = self._gradient_session()
            feeds = {
                GraphNames.IMAGES: np.ascontiguousarray(images, dtype=np.float32),
                GraphNames.UPSTREAM_GRAD: np.ascontiguousarray(upstream_gradient, dtype=np.float32),
                **self._feeds(self._grad_inputs),
            }
            named = self._grad_names, session.run(None, feeds)
        for name, g in zip(*named, strict=True):
            if name in self._grads:
                self._grads[name] += g
            else:
                self._grads[name] = g

    def reset_gradients(self) -> None:
        """Drop gradients accumulated since the last step (a retried step starts over)."""
        self._grads = {}
        self._kept = None

    def step(self) -> None:
        """Apply the accumulated gradients, then clear them."""
        if self.frozen:
            raise RuntimeError("a frozen head is never stepped (its optimizer state is not saved)")
        self.optimizer.step(self._params, self._grads)
        self._grads = {}

    def parameters(self) -> dict[str, np.ndarray]:
        return {name: p.copy() for name, p in self._params.items()}

    @property
    def properties(self) -> dict[str, Any]:
        """Properties (ints, floats, strings) saved with the weights: the trainer's progress."""
        return self._props

    def save(self, path: Path) -> None:
        """Weights, optimizer state and properties to ``path``, atomically (temp file, fsync, rename).

        A frozen head writes its weights (and the properties so far) once, then only the properties, to
        ``run_state_path(path)``, atomically: a resumed frozen head reads them from there."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.frozen:
            if self._weights_at != path:
                atomic_write_bytes(path, _checkpoint_bytes(self._params, {}, self._props))
                self._weights_at = path
            atomic_write_bytes(run_state_path(path), _json(self._props).encode())
            return
        atomic_write_bytes(path, _checkpoint_bytes(self._params, self.optimizer.state, self._props))
