"""--device profiles and the fallback when a provider is missing."""

from __future__ import annotations

import os

import pytest

from dpa.contract.devices import DeviceProfile, resolve_device


def test_cuda_falls_back_to_cpu_with_a_reason():
    got = resolve_device("cuda", available=["CPUExecutionProvider"])
    assert got.profile is DeviceProfile.CPU and got.ort_device == "cpu"
    assert "CUDAExecutionProvider is not in this onnxruntime build" in got.fallback_reason
    assert "fell back from cuda" in got.describe()


def test_profiles():
    cores = os.cpu_count() or 1
    assert resolve_device("arm64", available=["CPUExecutionProvider"]).threads == min(4, cores)
    assert resolve_device("cpu", available=["CPUExecutionProvider"]).threads == cores
    auto = resolve_device("auto", available=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert auto.ort_device == "cuda" and auto.fallback_reason is None
    with pytest.raises(ValueError, match="unknown device 'tpu'; valid: auto, cpu, arm64, cuda"):
        resolve_device("tpu")


def test_each_profile_gives_its_ordered_providers_and_the_head_records_what_ran(small_export):
    from dpa.contract.devices import PROVIDERS
    from dpa.contract.manifest import load_manifest
    from runtime_client.head import HeadModel

    phone = resolve_device("arm64", available=["XnnpackExecutionProvider", "CPUExecutionProvider"])
    assert phone.providers == PROVIDERS[DeviceProfile.ARM64] == ("XnnpackExecutionProvider", "CPUExecutionProvider")
    wheel = resolve_device("arm64", available=["CPUExecutionProvider"])  # PyPI's wheels have no XNNPACK
    assert wheel.providers == ("CPUExecutionProvider",) and "CPUExecutionProvider" in wheel.describe()
    gpu = resolve_device("cuda", available=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert gpu.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    here = resolve_device("cpu")
    head = HeadModel(small_export, load_manifest(small_export), here)
    assert head.providers == ("CPUExecutionProvider",)


def test_the_device_refuses_a_profile_it_cannot_run_where_the_server_falls_back(small_export, tmp_path):
    import onnxruntime
    from typer.testing import CliRunner

    from dpa.cli.app import app

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: nothing to refuse")
    args = ["client", "--artifacts", str(small_export), "--device", "cuda", "--clip", "10", "--identities", "6",
            "--state-dir", str(tmp_path / "d"), "--server", "http://127.0.0.1:9"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "--device cuda is not available here: CUDAExecutionProvider is not in this onnxruntime build" in (
        result.output
    )
    assert not (tmp_path / "d" / "head_checkpoint").exists()  # nothing started
