"""ConvGrad's input gradient as a forward Conv: equal to torch autograd, and left alone where not covered."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import dpa.contract.ort_training  # noqa: F401  (registers onnxruntime.training without its torch-importing __init__)
from exporter.conv_grad import conv_input_gradients_as_convs


def _conv_grad_model(kernel: int, pads: list[int], strides: list[int], shapes) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    dy, x, w = shapes
    node = helper.make_node(
        "ConvGrad",
        ["dY", "X", "W"],
        ["dX", "dW", "dB"],
        name="g",
        domain="com.microsoft",
        kernel_shape=[kernel, kernel],
        pads=pads,
        strides=strides,
        dilations=[1, 1],
        group=1,
    )
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("dY", dy), ("X", x), ("W", w))]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("dX", "dW", "dB")]
    graph = helper.make_graph([node], "g", inputs, outputs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize(
    ("kernel", "pads"),
    [(3, [1, 1, 1, 1]), (3, [0, 0, 0, 0]), (5, [2, 1, 0, 2]), (1, [0, 0, 0, 0])],
)
def test_rewritten_gradients_equal_torch_autograd(kernel, pads):
    rng = np.random.default_rng(kernel)
    n, cin, cout, size = 2, 3, 4, 9
    x = rng.standard_normal((n, cin, size, size), dtype=np.float32)
    w = rng.standard_normal((cout, cin, kernel, kernel), dtype=np.float32)
    xt = torch.from_numpy(x).requires_grad_()
    wt = torch.from_numpy(w).requires_grad_()
    bt = torch.zeros(cout, requires_grad=True)
    # torch pads (left, right, top, bottom); ONNX pads (top, left, bottom, right)
    y = torch.nn.functional.conv2d(torch.nn.functional.pad(xt, (pads[1], pads[3], pads[0], pads[2])), wt, bt)
    dy = rng.standard_normal(tuple(y.shape), dtype=np.float32)
    y.backward(torch.from_numpy(dy))

    model = _conv_grad_model(kernel, pads, [1, 1], (dy.shape, x.shape, w.shape))
    assert conv_input_gradients_as_convs(model) == 1
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("ConvGrad") == 1 and ops.count("Conv") == 1
    assert next(node for node in model.graph.node if node.op_type == "ConvGrad").output[0] == ""
    dx, dw, db = _run(model, {"dY": dy, "X": x, "W": w})
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_strided_conv_grad_is_left_alone():
    model = _conv_grad_model(3, [1, 1, 1, 1], [2, 2], ((1, 2, 4, 4), (1, 2, 8, 8), (2, 2, 3, 3)))
    before = model.SerializeToString()
    assert conv_input_gradients_as_convs(model) == 0
    assert model.SerializeToString() == before
