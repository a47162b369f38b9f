"""The device on another Python with plain onnxruntime (``.venv312``, made by ``.ci/install-py312``): a real
``dpa client`` process there against a real server of this environment, for both recipes, gives what the
same device gives here: the same head weights after the same DP-A steps, the same noiseless class sums."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpa.contract import messages, wire
from dpa.contract.server_view import ClassSumViewFiles
from runtime_client.head import HEAD_CHECKPOINT, load_head_checkpoint

ROOT = Path(__file__).parents[2]
OTHER = ROOT / ".venv312" / "bin" / "python"

pytestmark = pytest.mark.skipif(
    not OTHER.is_file(), reason="no .venv312: run .ci/install-py312 (the device on Python 3.12, plain onnxruntime)"
)


def _client(python: Path | str, url: str, art: Path, state: Path, *recipe: str) -> str:
    args = ["client", "--server", url, "--artifacts", str(art), "--state-dir", str(state), "--device", "cpu"]
    args += ["--identities", "4", "--per-identity", "6", "--batch-size", "4", "--seed", "3", "--clip", "10"]
    args += ["--epsilon", "inf", "--total-epsilon", "inf", "--label-epsilon", "inf", *recipe]
    out = subprocess.run([str(python), "-m", "dpa.cli.app", *args], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def _sums(view: Path) -> np.ndarray:
    msg = wire.decode(bytearray((view / ClassSumViewFiles.BODY).read_bytes()))
    return msg.tensors[messages.CLASS_SUMS]


def test_python_312_device_equals_this_one(small_export, start_server, tmp_path):
    probe = "import sys, onnxruntime as o; print(sys.version_info[:2], o.__version__)"
    version = subprocess.run([str(OTHER), "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "(3, 12)" in version
    steps = ["--release", "examples", "--train-head", "--epochs", "2", "--max-steps", "2", "--no-on-device-templates"]
    weights = {}
    for name, python in (("here", sys.executable), ("py312", OTHER)):
        server = start_server(small_export)
        _client(python, server.url, small_export, tmp_path / f"dpa-{name}", *steps)
        weights[name] = load_head_checkpoint(tmp_path / f"dpa-{name}" / HEAD_CHECKPOINT)[0]
    with np.load(small_export / "head" / "parameters.npz") as exported:
        assert any(not np.array_equal(exported[p], w) for p, w in weights["here"].items())  # it did train
    for param, w in weights["here"].items():
        np.testing.assert_allclose(weights["py312"][param], w, rtol=1e-5, atol=1e-6, err_msg=param)
    sums = {}
    for name, python in (("here", sys.executable), ("py312", OTHER)):
        server = start_server(small_export, templates=True)
        view = tmp_path / f"view-{name}"
        _client(python, server.url, small_export, tmp_path / f"sums-{name}", "--release", "class-sums",
                "--record-view", str(view))  # fmt: skip
        sums[name] = _sums(view)
    scale = float(np.abs(sums["here"]).max())
    assert scale > 0 and float(np.abs(sums["py312"] - sums["here"]).max()) <= 1e-4 * scale
