"""ONNX Runtime on-device-training artifacts for the head and the tail.

onnxruntime's ``generate_artifacts`` covers a whole model with a standard loss. A
split network needs two things it cannot express, so this module assembles the same
four files (training/eval/optimizer model + checkpoint) from onnxblock's pieces:

* head: the device cannot compute a loss. Its training graph takes the images and
  ``upstream_grad`` (d loss / d activation, sent back by the server) and uses the
  surrogate loss ``sum(activation * upstream_grad)``, whose parameter gradients are
  exactly the vector-Jacobian product the chain rule needs. Its eval graph is cut
  back to ``images -> activation`` so the device gets its activations with the
  current weights.
* tail: the server must return d loss / d activation. The activation input is put
  in ``requires_grad`` for the gradient graph but kept out of gradient accumulation,
  and its gradient is exposed as ``activation_gradient`` (onnxruntime's training API
  hides outputs whose names end in ``_grad``). Its eval graph is cut back to
  ``activation -> logits``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import onnx.numpy_helper
import torch
from onnx import helper
from onnxruntime.training import onnxblock
from onnxruntime.training.onnxblock import _graph_utils, _training_graph_utils
from onnxruntime.training.onnxblock import model_accessor as accessor

from dpa.base.npz import npz_bytes
from dpa.contract.manifest import ARTIFACT_FILES, GraphNames, OptimizerConfig, OptimizerName
from exporter.conv_grad import conv_input_gradients_as_convs
from exporter.gradient_graph import UnsupportedGradient, gradient_model
from exporter.relu_grad import relu_gradients_as_masks
from exporter.saved_forward import saving_models
from exporter.vggface import RELEASE_PROJECTION

__all__ = ["write_part_artifacts", "export_onnx", "OPSET"]

log = logging.getLogger(__name__)

#: The opset onnxruntime-training 1.19 builds gradients for; newer torch defaults do not load.
OPSET = 17
N = GraphNames  # short alias for the graph I/O names shared with the runtimes


def export_onnx(module: torch.nn.Module, example: torch.Tensor, input_name: str, output_name: str) -> onnx.ModelProto:
    """Trace ``module`` to ONNX in training mode (dropout kept), batch dimension dynamic."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated, but it is the one whose graphs onnxruntime-training
        # 1.19 is known to load and differentiate (the dynamo exporter targets newer IR versions).
        warnings.simplefilter("ignore", DeprecationWarning)
        # The Slice of dlib's average pool (slice + reshape + mean) makes torch warn that it cannot fold it; nothing
        # is folded here anyway (do_constant_folding=False), so torch's warning says nothing.
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
        torch.onnx.export(
            module,
            (example,),
            buf,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.TRAINING,
            export_params=True,
            dynamo=False,
        )
    return onnx.load_model_from_string(buf.getvalue())


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence onnxruntime's C++ INFO lines while graphs are built.

    The gradient-graph builder logs every graph transformer at INFO whatever the default
    logger severity is set to, which buries the CLI's output. We point file descriptor 2
    at a temp file for the duration and replay it only if building fails.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace")[-4000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class _HeadBlock(onnxblock.TrainingBlock):
    """Surrogate loss sum(activation * upstream_grad): its gradients are the head's VJP."""

    @staticmethod
    def feed_upstream_gradient(training: onnx.ModelProto) -> None:
        """d surrogate / d activation is upstream_grad itself: feed it in, in place.

        onnxruntime's gradient graph computes it as Expand(1) * upstream_grad, two passes
        over a 100 MB tensor at paper size (0.03 s of a 0.19 s head backward) for a copy.
        The surrogate's value stays an output: the training API needs one.
        """
        graph = training.graph
        target = f"{N.ACTIVATION}_grad"
        nodes = []
        for node in graph.node:
            if target in node.output:
                node = helper.make_node("Identity", [N.UPSTREAM_GRAD], [target], name="UpstreamIsActivationGrad")
            nodes.append(node)
        outputs = {o.name for o in graph.output}
        while True:  # drop what fed the old gradient and now feeds nothing
            used = {name for node in nodes for name in node.input} | outputs
            alive = [node for node in nodes if any(name in used for name in node.output if name)]
            if len(alive) == len(nodes):
                break
            nodes = alive
        del graph.node[:]
        graph.node.extend(nodes)

    def build(self, activation: str) -> str:  # type: ignore[override]
        graph = self.base.graph
        act_info = _graph_utils.get_output_from_output_name(self.base, activation)
        upstream = copy.deepcopy(act_info)
        upstream.name = N.UPSTREAM_GRAD
        graph.input.append(upstream)
        graph.node.append(helper.make_node("Mul", [activation, N.UPSTREAM_GRAD], ["_vjp_product"], name="VJPMul"))
        graph.node.append(helper.make_node("ReduceSum", ["_vjp_product"], [N.HEAD_LOSS], name="VJPSum", keepdims=0))
        return N.HEAD_LOSS


