"""The head's backward as an ordinary inference graph, for plain onnxruntime.

onnxruntime-training has had no release since 1.19.2: no wheel for Python 3.12 or later, none for aarch64.
Plain onnxruntime is current everywhere, but it runs none of the training ops (``com.microsoft`` ConvGrad,
``MaxPoolGrad``, gradient accumulators). So the exporter takes the training graph onnxruntime's own
autodiff built for the head (``onnxblock``) and rewrites each training op into standard ONNX ops:

- ``ConvGrad`` -> the input gradient as a ``ConvTranspose`` (where ``conv_grad`` has not already made it a
  forward convolution), padded back to the input's size; the weight gradient as a convolution of the input
  (batch and channels swapped) with the output gradient dilated by the stride; the bias gradient a sum;
- ``MaxPoolGrad`` -> every output gradient added at its argmax (``ScatterElements``, reduction ``add``:
  exact for overlapping windows too);
- ``SliceGrad`` -> the gradient padded back into the sliced input's shape (unit steps);
- ``Scale`` -> a multiplication (or a division);
- ``InPlaceAccumulatorV2`` -> dropped: the graph returns each parameter's gradient, and the device sums
  micro-batches itself.

The result takes the images, the upstream gradient and every parameter as inputs and returns one gradient
per trainable parameter (``<name>.grad``), in the training graph's parameter order. A graph with any other
training op is refused (``UnsupportedGradient``), naming the op, and the export then ships no gradient
graph: such a head can still be used frozen. The device applies the optimizer itself, in numpy
(``runtime_client.optimizers``). Checked against torch autograd in the tests and by ``exporter.verify``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass

import onnx
import onnx.numpy_helper
from onnx import TensorProto, helper

__all__ = [
    "GRAD_SUFFIX",
    "Rewritten",
    "UnsupportedGradient",
    "gradient_model",
    "graph_of",
    "rewritten",
    "trainable_parameters",
]

#: A parameter's gradient output is named ``<parameter><GRAD_SUFFIX>``.
GRAD_SUFFIX = ".grad"

_MS = "com.microsoft"
_ACCUMULATOR = "InPlaceAccumulatorV2"
_TRAINING_OPS = {"ConvGrad", "MaxPoolGrad", "SliceGrad", "Scale", _ACCUMULATOR}


class UnsupportedGradient(ValueError):
    """The head's training graph uses a training op this module cannot write in standard ONNX."""


def trainable_parameters(training: onnx.ModelProto) -> list[str]:
    """The parameters the training graph accumulates a gradient for, in its order."""
    return [n.input[1].removesuffix("_grad") for n in training.graph.node if n.op_type == _ACCUMULATOR]


@dataclass(frozen=True)
class Rewritten:
    """The training graph in standard ONNX, before anything is pruned: every node in graph order (the forward
    that makes the activation, the backward, the gradients named ``<parameter>.grad``), the inputs kept (images,
    upstream gradient, parameters) and one output description per trainable parameter's gradient."""

    model: onnx.ModelProto  # a copy of the training model, to build graphs from
    nodes: list[onnx.NodeProto]
    inputs: list[onnx.ValueInfoProto]
    outputs: list[onnx.ValueInfoProto]


