"""The device's head: ORT-format and ONNX artifacts give the same steps; checkpoints round-trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dpa.contract.devices import resolve_device
from dpa.contract.manifest import load_manifest
from exporter.vggface import build_parts, init_weights
from runtime_client.head import HeadModel, ModelFormat
from tests.conftest import SMALL, export_small


@pytest.fixture(scope="module")
def ort_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_small(tmp_path_factory.mktemp("ortf") / "art", cut="pool1", ort_format=True)


def test_ort_format_equals_onnx_and_torch(ort_export):
    manifest = load_manifest(ort_export, verify=("head",))
    cpu = resolve_device("cpu")
    ort = HeadModel(ort_export, manifest, cpu, model_format=ModelFormat.ORT)
    onnx = HeadModel(ort_export, manifest, cpu, model_format=ModelFormat.ONNX)
    assert (ort.format, onnx.format) == ("ort", "onnx")
    assert HeadModel(ort_export, manifest, cpu).format == "ort"  # auto prefers the mobile format
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    g = np.random.default_rng(1).standard_normal((2, *manifest.activation_shape)).astype(np.float32)
    head, _ = build_parts(SMALL, "pool1")
    init_weights((head,), 0)
    act = head(torch.from_numpy(x))
    np.testing.assert_allclose(ort.forward(x), act.detach().numpy(), rtol=1e-5, atol=1e-5)
    act.backward(torch.from_numpy(g))
    ort.backward_step(x, g)
    onnx.backward_step(x, g)
    for name, param in head.named_parameters():
        expected = param.detach().numpy() - manifest.optimizer.lr * param.grad.numpy()  # one SGD step
        np.testing.assert_allclose(ort.parameters()[name], expected, rtol=1e-5, atol=2e-5)  # float32 sums
        np.testing.assert_array_equal(ort.parameters()[name], onnx.parameters()[name])


def test_checkpoint_round_trip(small_export, tmp_path):
    manifest = load_manifest(small_export)
    head = HeadModel(small_export, manifest, resolve_device("cpu"))
    x = np.ones((1, 3, 64, 64), np.float32)
    head.backward_step(x, np.ones((1, *manifest.activation_shape), np.float32))
    head.properties["epochs_done"] = 3
    head.save(tmp_path / "ckpt")
    again = HeadModel(small_export, manifest, resolve_device("cpu"), checkpoint=tmp_path / "ckpt")
    assert again.resumed and int(again.properties["epochs_done"]) == 3
    for name, value in head.parameters().items():
        np.testing.assert_array_equal(again.parameters()[name], value)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp file left


def test_missing_ort_format_is_a_clear_error(small_export):
    with pytest.raises(ValueError, match="no ORT-format head .* export with --ort-format"):
        HeadModel(small_export, load_manifest(small_export), resolve_device("cpu"), model_format=ModelFormat.ORT)
