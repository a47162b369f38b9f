"""The device client and the edge server run where torch cannot be imported.

onnxruntime's training package imports torch from its ``__init__`` (upstream issue
#22070); ``dpa.contract.ort_training`` works around it. Here a real server and a real client
train a round as separate processes with ``import torch`` blocked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from dpa.runs.loopback import free_port, wait_until_healthy
from runtime_server.auth import add_token
from runtime_server.tail import CHECKPOINT_NAME

BLOCK = """
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _NoTorch())
"""


def _dpa(*args: str) -> list[str]:
    code = BLOCK + f"sys.argv = ['dpa', *{list(args)!r}]\nfrom dpa.cli.app import main\nmain()\n"
    return [sys.executable, "-c", code]


def _status(port: int, token: str):  # type: ignore[no-untyped-def]
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/status", headers={"Authorization": f"Bearer {token}"})
    return urllib.request.urlopen(request)


def test_importing_the_runtimes_pulls_in_no_torch():
    code = (
        "import importlib, pkgutil, sys\n"
        # Every layer but the torch side (exporter, dpa.audit, dpa.runs: the `export` extra). The CLI's
        # commands import that side inside the function, so importing dpa.cli must not pull torch in.
        "import runtime_client, runtime_server, dpa.contract, dpa.privacy, dpa.faces, dpa.cli\n"
        "pkgs = (runtime_client, runtime_server, dpa.contract, dpa.privacy, dpa.faces, dpa.cli)\n"
        "for pkg in pkgs:\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_server_and_client_train_with_torch_blocked(small_export, tmp_path):
    port = free_port()
    state = tmp_path / "server-state"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    server = subprocess.Popen(
        _dpa(
            "serve",
            "--artifacts",
            str(small_export),
            "--port",
            str(port),
            "--device",
            "cuda",
            "--state-dir",
            str(state),
            "--checkpoint-every",
            "1000",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        try:
            wait_until_healthy(f"http://127.0.0.1:{port}", server, timeout_s=60)
        except RuntimeError as exc:
            raise AssertionError(server.communicate(timeout=10)[0]) from exc
        report = tmp_path / "report.json"
        device = ("--server", f"http://127.0.0.1:{port}", "--artifacts", str(small_export), "--identities", "6")
        device += ("--per-identity", "8", "--clip", "50", "--state-dir", str(tmp_path / "client"))
        token_file = str(state / "tokens.txt")  # created by `dpa serve` with one token
        client = subprocess.run(
            _dpa("client", *device, "--epochs", "1", "--max-steps", "2", "--report", str(report), "--device", "arm64",
                 "--token-file", token_file),
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert client.returncode == 0, client.stdout + client.stderr
        data = json.loads(report.read_text())
        # The defaults are the recommended recipe: a frozen head, the class sums released once, activations and
        # labels together within a whole-run epsilon of 8, and the device classifying with the templates the
        # server made of them.
        assert data["privacy"]["total"]["epsilon"] <= 8.0 and data["privacy"]["total"]["releases"] == 1
        assert data["privacy"]["frozen_head"] is True and data["privacy"]["release"] == "class-sums"
        assert data["privacy"]["label_mechanism"] == "in-class-sums"
        assert data["privacy"]["total"]["covers"].startswith("activations and labels together")
        # This export has no pretrained weights: the device is told its frozen head releases random features.
        assert any("no pretrained weights" in w for w in data["warnings"])
        assert 0 <= data["on_device"]["test_accuracy"] <= 1
        token = (state / "tokens.txt").read_text().split()[-1]
        assert json.load(_status(port, token))["global_step"] == 0  # no step: one class-sum request
        # Per-example DP-A steps, labels randomised by default (RRWithPrior, label epsilon 4 per release).
        client = subprocess.run(
            _dpa("client", *device, "--release", "examples", "--epochs", "1", "--max-steps", "2", "--report",
                 str(report), "--device", "arm64", "--token-file", token_file),
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert client.returncode == 0, client.stdout + client.stderr
        data = json.loads(report.read_text())
        assert data["epochs"][0]["train_loss"] > 0
        assert (
            data["privacy"]["label_mechanism"] == "rr-with-prior" and data["privacy"]["label_epsilon_per_release"] == 4
        )
        assert data["privacy"]["total"]["covers"].startswith("activations and labels")
        assert json.load(_status(port, token))["global_step"] == 2
        # kill -HUP reloads the token file: a token added now is accepted without a restart.
        added = add_token(state / "tokens.txt", "device-2")
        device_2 = tmp_path / "device-2.token"
        device_2.write_text(added + "\n")
        server.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            try:
                _status(port, added)
                break
            except urllib.error.HTTPError as exc:
                assert exc.code == 401 and time.monotonic() < deadline
                time.sleep(0.1)
        evaluation = subprocess.run(
            _dpa("eval", *device, "--json", "--token-file", str(device_2)),  # the token loaded by SIGHUP
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert evaluation.returncode == 0, evaluation.stdout + evaluation.stderr
        result = json.loads(evaluation.stdout.strip().splitlines()[-1])
        assert result["test_images"] == 6 * 2 and 0 <= result["test_accuracy"] <= 1  # 8 images: 6 train, 2 test
        assert result["head_checkpoint"] is not None  # evaluated the trained head, not the initial one
        assert not (state / CHECKPOINT_NAME).exists()  # checkpoint interval not reached yet
    finally:
        server.send_signal(signal.SIGTERM)
        log = server.communicate(timeout=60)[0]
    # SIGTERM saved the tail; the fallback from the unavailable CUDA provider was explained.
    assert (state / CHECKPOINT_NAME).is_file(), log
    assert token not in log  # structured logs never carry the token
    assert "fell back from cuda" in log or "CUDAExecutionProvider is not in this onnxruntime build" in log, log
