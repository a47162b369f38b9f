"""The head's backward without its forward again: a forward graph that keeps what the backward needs, and a
backward graph that takes it.

A DP-A step runs the head's forward to make the release, and later its backward with the server's activation
gradient. The gradient graph (``exporter.gradient_graph``) takes only the images, so it runs the forward a
second time, as onnxruntime's training API does. Here the same rewritten training graph is cut in two:

- ``forward_saving.onnx``: images and parameters in; the activation (the eval graph's output) and every
  tensor that depends on the images and that the backward reads (ReLU masks, pooling indices, padded
  inputs) out;
- ``backward_model.onnx``: those tensors, the upstream gradient and the parameters in (the images too where
  a weight gradient reads them); each trainable parameter's gradient out.

A node that depends on neither the images nor the upstream gradient (constants, shapes of parameters) is
computed on whichever side needs it, so nothing but image-dependent tensors crosses. The device runs the
pair when it has kept the forward's tensors (``runtime_client.head``), the gradient graph otherwise (micro-
batches recompute). Tests hold the pair equal to the gradient graph.
"""

from __future__ import annotations

import onnx
from onnx import helper, shape_inference

from dpa.contract.manifest import GraphNames
from exporter.gradient_graph import Rewritten, graph_of, rewritten

__all__ = ["saving_models"]

_SHAPES = ("Shape", "Size")  # ops whose output is a few integers about their input, not its values


def _split(nodes: list[onnx.NodeProto]) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto], set[str]]:
    """(forward nodes, backward nodes, image-dependent tensors), each list in graph order.

    A ``Shape`` or ``Size`` of an image-dependent tensor stays in the forward (its output, a few integers, crosses);
    what is computed from shapes alone (the zero buffers a pooling gradient scatters into) is computed on
    the backward's side too, rather than crossing as a tensor of the activation's size."""
    tainted, imaged, shape_only = {GraphNames.UPSTREAM_GRAD}, {GraphNames.IMAGES}, set()
    forward: list[onnx.NodeProto] = []
    backward: list[onnx.NodeProto] = []
    for node in nodes:
        from_images = [i for i in node.input if i in imaged]
        if any(i in tainted for i in node.input):
            backward.append(node)
            tainted.update(node.output)
        elif from_images and node.op_type not in _SHAPES and all(i in shape_only for i in from_images):
            forward.append(node)  # from shapes alone: on both sides, kept where needed (graph_of prunes)
            backward.append(node)
            imaged.update(node.output)
            shape_only.update(node.output)
        elif from_images:
            forward.append(node)
            imaged.update(node.output)
            if node.op_type in _SHAPES:
                shape_only.update(node.output)
        else:  # neither: on both sides, kept where it is needed
            forward.append(node)
            backward.append(node)
    return forward, backward, imaged


def saving_models(training: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(forward_saving, backward) of a head's training graph; UnsupportedGradient as ``gradient_model``."""
    base: Rewritten = rewritten(training)
    forward, backward, imaged = _split(base.nodes)
    grads = {o.name for o in base.outputs}
    needed: set[str] = set()
    for node in reversed(backward):  # the backward's live nodes, and the image-dependent tensors they read
        if any(o in grads or o in needed for o in node.output):
            needed.update(i for i in node.input if i)
    saved = sorted((needed & (imaged - {GraphNames.IMAGES})) - _made_by(backward, needed, grads))
    types = _types(base)
    inputs = {i.name: i for i in base.inputs}
    activation = helper.make_value_info(GraphNames.ACTIVATION, types[GraphNames.ACTIVATION])
    kept = [helper.make_value_info(name, types[name]) for name in saved]
    fwd_inputs = [i for n, i in inputs.items() if n != GraphNames.UPSTREAM_GRAD]
    forward_model = graph_of(base, forward, fwd_inputs, [activation, *kept])
    backward_inputs = [i for n, i in inputs.items() if n in needed or n == GraphNames.UPSTREAM_GRAD]
    backward_model = graph_of(base, backward, backward_inputs + kept, base.outputs)
    _prune_inputs(forward_model)
    _prune_inputs(backward_model)
    return forward_model, backward_model


def _made_by(backward: list[onnx.NodeProto], needed: set[str], grads: set[str]) -> set[str]:
    """The tensors the backward's live nodes make themselves (so they are not inputs)."""
    return {o for node in backward for o in node.output if o in needed or o in grads}


def _types(base: Rewritten) -> dict[str, onnx.TypeProto]:
    """Every tensor's type (and shape where known), by shape inference over the rewritten graph."""
    model = onnx.ModelProto()
    model.CopyFrom(base.model)
    del model.graph.node[:], model.graph.input[:], model.graph.output[:], model.graph.value_info[:]
    model.graph.node.extend(base.nodes)
    model.graph.input.extend(base.inputs)
    model.graph.output.extend(base.outputs)
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", _opset(base))])
    graph = shape_inference.infer_shapes(model).graph
    return {v.name: v.type for v in [*graph.value_info, *graph.input, *graph.output]}


def _opset(base: Rewritten) -> int:
    return next(op.version for op in base.model.opset_import if op.domain in ("", "ai.onnx"))


def _prune_inputs(model: onnx.ModelProto) -> None:
    """Drop the graph inputs no node reads (a parameter only the other side needs)."""
    read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.input if i.name in read]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    onnx.checker.check_model(model)
