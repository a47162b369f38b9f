"""The manifest round-trips, and a missing or altered export is a clear error."""

from __future__ import annotations

import json

import pytest

from dpa.contract.manifest import MANIFEST_FILE, load_manifest, manifest_sha256


def test_round_trip_and_hash(small_export, tmp_path):
    manifest = load_manifest(small_export, verify=("head", "tail"))
    assert manifest.cut == "conv1_1" and manifest.activation_shape == (16, 64, 64)
    manifest.write(tmp_path)
    assert (tmp_path / MANIFEST_FILE).read_bytes() == (small_export / MANIFEST_FILE).read_bytes()
    assert manifest_sha256(tmp_path) == manifest_sha256(small_export)


def test_altered_or_missing_artifacts(small_export, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(small_export, copy)
    (copy / "tail" / "checkpoint").write_bytes(b"tampered")
    assert load_manifest(copy, verify=("head",)).cut == "conv1_1"  # a device needs only head/
    with pytest.raises(ValueError, match="tail/checkpoint does not match its sha256"):
        load_manifest(copy, verify=("tail",))
    (copy / "head" / "eval_model.onnx").unlink()
    with pytest.raises(ValueError, match="eval_model.onnx listed in the manifest is missing"):
        load_manifest(copy, verify=("head",))
    with pytest.raises(ValueError, match="no manifest.json in .*: run `dpa export"):
        load_manifest(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(schema_version=99), "schema_version 99 is not supported"),
        (lambda d: d.pop("cut"), "missing field 'cut'"),
        (lambda d: d["optimizer"].update(name="lbfgs"), "unknown optimizer 'lbfgs'"),
    ],
)
def test_bad_manifest_fields(small_export, tmp_path, edit, message):
    data = json.loads((small_export / MANIFEST_FILE).read_text())
    edit(data)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_manifest(tmp_path)
