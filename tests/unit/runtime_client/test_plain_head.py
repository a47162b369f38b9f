"""The device's head on plain onnxruntime: the export's gradient graph against torch autograd and against
onnxruntime-training's own step, the numpy optimizer against the training API's, and a device that runs
with the training package made unimportable."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import SMALL, export_small

from dpa.contract.devices import resolve_device
from dpa.contract.manifest import ARTIFACT_FILES, OptimizerConfig, OptimizerName, load_manifest
from dpa.contract.ort_training import CheckpointState, Module, Optimizer
from exporter.networks.vgg_parts import build_parts
from runtime_client.head import HEAD_CHECKPOINT, HeadModel, load_head_checkpoint


def _batch(manifest, n: int = 3, seed: int = 0):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *manifest.input_shape)).astype(np.float32)
    u = rng.standard_normal((n, *manifest.activation_shape)).astype(np.float32)
    return x, u


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("cut", ["pool1", "fc7"])
def test_the_gradient_graph_is_torch_autograds_vjp(tmp_path, cut):
    """J^T u for every head parameter, from the export's standard-ONNX gradient graph, equals torch's."""
    art = export_small(tmp_path / cut, cut=cut, verify=False)
    m = load_manifest(art)
    head = HeadModel(art, m, resolve_device("cpu"))
    x, u = _batch(m)
    head.accumulate(x, u)
    ours = {name: g.copy() for name, g in head._grads.items()}
    torch_head, _ = build_parts(SMALL, cut)
    torch_head.load_state_dict({k: torch.from_numpy(v) for k, v in head.parameters().items()})
    out = torch_head(torch.from_numpy(x))
    (out * torch.from_numpy(u)).sum().backward()
    reference = {name: p.grad.numpy() for name, p in torch_head.named_parameters()}
    assert sorted(ours) == sorted(reference)
    for name, g in reference.items():
        assert _rel(ours[name], g) < 1e-5, name


@pytest.mark.parametrize("cut", ["pool1", "fc7"])
def test_a_kept_forward_gives_torch_autograds_vjp_and_other_images_do_not_use_it(tmp_path, cut):
    """forward(keep=True) then accumulate runs the backward graph on the kept tensors (exporter.saved_forward):
    its activation is the eval graph's and its gradients torch autograd's. A kept forward of other images is
    never used for these: the gradient graph answers, and nothing stays kept after a backward."""
    art = export_small(tmp_path / cut, cut=cut, verify=False)
    m = load_manifest(art)
    head = HeadModel(art, m, resolve_device("cpu"))
    assert (art / "head" / ARTIFACT_FILES.forward_saving).is_file() and (
        art / "head" / ARTIFACT_FILES.backward
    ).is_file()
    x, u = _batch(m)
    np.testing.assert_allclose(head.forward(x, keep=True), head.forward(x), rtol=1e-6, atol=1e-6)
    head.forward(x, keep=True)
    head.accumulate(x, u)
    assert head._kept is None
    kept = {name: g.copy() for name, g in head._grads.items()}
    head.reset_gradients()
    other, _ = _batch(m, seed=1)
    head.forward(other, keep=True)  # kept for other images: these get the gradient graph's answer
    head.accumulate(x, u)
    assert head._kept is None
    torch_head, _ = build_parts(SMALL, cut)
    torch_head.load_state_dict({k: torch.from_numpy(v) for k, v in head.parameters().items()})
    (torch_head(torch.from_numpy(x)) * torch.from_numpy(u)).sum().backward()
    for name, p in torch_head.named_parameters():
        assert _rel(kept[name], p.grad.numpy()) < 1e-5, name
        assert _rel(head._grads[name], p.grad.numpy()) < 1e-5, name


@pytest.mark.parametrize("optimizer", [OptimizerConfig(lr=0.01), OptimizerConfig(OptimizerName.ADAMW, 1e-3, 0.01)])
def test_steps_on_plain_onnxruntime_equal_the_training_apis(tmp_path, optimizer):
    """Three steps (one of them in two micro-batches) on the same batches: the same head weights as
    onnxruntime-training's Module and Optimizer, to 1e-5, with the optimizer the manifest names."""
    art = export_small(tmp_path / "a", cut="pool1", lr=optimizer.lr, verify=False)
    if optimizer.name is OptimizerName.ADAMW:  # the same export with AdamW
        from exporter.export import ExportConfig, export

        art = tmp_path / "adamw"
        export(ExportConfig(arch=SMALL, cut="pool1", optimizer=optimizer, out=art, verify=False))
    m = load_manifest(art)
    ours = HeadModel(art, m, resolve_device("cpu"))
    state = CheckpointState.load_checkpoint(str(art / "head" / ARTIFACT_FILES.checkpoint))
    module = Module(str(art / "head" / ARTIFACT_FILES.training), state, str(art / "head" / ARTIFACT_FILES.eval))
    opt = Optimizer(str(art / "head" / ARTIFACT_FILES.optimizer), module)
    opt.set_learning_rate(optimizer.lr)
    for step in range(3):
        x, u = _batch(m, 4, seed=step)
        module.train()
        module(x, u)
        opt.step()
        module.lazy_reset_grad()
        if step == 1:  # micro-batches accumulate to the batch's gradient
            ours.accumulate(x[:1], u[:1])
            ours.accumulate(x[1:], u[1:])
            ours.step()
        else:
            ours.backward_step(x, u)
    theirs = {name: np.array(p.data) for name, p in state.parameters}
    for name, w in ours.parameters().items():
        assert _rel(w, theirs[name]) < 1e-5, name
    # The device's checkpoint keeps the weights and the optimizer's state: a resumed head steps on alike.
    ours.properties["run.step"] = 3
    ours.save(tmp_path / HEAD_CHECKPOINT)
    params, opt_state, props = load_head_checkpoint(tmp_path / HEAD_CHECKPOINT)
    assert props == {"run.step": 3} and all(np.array_equal(params[k], v) for k, v in ours.parameters().items())
    assert ("step" in opt_state and int(opt_state["step"]) == 3) == (optimizer.name is OptimizerName.ADAMW)


