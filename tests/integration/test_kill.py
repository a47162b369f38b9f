"""Kill test: SIGKILL the server (and the device) mid-run; the result equals an uninterrupted run.

A deterministic run (``--epsilon inf``, fixed seed, no dropout) is trained twice over
real loopback HTTP by a ``dpa serve`` and a ``dpa client`` process. In the second run
the server is SIGKILLed and restarted several times and the device is SIGKILLed and
restarted with ``--resume``, each at a random moment after some progress. Both the
tail's and the head's final weights must equal the uninterrupted run's exactly: no step
lost, none applied twice.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from dpa.contract.ort_training import CheckpointState
from dpa.runs.loopback import free_port, wait_until_healthy
from runtime_client.head import HEAD_CHECKPOINT, load_head_checkpoint
from runtime_server.tail import CHECKPOINT_NAME

EPOCHS, BATCH, IDENTITIES, PER_IDENTITY = 3, 4, 6, 12  # 54 training images: 14 steps an epoch, 42 in all
SCHEDULE = ("server", "client", "server", "server", "client", "server")  # what to kill, in order


def _json_or_none(line: str) -> dict | None:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _dpa(*args: str) -> list[str]:
    return [sys.executable, "-m", "dpa.cli.app", *args]


class Run:
    """One server state dir + one device state dir, with processes started and killed at will."""

    def __init__(self, artifacts: Path, root: Path, micro_batch: int | None = None, frozen: bool = False) -> None:
        self.artifacts = artifacts
        self.micro_batch = micro_batch
        self.frozen = frozen
        self.state = root / "server"
        self.device = root / "device"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        self.server: subprocess.Popen[bytes] | None = None
        self.client: subprocess.Popen[bytes] | None = None
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.starts = 0
        self.server_args: list[str] = []  # more `dpa serve` flags (the fault tests add theirs)

    def start_server(self) -> None:
        self.starts += 1
        args = ["serve", "--artifacts", str(self.artifacts), "--port", str(self.port), "--device", "cpu"]
        args += ["--state-dir", str(self.state), *self.server_args]
        log = open(self.logs / f"server-{self.starts}.log", "wb")  # noqa: SIM115 - closed with the process
        self.server = subprocess.Popen(_dpa(*args), stdout=log, stderr=subprocess.STDOUT, env=self.env)
        try:
            wait_until_healthy(self.url, self.server, timeout_s=60)
        except RuntimeError as exc:
            raise AssertionError((self.logs / f"server-{self.starts}.log").read_text()) from exc

    def start_client(self) -> None:
        resume = (self.device / HEAD_CHECKPOINT).is_file()
        args = ["client", "--server", self.url, "--artifacts", str(self.artifacts), "--no-on-device-templates"]
        if self.frozen:  # the default recipe, seeded: noise and labels drawn once, the same bytes re-sent after
            args += ["--total-epsilon", "50", "--label-epsilon", "2", "--release", "examples"]
        else:  # the head trains, without noise or budget
            args += ["--epsilon", "inf", "--total-epsilon", "inf", "--train-head"]
        args += ["--clip", "10"]  # the export carries no public clip: the device is told it
        args += ["--seed", "7", "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--device", "cpu"]
        args += ["--identities", str(IDENTITIES), "--per-identity", str(PER_IDENTITY)]
        args += ["--state-dir", str(self.device), "--report", str(self.device / "report.json")]
        args += ["--token-file", str(self.state / "tokens.txt"), "--retry-s", "120"]
        args += ["--resume"] if resume else []
        args += ["--micro-batch", str(self.micro_batch)] if self.micro_batch else []
        log = open(self.logs / f"client-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
        self.client = subprocess.Popen(_dpa(*args), stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def global_step(self) -> int | None:
        token = (self.state / "tokens.txt").read_text().split()[-1]
        req = urllib.request.Request(f"{self.url}/v1/status", headers={"Authorization": f"Bearer {token}"})
        try:
            return int(json.load(urllib.request.urlopen(req, timeout=2))["global_step"])
        except OSError:
            return None

    def kill(self, which: str) -> None:
        proc = self.server if which == "server" else self.client
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        if which == "server":
            self.start_server()
        else:
            self.start_client()

    def finish(self) -> None:
        assert self.client is not None and self.server is not None
        code = self.client.wait(300)
        logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.logs.glob("client-*")))
        assert code == 0, logs
        self.server.send_signal(signal.SIGTERM)
        self.server.wait(60)

    def weights(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        state = CheckpointState.load_checkpoint(str(self.state / CHECKPOINT_NAME))
        out.update({f"tail.{name}": np.array(p.data) for name, p in state.parameters})
        out.update({f"head.{name}": p for name, p in load_head_checkpoint(self.device / HEAD_CHECKPOINT)[0].items()})
        return out


@pytest.mark.long
@pytest.mark.parametrize(
    ("micro_batch", "frozen"), [(None, False), (1, False), (None, True)],
    ids=["whole-batch", "streamed-micro-batch", "frozen-head"],
)  # fmt: skip
def test_sigkilled_server_and_device_end_with_the_uninterrupted_weights(
    small_export, tmp_path, capsys, micro_batch, frozen
):
    """With --micro-batch the request is produced while it uploads and the reply consumed per example. With
    the frozen head (the default recipe, noise on) each example is released once and the later epochs
    re-send those bytes: the tail ends equal only if a killed device re-sent exactly what it had sent."""
    # The uninterrupted reference runs beside the killed run (its own server, port and folders): each spends
    # most of its time starting processes and waiting on the other side, so side by side takes less wall time.
    reference = Run(small_export, tmp_path / "reference", micro_batch, frozen)
    reference.start_server()
    reference.start_client()

    run = Run(small_export, tmp_path / "killed", micro_batch, frozen)
    run.start_server()
    run.start_client()
    rng = random.Random(0)
    kills = {"server": 0, "client": 0}
    last = 0
    for target in SCHEDULE:
        # Let the run make progress, then kill at a random moment within the next steps.
        while True:
            assert run.client is not None
            if run.client.poll() is not None:
                break
            step = run.global_step()
            if step is not None and step >= last + 3:
                break
            time.sleep(0.02)
        if run.client.poll() is not None:
            break
        time.sleep(rng.uniform(0.0, 0.15))
        run.kill(target)
        kills[target] += 1
        last = run.global_step() or last
    run.finish()
    reference.finish()
    want = reference.weights()
    want_step = json.loads((reference.device / "report.json").read_text())["resilience"]["session_steps"]
    assert want_step == EPOCHS * 14
    got = run.weights()
    report = json.loads((run.device / "report.json").read_text())
    replayed = sum(
        entry.get("replayed_steps", 0)
        for log in run.logs.glob("server-*.log")
        for entry in map(_json_or_none, log.read_text().splitlines())
        if entry and entry.get("event") == "server started"
    )

    assert kills["server"] >= 3 and kills["client"] >= 1, kills  # the run was long enough to be interrupted
    assert replayed > 0  # restarts restored journalled steps (checkpoints come every 20 steps)
    assert report["resilience"]["session_steps"] == want_step
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    mode = (
        "frozen head, noise on" if frozen else f"micro-batch {micro_batch}, streamed" if micro_batch else "whole batch"
    )
    with capsys.disabled():
        print(
            f"\n[kill test, {mode}] server SIGKILLed and restarted {kills['server']}x, device {kills['client']}x; "
            f"{report['resilience']['session_steps']} session steps (reference {want_step}), {replayed} replayed "
            "from the journal on restart; "
            f"weights of {len(got)} tensors equal to the uninterrupted run"
        )
