"""Exports at several cuts match torch; every bad input is a clear error that leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dpa.cli.app import app
from dpa.contract.architecture import ArchConfig, cut_info
from dpa.contract.manifest import ARTIFACT_FILES, MANIFEST_FILE, load_manifest, sha256_file
from dpa.contract.ort_training import CheckpointState
from exporter.export import ExportConfig, export
from exporter.vggface import build_parts, init_weights
from tests.conftest import SMALL

runner = CliRunner()
DROPOUT = ArchConfig(image_size=64, width=0.25, num_classes=6, dropout=0.5)


@pytest.mark.parametrize("cut", ["conv1_1", "pool2", "conv4_2", "fc6"])
def test_export_verifies_against_torch(cut, tmp_path):
    out = tmp_path / "art"
    manifest, report = export(ExportConfig(arch=SMALL, cut=cut, out=out))
    # Every compared tensor: activations, logits, loss, d loss/d activation, all parameter gradients.
    head, tail = build_parts(SMALL, cut)
    n_params = len(list(head.parameters())) + len(list(tail.parameters()))
    assert len(report.errors) == n_params + 4
    assert report.max_rel_error < 1e-4, report.errors
    assert manifest.activation_shape == cut_info(SMALL, cut).activation_shape
    for part in ("head", "tail"):
        for name in (*ARTIFACT_FILES.onnx_models(), ARTIFACT_FILES.checkpoint):
            rel = f"{part}/{name}"
            assert manifest.files[rel] == sha256_file(out / rel)
    data = json.loads((out / MANIFEST_FILE).read_text())
    for key in (
        "schema_version",
        "arch",
        "cut",
        "input_shape",
        "activation_shape",
        "num_classes",
        "opset",
        "optimizer",
        "width",
        "image_size",
        "files",
        "versions",
    ):
        assert key in data
    assert data["versions"]["torch"] == torch.__version__
    assert data["input_shape"] == [3, 64, 64]
    # Nothing but the export is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_dropout_export_checks_backward_on_twin(tmp_path):
    manifest, report = export(ExportConfig(arch=DROPOUT, cut="fc6", out=tmp_path / "art"))
    assert manifest.dropout == 0.5
    assert report.max_rel_error < 1e-4
    assert any("twin" in note for note in report.notes)


def test_checkpoint_holds_the_torch_initialisation(tmp_path):
    export(ExportConfig(arch=SMALL, cut="pool1", out=tmp_path / "art", seed=3, verify=False))
    head, tail = build_parts(SMALL, "pool1")
    init_weights((head, tail), 3)
    for part, module in (("head", head), ("tail", tail)):
        state = CheckpointState.load_checkpoint(str(tmp_path / "art" / part / ARTIFACT_FILES.checkpoint))
        for name, param in module.named_parameters():
            np.testing.assert_array_equal(state.parameters[name].data, param.detach().numpy())


def test_weights_file_is_loaded(tmp_path):
    head, tail = build_parts(SMALL, "conv2_1")
    init_weights((head, tail), 11)
    state = {**head.state_dict(), **tail.state_dict()}
    torch.save(state, tmp_path / "w.pt")
    manifest, _ = export(ExportConfig(arch=SMALL, cut="conv2_1", out=tmp_path / "art", weights=tmp_path / "w.pt"))
    assert manifest.seed is None and manifest.weights_sha256 == sha256_file(tmp_path / "w.pt")
    assert manifest.pixel_std == (1.0, 1.0, 1.0)  # published VGG-Face convention: mean-centred 0..255 pixels
    ckpt = CheckpointState.load_checkpoint(str(tmp_path / "art" / "tail" / ARTIFACT_FILES.checkpoint))
    np.testing.assert_array_equal(ckpt.parameters["fc8.weight"].data, state["fc8.weight"].numpy())


def _cli(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["export", "--image-size", "64", "--width", "0.25", "--classes", "6", *args])


def test_cli_export_prints_verification(tmp_path):
    result = _cli("--cut", "pool1", "--out", str(tmp_path / "art"))
    assert result.exit_code == 0, result.output
    assert "max rel error" in result.output
    assert load_manifest(tmp_path / "art", verify=("head", "tail")).cut == "pool1"


def test_list_cuts_prints_every_cut_with_sizes():
    result = runner.invoke(app, ["export", "--list-cuts"])
    assert result.exit_code == 0
    assert "64x224x224" in result.output and "12.8 MB" in result.output  # conv1_1 at 224, as the seed measured
    for cut in ("conv1_1", "pool5", "fc7"):
        assert cut in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cut", "conv9_9"], "unknown cut 'conv9_9'; valid cuts: conv1_1, conv1_2"),
        (["--image-size", "100"], "image size must be a positive multiple of 32, got 100"),
        (["--optimizer", "rmsprop"], "'rmsprop' is not one of 'sgd', 'adamw'"),  # typer's Enum support
        (["--weight-decay", "0.1"], "weight decay is only available with --optimizer adamw"),
    ],
)
def test_bad_options_are_clear_errors(args, message, tmp_path):
    result = _cli(*args, "--out", str(tmp_path / "art"))
    assert result.exit_code == 2
    assert message in " ".join(result.output.replace("│", " ").split())  # unwrap rich's error panel
    assert list(tmp_path.iterdir()) == []


def test_wrong_weights_name_the_tensors(tmp_path):
    head, tail = build_parts(SMALL, "conv1_1")
    state = {**head.state_dict(), **tail.state_dict()}
    del state["conv3_1.bias"]
    state["fc8.weight"] = torch.zeros(7, 256)
    torch.save(state, tmp_path / "w.pt")
    result = _cli("--weights", str(tmp_path / "w.pt"), "--out", str(tmp_path / "art"))
    text = " ".join(result.output.split())
    assert result.exit_code == 2
    assert "missing conv3_1.bias (64,)" in text
    assert "fc8.weight has shape (7, 256), expected (6, 1024)" in text
    assert not (tmp_path / "art").exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    result = _cli("--weights", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "art"))
    assert result.exit_code == 2 and "cannot read weights file" in result.output


def test_unwritable_out_dir(tmp_path):
    # /proc refuses new files even to root, so this holds wherever the tests run.
    result = _cli("--out", "/proc/dpa-artifacts")
    assert result.exit_code == 2 and "cannot write to /proc/dpa-artifacts" in result.output
    assert not Path("/proc/dpa-artifacts").exists()


def test_missing_parent_and_file_in_the_way(tmp_path):
    result = _cli("--out", str(tmp_path / "no" / "such" / "art"))
    assert result.exit_code == 2 and "parent folder" in result.output
    (tmp_path / "file").write_text("x")
    result = _cli("--out", str(tmp_path / "file"))
    assert result.exit_code == 2 and "is not a folder" in result.output


def test_failed_export_keeps_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "art"
    export(ExportConfig(arch=SMALL, cut="conv1_1", out=out, verify=False))
    before = sha256_file(out / MANIFEST_FILE)
    import exporter.verify as verify

    class Bad:
        errors, notes = {"tail.logits": (1.0, 0.5)}, []

    monkeypatch.setattr(verify, "verify_export", lambda *a, **k: Bad())
    with pytest.raises(ValueError, match="verification failed: relative error 0.5 of tail.logits exceeds tolerance"):
        export(ExportConfig(arch=SMALL, cut="pool1", out=out))
    assert sha256_file(out / MANIFEST_FILE) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_verification_catches_a_different_network(small_export):
    """The check can fail: the same artifacts against torch weights from another seed are far off."""
    from exporter.verify import verify_export

    head, tail = build_parts(SMALL, "conv1_1")
    init_weights((head, tail), 1)  # the export used seed 0
    report = verify_export(small_export, head, tail, batch=2, seed=0)
    assert report.max_rel_error > 0.1
    init_weights((head, tail), 0)
    assert verify_export(small_export, head, tail, batch=2, seed=0).max_rel_error < 1e-5