def test_the_device_needs_no_training_package(small_export):
    """With onnxruntime.training unimportable, the device still loads its head, forwards and steps."""
    program = (
        "import sys; sys.modules['onnxruntime.training'] = None\n"
        "import numpy as np\n"
        "from pathlib import Path\n"
        "from dpa.contract.devices import resolve_device\n"
        "from dpa.contract.manifest import load_manifest\n"
        "from runtime_client.head import HeadModel\n"
        f"art = Path({str(small_export)!r}); m = load_manifest(art)\n"
        "h = HeadModel(art, m, resolve_device('cpu'))\n"
        "x = np.zeros((2, *m.input_shape), np.float32)\n"
        "a = h.forward(x); h.backward_step(x, np.ones_like(a)); print('ok', a.shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]


def test_a_head_without_a_gradient_graph_is_used_frozen_and_refuses_to_train(tmp_path):
    art = export_small(tmp_path / "a", verify=False)
    (art / "head" / ARTIFACT_FILES.gradient).unlink()
    m = load_manifest(art)
    head = HeadModel(art, m, resolve_device("cpu"))
    x, u = _batch(m)
    assert head.forward(x).shape == u.shape
    with pytest.raises(ValueError, match="has no gradient graph"):
        head.accumulate(x, u)


@pytest.mark.parametrize("cut", ["res3", "res11"])  # res11: strided convs, zero-padded shortcuts, the pool's slices
def test_dlibs_gradient_graph_is_the_training_apis(tmp_path, cut):
    """dlib's network (strided ConvGrad input gradients, overlapping max pool, SliceGrad): the plain
    gradient graph's J^T u equals onnxruntime-training's own for every parameter."""
    from dpa.contract.architecture import ArchConfig
    from dpa.contract.choices import NetworkName
    from exporter.export import ExportConfig, export

    art = tmp_path / cut
    export(ExportConfig(network=NetworkName.DLIB_RESNET, arch=ArchConfig(num_classes=5), cut=cut, out=art,
                        verify=False))  # fmt: skip
    m = load_manifest(art)
    head = HeadModel(art, m, resolve_device("cpu"))
    x, u = _batch(m, 2)
    head.accumulate(x, u)
    state = CheckpointState.load_checkpoint(str(art / "head" / ARTIFACT_FILES.checkpoint))
    module = Module(str(art / "head" / ARTIFACT_FILES.training), state, str(art / "head" / ARTIFACT_FILES.eval))
    module.train()
    module(x, u)
    reference = {name: np.array(p.grad) for name, p in state.parameters if p.grad is not None}
    assert sorted(head._grads) == sorted(reference)
    for name, g in reference.items():
        assert _rel(head._grads[name], g) < 1e-5, name