class _TailBlock(onnxblock.TrainingBlock):
    """Mean cross-entropy; the gradient graph also yields d loss / d activation (not accumulated).

    Training outputs, in order: loss, logits, activation_gradient.
    """

    def __init__(self) -> None:
        super().__init__()
        self._ce = onnxblock.loss.CrossEntropyLoss(reduction="mean")

    def build(self, logits: str) -> tuple[str, str]:  # type: ignore[override]
        # Logits are a second output so the device can show training accuracy without a second pass.
        return self._ce(logits, labels_name=N.LABELS), logits

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        # As onnxblock.TrainingBlock.__call__, except that the activation input gets a gradient
        # that is exposed as an output instead of being accumulated.
        self.base = accessor._GLOBAL_ACCESSOR.model
        output = self.build(*args, **kwargs)
        model = self.infer_shapes_on_base()
        _graph_utils.register_graph_outputs(model, output)
        self._parameters = _training_graph_utils.get_model_parameters(model, self._requires_grad, self._frozen_params)
        with_input = set(self._requires_grad) | {N.ACTIVATION}
        self._training_model, self._eval_model = _training_graph_utils.build_gradient_graph(
            model, with_input, self._frozen_params, output, accessor._GLOBAL_CUSTOM_OP_LIBRARY
        )
        _training_graph_utils.build_gradient_accumulation_graph(self._training_model, self._requires_grad)
        graph = self._training_model.graph
        raw = f"{N.ACTIVATION}_grad"
        graph.node.append(helper.make_node("Identity", [raw], [N.ACTIVATION_GRADIENT], name="ExposeActivationGrad"))
        for out in graph.output:
            if out.name == raw:
                out.name = N.ACTIVATION_GRADIENT
        accessor._GLOBAL_ACCESSOR.model.CopyFrom(self._training_model)
        return output


def _prune_eval(model: onnx.ModelProto, inputs_kept: list[str], output: onnx.ValueInfoProto) -> onnx.ModelProto:
    """Keep only what computes ``output``: drops the loss and its extra inputs from an eval graph."""
    model = copy.deepcopy(model)
    graph = model.graph
    needed = {output.name}
    kept_nodes = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept_nodes.append(node)
            needed.update(i for i in node.input if i)
    kept_nodes.reverse()
    del graph.node[:]
    graph.node.extend(kept_nodes)
    new_inputs = [i for i in graph.input if i.name in needed and (i.name in inputs_kept or not _is_user(i.name))]
    del graph.input[:]
    graph.input.extend(new_inputs)
    del graph.output[:]
    graph.output.append(copy.deepcopy(output))
    return model


def _is_user(name: str) -> bool:
    return name in (N.IMAGES, N.ACTIVATION, N.LABELS, N.UPSTREAM_GRAD)


