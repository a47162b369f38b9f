"""ReluGrad as a mask multiply: equal to torch autograd, and the head's surrogate fed straight."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

import dpa.contract.ort_training  # noqa: F401  (registers onnxruntime.training without its torch-importing __init__)
from exporter.relu_grad import relu_gradients_as_masks


def _relu_grad_model(shape: tuple[int, ...]) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Relu", ["X"], ["Y"], name="r"),
        helper.make_node("ReluGrad", ["dY", "Y"], ["dX"], name="g", domain="com.microsoft"),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("X", "dY")]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("dX", TensorProto.FLOAT, shape)])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def test_mask_gradient_equals_torch_autograd():
    rng = np.random.default_rng(0)
    shape = (4, 3, 17, 17)
    x = rng.standard_normal(shape, dtype=np.float32)
    x[0, 0, 0, :4] = 0.0  # ReLU's kink: torch's gradient there is 0
    dy = rng.standard_normal(shape, dtype=np.float32)
    xt = torch.from_numpy(x).requires_grad_()
    torch.relu(xt).backward(torch.from_numpy(dy))

    model = _relu_grad_model(shape)
    assert relu_gradients_as_masks(model) == 1
    ops = [node.op_type for node in model.graph.node]
    assert "ReluGrad" not in ops and ops.count("Mul") == 1
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (dx,) = session.run(None, {"X": x, "dY": dy})
    np.testing.assert_array_equal(dx, xt.grad.numpy())


def test_exported_training_graphs_have_no_relu_grad_and_the_head_no_surrogate_gradient(small_export):
    head = onnx.load(small_export / "head" / "training_model.onnx").graph
    tail = onnx.load(small_export / "tail" / "training_model.onnx").graph
    for graph in (head, tail):
        assert not [node for node in graph.node if node.op_type == "ReluGrad"]
    # The activation's gradient is upstream_gradient itself; the surrogate's own gradient chain is gone.
    (feed,) = [node for node in head.node if "activation_grad" in node.output]
    assert (feed.op_type, list(feed.input)) == ("Identity", ["upstream_gradient"])
    assert not [node for node in head.node if node.op_type in ("Expand", "Shape")]
    assert "vjp_surrogate" in [out.name for out in head.output]
