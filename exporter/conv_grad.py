"""Input gradients of convolutions as forward convolutions, in the training graphs.

onnxruntime's CPU ``ConvGrad`` computes d loss / d input with a GEMM into an
im2col-sized buffer followed by a single-threaded col2im. For VGG-Face at 224x224 that
was the larger half of every ConvGrad, and ConvGrads most of the tail step
(``BENCHMARKS.md``). For a stride-1, undilated, ungrouped convolution the same
gradient is a plain convolution of the output gradient with the kernel flipped in
space and transposed in channels, padded by ``kernel - 1 - pad``; onnxruntime's
forward Conv runs that at forward speed, several times faster than ConvGrad's own input
gradient (``BENCHMARKS.md``). ConvGrad keeps the weight and
bias gradients, where it is the faster of the forms we measured.

The rewrite uses standard ONNX ops only, so the ORT-format models for phones keep
working; a ConvGrad it does not cover (strides, dilations, groups) is left as it is.
"""

from __future__ import annotations

import onnx
from onnx import helper

__all__ = ["conv_input_gradients_as_convs"]

_MS_DOMAIN = "com.microsoft"


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _rewritable(attrs: dict[str, object]) -> bool:
    kernel = list(attrs.get("kernel_shape", []))  # type: ignore[call-overload]
    pads = list(attrs.get("pads", [0] * 2 * len(kernel)))  # type: ignore[call-overload]
    spatial = len(kernel)
    if spatial == 0 or len(pads) != 2 * spatial:
        return False
    begins, ends = pads[:spatial], pads[spatial:]
    return (
        attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
        and attrs.get("group", 1) == 1
        and all(s == 1 for s in attrs.get("strides", [1] * spatial))  # type: ignore[attr-defined]
        and all(d == 1 for d in attrs.get("dilations", [1] * spatial))  # type: ignore[attr-defined]
        and all(0 <= b <= k - 1 and 0 <= e <= k - 1 for b, e, k in zip(begins, ends, kernel, strict=True))
    )


def conv_input_gradients_as_convs(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every ConvGrad input gradient this covers; returns how many."""
    graph = model.graph
    nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for node in graph.node:
        nodes.append(node)
        if node.op_type != "ConvGrad" or node.domain != _MS_DOMAIN or not node.output or not node.output[0]:
            continue
        attrs = _attributes(node)
        if not _rewritable(attrs):
            continue
        out_grad, _x, weight = node.input[:3]
        input_grad = node.output[0]
        kernel = list(attrs["kernel_shape"])  # type: ignore[call-overload]
        spatial = len(kernel)
        pads = list(attrs.get("pads", [0] * 2 * spatial))  # type: ignore[call-overload]
        p = f"{node.name or input_grad}/input_grad"
        axes = list(range(2, 2 + spatial))

        def const(name: str, values: list[int], p: str = p) -> onnx.NodeProto:
            return helper.make_node(
                "Constant",
                [],
                [f"{p}/{name}"],
                name=f"{p}/{name}",
                value=helper.make_tensor(f"{p}/{name}", onnx.TensorProto.INT64, [len(values)], values),
            )

        nodes += [
            const("starts", [-1] * spatial),
            const("ends", [-(2**62)] * spatial),  # past the start: a full reversal
            const("axes", axes),
            const("steps", [-1] * spatial),
            # (out, in, k...) -> (in, out, k...), then every spatial axis reversed
            helper.make_node("Transpose", [weight], [f"{p}/w_t"], name=f"{p}/Transpose", perm=[1, 0, *axes]),
            helper.make_node(
                "Slice",
                [f"{p}/w_t", f"{p}/starts", f"{p}/ends", f"{p}/axes", f"{p}/steps"],
                [f"{p}/w_flipped"],
                name=f"{p}/Flip",
            ),
            helper.make_node(
                "Conv",
                [out_grad, f"{p}/w_flipped"],
                [input_grad],
                name=f"{p}/Conv",
                kernel_shape=kernel,
                pads=[k - 1 - b for k, b in zip(kernel, pads[:spatial], strict=True)]
                + [k - 1 - e for k, e in zip(kernel, pads[spatial:], strict=True)],
            ),
        ]
        node.output[0] = ""  # ConvGrad now computes only the weight and bias gradients
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten
