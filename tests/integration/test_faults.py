"""Faults from outside, with real `dpa serve` and `dpa client` processes on loopback: a disk that fills
during training, corrupted state files, and a state dir of another export.

The full disk is a real one: a small tmpfs mounted as the server's state dir (root only; skipped, saying
so, elsewhere). Every answered step must be applied exactly once, the device must finish, and after a
SIGKILL and a restart the weights must equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import export_small
from test_kill import EPOCHS, Run

from dpa.contract import wire
from dpa.contract.architecture import ArchConfig
from dpa.contract.manifest import load_manifest, manifest_sha256
from dpa.runs.loopback import free_port, wait_until_healthy
from runtime_client.edge import EdgeClient
from runtime_server.journal import JOURNAL_DIR
from runtime_server.tail import CHECKPOINT_NAME

STEPS = EPOCHS * 14  # the kill test's run: 42 steps


def _mount_tmpfs(path: Path, size_mb: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("the full-disk test mounts a tmpfs, which needs root")
    path.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"could not mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")


def _fill(path: Path, name: str) -> Path:
    """Write a file until the file system is full, to the last byte; the filler (remove it to free the space)."""
    filler = path / name
    with open(filler, "wb", buffering=0) as fh:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            block = b"\0" * size
            try:
                while True:
                    fh.write(block)
            except OSError:
                pass
    return filler


def _status(run: Run) -> dict:
    token = (run.state / "tokens.txt").read_text().split()[-1]
    req = urllib.request.Request(f"{run.url}/v1/status", headers={"Authorization": f"Bearer {token}"})
    return json.load(urllib.request.urlopen(req, timeout=5))


def _open_session(run: Run) -> tuple[int, dict]:
    token = (run.state / "tokens.txt").read_text().split()[-1]
    body = json.dumps({"manifest_sha256": manifest_sha256(run.artifacts)}).encode()
    req = urllib.request.Request(
        f"{run.url}/v1/sessions", data=body, headers={"Authorization": f"Bearer {token}"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


@pytest.mark.long
def test_a_disk_that_fills_during_training_loses_no_answered_step(small_export, tmp_path, capsys):
    reference = Run(small_export, tmp_path / "reference")
    reference.start_server()
    reference.start_client()
    reference.finish()
    want = reference.weights()

    run = Run(small_export, tmp_path / "full")
    _mount_tmpfs(run.state, 64)
    try:
        run.server_args = ["--min-free-mb", "0"]  # the real ENOSPC path: only the disk itself says no
        run.start_server()
        run.start_client()
        while (run.global_step() or 0) < 5:
            assert run.client is not None and run.client.poll() is None
            time.sleep(0.05)
        fillers = [_fill(run.state, "filler-1")]
        time.sleep(1.0)  # a step that had its space reserved may still finish, freeing its old stored reply
        fillers.append(_fill(run.state, "filler-2"))  # now the disk is full to the byte
        stuck = run.global_step()
        time.sleep(3.0)
        assert run.global_step() == stuck  # while the disk is full no step is applied
        sessions = _status(run)["sessions"]
        code, answer = _open_session(run)
        assert (code, answer.get("error")) == (503, "storage_error"), (code, answer, shutil.disk_usage(run.state))
        assert _status(run)["sessions"] == sessions
        for filler in fillers:
            filler.unlink()  # space is back: the device's retries go through
        run.finish()  # the device finished its run (exit 0)
        report = json.loads((run.device / "report.json").read_text())
        assert report["resilience"]["session_steps"] == STEPS
        assert list(run.state.rglob("*.tmp")) == []  # no temp file outlived a failed write
        # And what was answered is durable: a SIGKILL now, a restart (journal replay), a clean stop.
        run.start_server()
        assert _status(run)["global_step"] == STEPS
        assert run.server is not None
        run.server.send_signal(signal.SIGKILL)
        run.server.wait(30)
        run.start_server()
        assert _status(run)["global_step"] == STEPS  # every answered step, applied exactly once
        run.server.send_signal(signal.SIGTERM)
        run.server.wait(60)
        got = run.weights()
    finally:
        if run.server is not None and run.server.poll() is None:
            run.server.kill()
        if run.client is not None and run.client.poll() is None:
            run.client.kill()
        subprocess.run(["umount", "-l", str(run.state)], check=False)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    with capsys.disabled():
        print(
            f"\n[full disk] the state dir's tmpfs filled at global step {stuck}: no step applied for 3 s, a session "
            f"open answered 503 and left none behind; after space came back the device finished {STEPS} steps, "
            f"and after a SIGKILL and restart all {len(got)} weight tensors equal the uninterrupted run's"
        )


# ----------------------------------------------------------------------------- corrupt or foreign state


def _serve(artifacts: Path, state: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    args = ["serve", "--artifacts", str(artifacts), "--port", str(port), "--device", "cpu", "--no-auth"]
    args += ["--state-dir", str(state), "--checkpoint-every", "100"]
    out = open(log, "wb")  # noqa: SIM115 - closed with the process
    cmd = [sys.executable, "-m", "dpa.cli.app", *args]
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _steps(url: str, artifacts: Path, sid: str | None, first: int, count: int) -> str:
    """``count`` train steps from step ``first`` in session ``sid`` (a new one if None); the session id."""
    shape = load_manifest(artifacts).activation_shape
    rng = np.random.default_rng(first)

    async def run() -> str:
        async with EdgeClient(url) as edge:
            session = sid or (await edge.open_session(manifest_sha256(artifacts))).session_id
            for step in range(first, first + count):
                act = rng.standard_normal((2, *shape), dtype=np.float32)
                await edge.train(session, step, act, rng.integers(0, 6, 2))
            return session

    return asyncio.run(run())


@pytest.fixture(scope="module")
def used_state(small_export, tmp_path_factory) -> tuple[Path, str]:
    """A state dir as a crash leaves it: a checkpoint (2 steps), then 3 journalled steps; and the session id."""
    root = tmp_path_factory.mktemp("used")
    state, port = root / "state", free_port()
    url = f"http://127.0.0.1:{port}"
    server = _serve(small_export, state, port, root / "a.log")
    wait_until_healthy(url, server, timeout_s=60)
    sid = _steps(url, small_export, None, 1, 2)
    server.send_signal(signal.SIGTERM)  # a clean stop writes the checkpoint
    server.wait(60)
    server = _serve(small_export, state, port, root / "b.log")
    wait_until_healthy(url, server, timeout_s=60)
    _steps(url, small_export, sid, 3, 3)
    server.send_signal(signal.SIGKILL)  # steps 3..5 live only in the journal
    server.wait(30)
    assert len(list((state / JOURNAL_DIR).glob("*.dpaw"))) == 3
    return state, sid


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def _start_expecting_refusal(artifacts: Path, state: Path, tmp_path: Path) -> str:
    port = free_port()
    server = _serve(artifacts, state, port, tmp_path / "refused.log")
    try:
        code = server.wait(90)
    except subprocess.TimeoutExpired:
        server.kill()
        raise AssertionError("the server started on a corrupt or foreign state dir") from None
    text = " ".join((tmp_path / "refused.log").read_text(errors="replace").split())
    assert code == 2, text
    assert "Traceback" not in text, text
    return text


def _journal_entry(state: Path, index: int) -> Path:
    return sorted((state / JOURNAL_DIR).glob("*.dpaw"))[index]


@pytest.mark.parametrize(
    ("corrupt", "named", "message"),
    [
        (lambda s: _flip(s / CHECKPOINT_NAME, 1_000_003), CHECKPOINT_NAME, "is corrupt"),
        (lambda s: (s / CHECKPOINT_NAME).write_bytes((s / CHECKPOINT_NAME).read_bytes()[:4096]), CHECKPOINT_NAME,
         "is corrupt"),
        (lambda s: _flip(_journal_entry(s, 1), 50_000), JOURNAL_DIR, "is corrupt"),
        (lambda s: _flip(s / "sessions.json", 40), "sessions.json", "is corrupt"),
    ],
    ids=["checkpoint-byte", "checkpoint-truncated", "journal-activation-byte", "session-table"],
)  # fmt: skip
def test_a_corrupt_record_is_refused_naming_the_file(small_export, used_state, tmp_path, corrupt, named, message):
    state = tmp_path / "state"
    shutil.copytree(used_state[0], state)
    corrupt(state)
    text = _start_expecting_refusal(small_export, state, tmp_path)
    assert named in text and message in text and "move" in text.lower()  # names the file and what to do


def test_a_journalled_label_out_of_range_is_refused_as_the_live_path_refuses_it(small_export, used_state, tmp_path):
    """A checksum that matches is not enough: replay validates each request exactly as a live step."""
    state = tmp_path / "state"
    shutil.copytree(used_state[0], state)
    entry = _journal_entry(state, 0)
    message = wire.decode(bytearray(entry.read_bytes()[:-32]))
    labels = message.tensors["labels"].copy()
    labels[0] = 99  # the export has 6 classes
    body = wire.encode({"activation": message.tensors["activation"], "labels": labels}, message.meta)
    entry.write_bytes(bytes(body) + hashlib.sha256(body).digest())  # re-sealed: only validation can catch it
    text = _start_expecting_refusal(small_export, state, tmp_path)
    assert entry.name in text and "labels must be in 0..5" in text


def test_a_corrupt_stored_reply_is_never_served(small_export, used_state, tmp_path):
    state = tmp_path / "state"
    shutil.copytree(used_state[0], state)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _serve(small_export, state, port, tmp_path / "s.log")
    try:
        wait_until_healthy(url, server, timeout_s=60)  # replay stored step 5's reply again
        reply = state / "replies" / f"{used_state[1]}.dpaw"
        good = urllib.request.urlopen(f"{url}/v1/sessions/{used_state[1]}/steps/5", timeout=10).read()
        assert wire.decode(bytearray(good)).meta == {"global_step": 5, "step": 5}  # after the restart's replay
        _flip(reply, 200)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/v1/sessions/{used_state[1]}/steps/5", timeout=10)
        assert refused.value.code == 409 and json.load(refused.value)["error"] == "reply_unavailable"
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


def test_a_state_dir_of_another_export_is_refused(small_export, used_state, tmp_path):
    other = export_small(tmp_path / "other", arch=ArchConfig(image_size=64, width=0.25, num_classes=5, dropout=0.0))
    state = tmp_path / "state"
    shutil.copytree(used_state[0], state)
    text = _start_expecting_refusal(other, state, tmp_path)
    assert "belongs to another export" in text and str(state) in text


# ----------------------------------------------------------------------------- slow and silent clients


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _raw_request(port: int, sid: str, body: bytes, *, send: int | None = None, rcvbuf: int = 0) -> socket.socket:
    """A train request on a raw socket: headers, then the first ``send`` bytes of the body (all if None);
    ``rcvbuf`` shrinks the socket's receive buffer first, so an unread reply stays in the server."""
    conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    conn.settimeout(30)
    conn.connect(("127.0.0.1", port))
    head = (
        f"POST /v1/sessions/{sid}/train HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: {wire.CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    conn.sendall(head.encode() + (body if send is None else body[:send]))
    return conn


def _train_body(artifacts: Path, step: int, batch: int = 2) -> bytes:
    rng = np.random.default_rng(step)
    act = rng.standard_normal((batch, *load_manifest(artifacts).activation_shape), dtype=np.float32)
    return bytes(wire.encode({"activation": act, "labels": rng.integers(0, 6, batch)}, {"step": step}))


def _new_session(port: int, artifacts: Path) -> str:
    async def run() -> str:
        async with EdgeClient(f"http://127.0.0.1:{port}") as edge:
            return (await edge.open_session(manifest_sha256(artifacts))).session_id

    return asyncio.run(run())


def test_two_slow_uploads_do_not_stop_a_normal_device(small_export, quick_server, capsys):
    port, _ = quick_server
    slow = [_raw_request(port, _new_session(port, small_export), _train_body(small_export, 1), send=64) for _ in "ab"]
    sid = _new_session(port, small_export)
    t0, steps = time.monotonic(), 0
    while time.monotonic() - t0 < 4.0:  # the slow bodies are still "arriving", 64 bytes in
        _steps(f"http://127.0.0.1:{port}", small_export, sid, steps + 1, 1)
        steps += 1
    assert steps >= 10  # before the fix: 0 (the slow bodies held both step slots)
    answers = []
    for conn in slow:  # past their deadline (2 s + 0.5 MB at 256 KiB/s) the server answers and closes
        conn.settimeout(30)
        answers.append(conn.recv(200).split(b"\r\n", 1)[0].decode())
        conn.close()
    assert answers == ["HTTP/1.1 408 Request Timeout"] * 2, answers
    with capsys.disabled():
        print(f"\n[slow uploads] 2 uploads stalled after 64 bytes; a normal device made {steps} steps in 4 s; "
              f"the stalled ones were answered {answers[0][9:]} at their deadline")  # fmt: skip


def _metric(port: int, name: str) -> float:
    """One unlabelled sample of the server's /metrics (``--no-auth``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.long
@pytest.mark.parametrize("quick_server", [8192], indirect=True)  # deadline: 2 s + 8.4 MB at 8 MiB/s
def test_replies_nobody_reads_are_let_go(small_export, quick_server, capsys):
    """Three rounds of 16 devices that send a full batch and never read the 8.4 MB reply, every device
    staying connected. Each round's replies are held (``dpa_reply_bytes_unsent``) until their deadline,
    then let go (the gauge back to 0, ``dpa_replies_abandoned_total`` up by 16) with the devices still
    connected. Were they pinned until the devices hang up, RSS would grow by a round's 134 MB each round;
    let go, it levels off. RSS after a deadline says little (glibc keeps freed heap without trimming it,
    sometimes), so RSS while held is the measure, the third round against the second."""
    port, server = quick_server
    base = _rss_mb(server.pid)
    body = _train_body(small_export, 1, batch=32)
    conns: list[socket.socket] = []

    rounds = [0]

    def applied() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=5) as resp:
            return int(json.load(resp)["global_step"])

    def silent_round() -> tuple[float, float, float]:
        sids = [_new_session(port, small_export) for _ in range(16)]
        conns.extend(_raw_request(port, sid, body, rcvbuf=4096) for sid in sids)
        rounds[0] += 1
        deadline = time.monotonic() + 60
        while applied() < 16 * rounds[0]:  # every step applied (one at a time: seconds on a busy machine)
            assert time.monotonic() < deadline, "the round's steps were not applied within 60 s"
            time.sleep(0.1)
        held, held_bytes = _rss_mb(server.pid), _metric(port, "dpa_reply_bytes_unsent")
        deadline = time.monotonic() + 30  # the last reply's deadline is 3 s from its step
        while (
            _metric(port, "dpa_reply_bytes_unsent") > 0 or _metric(port, "dpa_replies_abandoned_total") < 16 * rounds[0]
        ):
            assert time.monotonic() < deadline, "the round's unread replies were still held 30 s after their steps"
            time.sleep(0.1)
        return held, held_bytes, _rss_mb(server.pid)

    held1, bytes1, after1 = silent_round()
    held2, bytes2, after2 = silent_round()
    held3, bytes3, after3 = silent_round()
    health = urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=5).status
    for conn in conns:
        conn.close()
    assert health == 200
    assert held1 > base + 60  # the replies were held at first (else this test would prove nothing)
    assert min(bytes1, bytes2, bytes3) > 0.9 * len(body)  # at least the last reply of each round was held
    assert held3 < held2 + 100  # levelled off (pinned, each round adds its replies' ~134 MB and more)
    with capsys.disabled():
        print(f"\n[unread replies] 3 x 16 devices sent a full batch and never read the 8.4 MB reply: server RSS "
              f"{base:.0f} MB before, {held1:.0f} / {after1:.0f} MB during / after the first round's deadline, "
              f"{held2:.0f} / {after2:.0f} MB in the second, {held3:.0f} / {after3:.0f} MB in the third "
              f"(unsent reply bytes held: {bytes1 / 1e6:.0f}, {bytes2 / 1e6:.0f}, {bytes3 / 1e6:.0f} MB, then 0), "
              "all 48 still connected")  # fmt: skip


def test_a_class_sum_release_cut_off_by_sigkill_is_sent_once_after_resume(small_export, tmp_path, capsys):
    """The default recipe as real processes: `dpa client` (class sums) is SIGKILLed, with the server, the moment
    its release is kept on the device, before or while it is sent. Both restarted (`--resume`), the device
    re-sends the same bytes, and the server holds exactly that one release, whichever way the race went."""
    from runtime_server.class_sums import CLASS_SUMS_DIR

    port, state, device = free_port(), tmp_path / "state", tmp_path / "device"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def serve() -> subprocess.Popen:  # type: ignore[type-arg]
        args = ["serve", "--artifacts", str(small_export), "--port", str(port), "--device", "cpu", "--no-auth"]
        log = open(tmp_path / "serve.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "dpa.cli.app", *args, "--state-dir", str(state)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
        wait_until_healthy(f"http://127.0.0.1:{port}", proc, timeout_s=60)
        return proc

    def client(*extra: str) -> subprocess.Popen:  # type: ignore[type-arg]
        args = ["client", "--server", f"http://127.0.0.1:{port}", "--artifacts", str(small_export), "--device", "cpu",
                "--identities", "6", "--per-identity", "8", "--clip", "50", "--seed", "3", "--state-dir", str(device),
                "--report", str(tmp_path / "report.json"), "--retry-s", "60", *extra]  # fmt: skip
        return subprocess.Popen([sys.executable, "-m", "dpa.cli.app", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env)  # fmt: skip

    server = serve()
    first = client()
    kept = device / "class_sums.wire"
    deadline = time.monotonic() + 120
    while not kept.is_file():
        assert first.poll() is None, first.communicate()[0].decode()[-3000:]
        assert time.monotonic() < deadline, "the device kept no release within 120 s"
        time.sleep(0.005)
    first.send_signal(signal.SIGKILL)
    server.send_signal(signal.SIGKILL)
    first.wait(30)
    server.wait(30)
    delivered = len(list((state / CLASS_SUMS_DIR).glob("*.npz"))) if (state / CLASS_SUMS_DIR).is_dir() else 0
    server = serve()
    try:
        second = client("--resume")
        out = second.communicate(timeout=300)[0].decode()
        assert second.returncode == 0, out[-3000:]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["resilience"]["kept_release_resent"] is True
    files = list((state / CLASS_SUMS_DIR).glob("*.npz"))
    assert len(files) == 1
    with np.load(files[0]) as z:
        assert str(z["digest"]) == hashlib.sha256(kept.read_bytes()).hexdigest()
    with capsys.disabled():
        print(f"\n[class sums, SIGKILL] device and server killed once the release was kept ({delivered} delivered "
              "before the kill); after --resume the server holds that one release, byte for byte")  # fmt: skip