def rewritten(training: onnx.ModelProto) -> Rewritten:
    """Every training op rewritten in standard ONNX (module docstring); UnsupportedGradient if one cannot be."""
    model = copy.deepcopy(training)
    graph = model.graph
    params = trainable_parameters(training)
    grads = {n.input[1]: n.input[1].removesuffix("_grad") for n in graph.node if n.op_type == _ACCUMULATOR}
    ctx = _Context(
        pools={n.output[1]: n.input[0] for n in graph.node if n.op_type == "MaxPool" and len(n.output) > 1},
        constants={n.output[0]: helper.get_attribute_value(n.attribute[0]) for n in graph.node
                   if n.op_type == "Constant" and n.attribute} | {t.name: t for t in graph.initializer},
        shapes={i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input},
    )  # fmt: skip
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == _ACCUMULATOR:
            continue
        if node.op_type in _TRAINING_OPS and node.domain in ("", "ai.onnx", _MS):
            nodes += _REWRITES[node.op_type](node, ctx)
        elif node.domain not in ("", "ai.onnx"):
            raise UnsupportedGradient(f"the head's training graph uses {node.domain}.{node.op_type}")
        else:
            nodes.append(node)
    for grad, param in grads.items():  # name each gradient after its parameter
        nodes.append(helper.make_node("Identity", [grad], [param + GRAD_SUFFIX], name=f"{param}/grad"))
    kept_inputs = [
        i for i in graph.input if not i.name.endswith(".accumulation.buffer") and i.name != "lazy_reset_grad"
    ]
    by_name = {i.name: i for i in graph.input}
    outputs = []
    for param in params:  # a gradient has its parameter's type and shape
        out = copy.deepcopy(by_name[param])
        out.name = param + GRAD_SUFFIX
        outputs.append(out)
    return Rewritten(model, nodes, kept_inputs, outputs)


def graph_of(
    base: Rewritten, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
) -> onnx.ModelProto:  # fmt: skip
    """A standard-ONNX model of the nodes the outputs need, with these inputs, checked."""
    model = copy.deepcopy(base.model)
    graph = model.graph
    del graph.node[:], graph.input[:], graph.output[:], graph.value_info[:]
    graph.node.extend(_live(nodes, [o.name for o in outputs]))
    graph.input.extend(inputs)
    graph.output.extend(outputs)
    opset = _opset(base.model)
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def gradient_model(training: onnx.ModelProto) -> onnx.ModelProto:
    """The standard-ONNX gradient graph of a head's training graph (module docstring)."""
    base = rewritten(training)
    return graph_of(base, base.nodes, base.inputs, base.outputs)


def _opset(model: onnx.ModelProto) -> int:
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


def _live(nodes: list[onnx.NodeProto], outputs: Iterable[str]) -> list[onnx.NodeProto]:
    """The nodes the outputs depend on, in their order (the surrogate loss and what only it used go)."""
    needed = set(outputs)
    keep = []
    for node in reversed(nodes):
        if any(o and o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    return keep[::-1]


@dataclass(frozen=True)
class _Context:
    """What a rewrite needs from the rest of the graph."""

    pools: dict[str, str]  # a MaxPool's indices -> its input (MaxPoolGrad has no input of that shape)
    constants: dict[str, object]  # a Constant node's output -> its value (a TensorProto)
    shapes: dict[str, list[int]]  # a graph input (the parameters among them) -> its dims (0: not fixed)


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Nodes:
    """Builds the standard nodes that replace one training node; every name is prefixed by that node's."""

    def __init__(self, node: onnx.NodeProto) -> None:
        self.prefix = f"{node.name or node.output[0]}/std"
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs: object) -> str:
        name = out or f"{self.prefix}/{op_type}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=f"{self.prefix}/{len(self.nodes)}", **attrs))
        return name

    def ints(self, values: list[int]) -> str:
        tensor = helper.make_tensor(f"{self.prefix}/c{len(self.nodes)}", TensorProto.INT64, [len(values)], values)
        return self.op("Constant", [], value=tensor)


