"""The device elsewhere, on plain onnxruntime: Python 3.12 (``.venv312``, made by ``.ci/install-py312``) and
aarch64 under qemu-user (Debian's arm64 Python 3.11 with aarch64 wheels, ``.arm64``, made by
``.ci/install-arm64``). A real ``dpa client`` process there against a real server of this environment, for
both recipes, gives what the same device gives here: the same head weights after the same DP-A steps, the
same noiseless class sums. Under emulation the run is slow (seconds per step); that is not a speed figure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpa.contract import messages, wire
from dpa.contract.server_view import ClassSumViewFiles
from runtime_client.head import HEAD_CHECKPOINT, load_head_checkpoint

ROOT = Path(__file__).parents[2]
PY312 = ROOT / ".venv312" / "bin" / "python"
SYSROOT = ROOT / ".arm64" / "sysroot"
#: name -> (the command that starts its Python, its extra module path, what makes it, the version it prints)
DEVICES = {
    "py312": ([str(PY312)], None, ".ci/install-py312", "(3, 12)"),
    "arm64": (["qemu-aarch64-static", "-L", str(SYSROOT), str(SYSROOT / "usr/bin/python3.11")],
              f"{ROOT}:{ROOT / '.arm64' / 'site'}", ".ci/install-arm64", "aarch64"),
}  # fmt: skip


def _available(name: str) -> bool:
    """Its set-up script ran to the end (it writes ``.dpa-ready`` last), and for arm64 qemu is here."""
    ready = (ROOT / (".venv312" if name == "py312" else ".arm64") / ".dpa-ready").is_file()
    return ready and (name != "arm64" or shutil.which("qemu-aarch64-static") is not None)


def _client(python: list[str], path: str | None, url: str, art: Path, state: Path, *recipe: str) -> str:
    device = "arm64" if python[0] == "qemu-aarch64-static" else "cpu"  # the phone's profile on the phone's CPU
    args = ["client", "--server", url, "--artifacts", str(art), "--state-dir", str(state), "--device", device]
    args += ["--identities", "4", "--per-identity", "6", "--batch-size", "4", "--seed", "3", "--clip", "10"]
    args += ["--epsilon", "inf", "--total-epsilon", "inf", "--label-epsilon", "inf", *recipe]
    env = {**os.environ, "PYTHONPATH": path} if path else None
    out = subprocess.run([*python, "-m", "dpa.cli.app", *args], capture_output=True, text=True, timeout=600,
                         cwd=ROOT, env=env)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def _sums(view: Path) -> np.ndarray:
    msg = wire.decode(bytearray((view / ClassSumViewFiles.BODY).read_bytes()))
    return msg.tensors[messages.CLASS_SUMS]


@pytest.mark.long
@pytest.mark.parametrize("name", DEVICES)
def test_the_device_elsewhere_equals_this_one(name, small_export, start_server, tmp_path):
    if not _available(name):
        pytest.skip(f"no {name} device here: run {DEVICES[name][2]}")
    python, path, _, expected = DEVICES[name]
    probe = "import sys, platform, onnxruntime as o; print(sys.version_info[:2], platform.machine(), o.__version__)"
    env = {**os.environ, "PYTHONPATH": path} if path else None
    version = subprocess.run([*python, "-c", probe], capture_output=True, text=True, check=True, env=env).stdout
    assert expected in version, version
    here = ([sys.executable], None)
    steps = ["--release", "examples", "--train-head", "--epochs", "2", "--max-steps", "2", "--no-on-device-templates"]
    weights = {}
    for side, (cmd, extra) in (("here", here), (name, (python, path))):
        server = start_server(small_export)
        _client(cmd, extra, server.url, small_export, tmp_path / f"dpa-{side}", *steps)
        weights[side] = load_head_checkpoint(tmp_path / f"dpa-{side}" / HEAD_CHECKPOINT)[0]
    with np.load(small_export / "head" / "parameters.npz") as exported:
        assert any(not np.array_equal(exported[p], w) for p, w in weights["here"].items())  # it did train
    for param, w in weights["here"].items():
        np.testing.assert_allclose(weights[name][param], w, rtol=1e-5, atol=1e-6, err_msg=param)
    sums = {}
    for side, (cmd, extra) in (("here", here), (name, (python, path))):
        server = start_server(small_export, templates=True)
        view = tmp_path / f"view-{side}"
        _client(cmd, extra, server.url, small_export, tmp_path / f"sums-{side}", "--release", "class-sums",
                "--record-view", str(view))  # fmt: skip
        sums[side] = _sums(view)
    scale = float(np.abs(sums["here"]).max())
    assert scale > 0 and float(np.abs(sums[name] - sums["here"]).max()) <= 1e-4 * scale