def _optimizer_block(cfg: OptimizerConfig) -> onnxblock.blocks.Block:
    if cfg.name is OptimizerName.SGD:
        return onnxblock.optim.SGD()
    return onnxblock.optim.AdamW(weight_decay=cfg.weight_decay)


def write_part_artifacts(
    base: onnx.ModelProto, *, part: str, out_dir: Path, optimizer: OptimizerConfig, ort_format: bool = False,
    frozen: bool = False,
) -> None:  # fmt: skip
    """Write training/eval/optimizer models and the checkpoint of ``part`` ('head' or 'tail') into ``out_dir``.
    ``frozen``: a head meant to be used frozen (``--flip-average``), so a missing plain gradient graph is no
    warning."""
    params = [init.name for init in base.graph.initializer]
    block: onnxblock.TrainingBlock = _HeadBlock() if part == "head" else _TailBlock()
    for name in params:
        # The release projection (exporter.vggface.RELEASE_PROJECTION) is public and fixed: a frozen
        # parameter, kept in the checkpoint (an audit rebuilds the head from it) but never trained.
        block.requires_grad(name, not name.startswith(f"{RELEASE_PROJECTION}."))
    out_info = copy.deepcopy(base.graph.output[0])
    with _quiet_native_stderr(), onnxblock.base(base):
        block(out_info.name)
        training, eval_model = block.to_model_proto()
        parameters = block.parameters()
    eval_model = _prune_eval(eval_model, [N.IMAGES if part == "head" else N.ACTIVATION], out_info)
    if part == "head":
        _HeadBlock.feed_upstream_gradient(training)
    convs, relus = conv_input_gradients_as_convs(training), relu_gradients_as_masks(training)
    log.debug("%s: %d conv input gradients as forward convs, %d ReLU gradients as masks", part, convs, relus)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ARTIFACT_FILES
    if part == "head":
        write_plain_head(training, parameters, out_dir, frozen=frozen)
    onnx.save(training, out_dir / files.training)
    onnx.save(eval_model, out_dir / files.eval)
    onnxblock.save_checkpoint(parameters, out_dir / files.checkpoint, nominal_checkpoint=False)
    opset = next(op.version for op in base.opset_import if op.domain in ("", "ai.onnx"))
    optim = _optimizer_block(optimizer)
    with onnxblock.empty_base(opset_version=opset):
        optim(parameters)
        onnx.save(optim.to_model_proto(), out_dir / files.optimizer)
    if ort_format:
        from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

        for name in (files.training, files.eval, files.optimizer):
            convert_onnx_models_to_ort(
                out_dir / name, output_dir=out_dir, optimization_styles=[OptimizationStyle.Fixed]
            )


def write_plain_head(training: onnx.ModelProto, parameters: Any, out_dir: Path, *, frozen: bool = False) -> None:
    """What a device on plain onnxruntime needs besides the eval graph: the parameters (``parameters.npz``)
    and, where every training op has a standard form, the gradient graph (``exporter.gradient_graph``) and the
    same backward cut after a forward that keeps what it reads (``exporter.saved_forward``). A
    head without one can only be used frozen, and the device says so."""
    arrays = {t.name: onnx.numpy_helper.to_array(t) for group in parameters for t in group}
    (out_dir / ARTIFACT_FILES.parameters).write_bytes(npz_bytes(dict(sorted(arrays.items()))))
    try:
        gradient = gradient_model(training)
    except UnsupportedGradient as exc:
        log.log(logging.INFO if frozen else logging.WARNING,
                "no gradient graph for plain onnxruntime (the head can only be used frozen): %s", exc)  # fmt: skip
        return
    onnx.save(gradient, out_dir / ARTIFACT_FILES.gradient)
    forward, backward = saving_models(training)
    onnx.save(forward, out_dir / ARTIFACT_FILES.forward_saving)
    onnx.save(backward, out_dir / ARTIFACT_FILES.backward)