def _conv_grad(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    dy, x, w = node.input[:3]
    dx, dw, db = (list(node.output) + ["", "", ""])[:3]
    a = _attrs(node)
    kernel = list(a["kernel_shape"])  # type: ignore[call-overload]
    k = len(kernel)
    strides = list(a.get("strides", [1] * k))  # type: ignore[call-overload]
    pads = list(a.get("pads", [0] * 2 * k))  # type: ignore[call-overload]
    if a.get("group", 1) != 1 or any(d != 1 for d in a.get("dilations", [1] * k)):  # type: ignore[attr-defined]
        raise UnsupportedGradient(f"{node.name}: ConvGrad with groups or dilations")
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UnsupportedGradient(f"{node.name}: ConvGrad with auto_pad")
    b = _Nodes(node)
    spatial = list(range(2, 2 + k))
    if dx:  # d x = ConvTranspose(dy, w), then zeros where the input's last rows fed no output
        t = b.op("ConvTranspose", [dy, w], kernel_shape=kernel, strides=strides, pads=pads)
        diff = b.op("Sub", [b.op("Shape", [x]), b.op("Shape", [t])])
        b.op("Pad", [t, b.op("Concat", [b.ints([0] * (2 + k)), diff], axis=0)], out=dx)
    if dw:
        in_channels = (ctx.shapes.get(w) or [0, 0])[1]
        pixels = math.prod((ctx.shapes.get("images") or [0, 0, 0, 0])[2:])
        if 0 < in_channels <= _FEW_CHANNELS and pixels >= _MANY_PIXELS:
            _weight_gradient_by_conv(b, dy, x, dw, kernel, strides, pads)
        else:
            _weight_gradient(b, dy, x, dw, kernel, strides, pads)
    if db:
        b.op("ReduceSum", [dy, b.ints([0, *spatial])], out=db, keepdims=0)
    return b.nodes


#: A first layer's weight gradient (up to this many input channels: RGB) on large images is one convolution
#: with batch and channels swapped: at 224x224 conv1_1 the device's step took 1.03x the training API's, where
#: the offset-by-offset GEMMs took 1.14x. Elsewhere those GEMMs: at 64x64 conv1_1 1.08x against 1.31x, and
#: deeper (many input channels, one image per channel for that convolution) 1.20x against 1.72x at pool3.
#: Measured on a 2-core Xeon with AVX-512 (BENCHMARKS.md); a speed choice only, the gradients are the same.
_FEW_CHANNELS = 8
_MANY_PIXELS = 112 * 112


def _weight_gradient_by_conv(
    b: _Nodes, dy: str, x: str, dw: str, kernel: list[int], strides: list[int], pads: list[int]
) -> None:
    """dW as one convolution: the input with batch and channels swapped, convolved with dy (the strides as
    its dilations), cut to the kernel's size and transposed back."""
    k = len(kernel)
    spatial = list(range(2, 2 + k))
    xt = b.op("Transpose", [x], perm=[1, 0, *spatial])
    gt = b.op("Transpose", [dy], perm=[1, 0, *spatial])
    r = b.op("Conv", [xt, gt], pads=pads, dilations=strides, strides=[1] * k)
    r = b.op("Slice", [r, b.ints([0] * k), b.ints(kernel), b.ints(spatial)])
    b.op("Transpose", [r], out=dw, perm=[1, 0, *spatial])


def _weight_gradient(
    b: _Nodes, dy: str, x: str, dw: str, kernel: list[int], strides: list[int], pads: list[int]
) -> None:
    """dW[o, i, kh, kw] = sum over examples and positions of dy[o] times x[i] at (position * stride + k): for
    each kernel offset, the padded input's strided slice there (standard Slice ops) times dy, one batched GEMM
    each (ConvGrad's im2col GEMM, offset by offset), summed over the examples."""
    k = len(kernel)
    spatial = list(range(2, 2 + k))
    xp = b.op("Pad", [x, b.ints([0, 0, *pads[:k], 0, 0, *pads[k:]])]) if any(pads) else x
    out_size = b.op("Slice", [b.op("Shape", [dy]), b.ints([2]), b.ints([2 + k])])  # (Hy, Wy)
    span = b.op("Add", [b.op("Mul", [b.op("Sub", [out_size, b.ints([1] * k)]), b.ints(strides)]), b.ints([1] * k)])
    offsets = [[]]  # every kernel offset, in the weight's (kh, kw) order
    for size in kernel:
        offsets = [o + [j] for o in offsets for j in range(size)]
    positions = b.op("ReduceProd", [out_size], keepdims=1)  # [P]
    per_position = b.op("Reshape", [dy, b.op("Concat", [b.ints([0, 0]), positions], axis=0)])  # (N, Co, P)
    dy_t = b.op("Transpose", [per_position], perm=[0, 2, 1])  # (N, P, Co)
    flat_shape = b.op("Concat", [b.ints([0, 0]), positions], axis=0)
    cols = []
    for offset in offsets:  # one GEMM per kernel offset: x at that offset (N, Ci, P) times dy (N, P, Co)
        start = b.ints(offset)
        piece = b.op("Slice", [xp, start, b.op("Add", [start, span]), b.ints(spatial), b.ints(strides)])
        product = b.op("MatMul", [b.op("Reshape", [piece, flat_shape]), dy_t])  # (N, Ci, Co)
        cols.append(b.op("Unsqueeze", [product, b.ints([3])]))
    stacked = b.op("Concat", cols, axis=3) if len(cols) > 1 else cols[0]  # (N, Ci, Co, K)
    summed = b.op("ReduceSum", [stacked, b.ints([0])], keepdims=0)  # (Ci, Co, K)
    b.op("Reshape", [b.op("Transpose", [summed], perm=[1, 0, 2]), b.ints([0, 0, *kernel])], out=dw)


def _max_pool_grad(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    """Each output gradient added at its argmax: onnxruntime's indices are flat over the whole input."""
    dy, indices = node.input[:2]
    (dx,) = node.output[:1]
    a = _attrs(node)
    if a.get("storage_order", 0) != 0:
        raise UnsupportedGradient(f"{node.name}: MaxPoolGrad with column-major indices")
    b = _Nodes(node)
    x = ctx.pools[indices]  # the pooled input's shape: MaxPoolGrad has no input of it, its MaxPool does
    size = b.op("Unsqueeze", [b.op("Size", [x]), b.ints([0])])
    zeros = b.op("ConstantOfShape", [size], value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    flat = b.ints([-1])
    scattered = b.op("ScatterElements", [zeros, b.op("Reshape", [indices, flat]), b.op("Reshape", [dy, flat])],
                     axis=0, reduction="add")  # fmt: skip
    b.op("Reshape", [scattered, b.op("Shape", [x])], out=dx)
    return b.nodes


def _slice_grad(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    """dy padded back into the sliced input's shape: zeros before each axis's (clamped) start and after."""
    dy, shape, starts, _ends, axes = node.input[:5]
    (dx,) = node.output[:1]
    if len(node.input) > 5 and node.input[5]:
        steps = ctx.constants.get(node.input[5])
        if steps is None or any(v != 1 for v in onnx.numpy_helper.to_array(steps).ravel()):  # type: ignore[arg-type]
            raise UnsupportedGradient(f"{node.name}: SliceGrad with steps other than 1")
    b = _Nodes(node)
    dims = b.op("Gather", [shape, axes], axis=0)
    s = b.op("Cast", [starts], to=TensorProto.INT64)
    s = b.op("Where", [b.op("Less", [s, b.ints([0])]), b.op("Add", [s, dims]), s])
    s = b.op("Min", [b.op("Max", [s, b.ints([0])]), dims])
    rank = b.op("Shape", [shape])
    begins = b.op("ScatterElements", [b.op("ConstantOfShape", [rank], value=helper.make_tensor(
        "zero64", TensorProto.INT64, [1], [0])), b.op("Cast", [axes], to=TensorProto.INT64), s], axis=0)  # fmt: skip
    after = b.op("Sub", [b.op("Sub", [shape, begins]), b.op("Shape", [dy])])
    b.op("Pad", [dy, b.op("Concat", [begins, after], axis=0)], out=dx)
    return b.nodes


def _scale(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    x, scale = node.input[:2]
    b = _Nodes(node)
    down = _attrs(node).get("scale_down", 0)
    b.op("Div" if down else "Mul", [x, b.op("CastLike", [scale, x])], out=node.output[0])
    return b.nodes


_REWRITES = {"ConvGrad": _conv_grad, "MaxPoolGrad": _max_pool_grad, "SliceGrad": _slice_grad, "Scale": _scale}
