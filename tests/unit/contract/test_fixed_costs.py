"""The per-step fixed costs cut in the step-overhead issue keep their guarantees.

Several files made durable with one folder fsync are still each whole or absent; sessions never
spin; a frozen head's checkpoint leaves out the optimizer state it never uses, and refuses a step.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from dpa.base.atomic import atomic_write_many
from dpa.contract.devices import resolve_device
from dpa.contract.manifest import OptimizerConfig, OptimizerName, load_manifest
from dpa.contract.ort_training import session_options
from runtime_client.head import HeadModel
from tests.conftest import SMALL


def test_many_files_written_whole_and_no_temp_left(tmp_path):
    files = [(tmp_path / f"f{i}.bin", os.urandom(1000 + i)) for i in range(5)]
    atomic_write_many(files)
    assert [p.read_bytes() for p, _ in files] == [data for _, data in files]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"f{i}.bin" for i in range(5)]


def test_a_failure_before_the_renames_leaves_no_file_and_no_temp(tmp_path):
    # The second file's folder does not exist: nothing may be renamed into place, and no temp file stays.
    files = [(tmp_path / "a.bin", b"first"), (tmp_path / "missing" / "b.bin", b"second")]
    with pytest.raises(FileNotFoundError):
        atomic_write_many(files)
    assert list(tmp_path.iterdir()) == []


def test_sessions_do_not_spin():
    options = session_options(2)
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert session_options(None).intra_op_num_threads == 0  # onnxruntime's default: all cores


def test_frozen_head_checkpoint_leaves_out_optimizer_state(tmp_path):
    from exporter.export import ExportConfig, export

    out = tmp_path / "adamw"
    adamw = OptimizerConfig(name=OptimizerName.ADAMW, lr=1e-3)
    export(ExportConfig(arch=SMALL, cut="conv1_1", optimizer=adamw, out=out, verify=False))
    manifest = load_manifest(out)
    device = resolve_device("cpu")
    trained, frozen = HeadModel(out, manifest, device), HeadModel(out, manifest, device, frozen=True)
    x = np.zeros((1, *manifest.input_shape), np.float32)
    trained.backward_step(x, np.ones((1, *manifest.activation_shape), np.float32))  # AdamW's moments exist now
    trained.save(tmp_path / "trained.ckpt")
    frozen.save(tmp_path / "frozen.ckpt")
    # AdamW keeps two moments per parameter: the trained head's file holds about three copies of the weights.
    assert (tmp_path / "frozen.ckpt").stat().st_size < 0.5 * (tmp_path / "trained.ckpt").stat().st_size
    # The frozen checkpoint resumes to the same weights.
    back = HeadModel(out, manifest, device, checkpoint=tmp_path / "frozen.ckpt", frozen=True)
    for name, value in frozen.parameters().items():
        np.testing.assert_array_equal(back.parameters()[name], value)
    with pytest.raises(RuntimeError, match="frozen head is never stepped"):
        frozen.step()


def test_frozen_head_writes_its_weights_once_and_its_run_state_each_save(tmp_path, small_export):
    from runtime_client.head import run_state_path

    manifest = load_manifest(small_export)
    device = resolve_device("cpu")
    head = HeadModel(small_export, manifest, device, frozen=True)
    ckpt = tmp_path / "head_checkpoint"
    head.properties["run.epoch_step"] = 1
    head.save(ckpt)
    weights = ckpt.read_bytes()
    head.properties["run.epoch_step"] = 2
    head.properties["run.history"] = "[1.5]"
    head.save(ckpt)
    assert ckpt.read_bytes() == weights  # the weights were not written again
    back = HeadModel(small_export, manifest, device, checkpoint=ckpt, frozen=True)
    assert back.properties["run.epoch_step"] == 2 and back.properties["run.history"] == "[1.5]"
    # Without its run state (a crash between the two first writes) it resumes from the checkpoint's own.
    run_state_path(ckpt).unlink()
    assert HeadModel(small_export, manifest, device, checkpoint=ckpt, frozen=True).properties["run.epoch_step"] == 1
