"""``dpa pretrain`` gives the same weights for the same config on this machine, in float32 unless asked.

Issue 22: pretraining used bfloat16 autocast wherever the CPU had it natively, so the public weights, and
every demo figure after them, depended on the CPU. Now float32 is the default, the thread count is part
of the config, deterministic algorithms are on, and bf16 is only used on request (and recorded).
"""

from __future__ import annotations

import json

import pytest
import torch

from dpa.contract.errors import UserError
from exporter.pretrain import PretrainConfig, at_chance, native_bf16, pretrain, sidecar


def _run(tmp_path, name, **kw):  # type: ignore[no-untyped-def]
    kw = {"identities": 4, **kw}
    cfg = PretrainConfig(out=tmp_path / name / "w.pt", per_identity=4, epochs=2, cache_dir=tmp_path / "pub",
                         **kw)  # fmt: skip
    info = pretrain(cfg)
    return torch.load(cfg.out, weights_only=True), info


def test_the_same_config_gives_the_same_weights_bit_for_bit_in_float32(tmp_path):
    a, info = _run(tmp_path, "a")
    b, _ = _run(tmp_path, "b")
    assert info["precision"] == "float32" and info["bfloat16"] is False and info["threads"] == 2
    assert json.loads(sidecar(tmp_path / "a" / "w.pt").read_text())["config"]["mixed_precision"] is False
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and the same bytes (the sidecar's SHA-256 reproduces): torch.save to a path names the archive after it
    assert (tmp_path / "a" / "w.pt").read_bytes() == (tmp_path / "b" / "w.pt").read_bytes()
    c, _ = _run(tmp_path, "c", seed=1)  # and the seed matters (else the equality above proves little)
    assert not torch.equal(a["conv1_1.weight"], c["conv1_1.weight"])


def test_mixed_precision_is_only_used_on_request_and_recorded(tmp_path):
    if not native_bf16():
        with pytest.raises(UserError, match="--mixed-precision needs a CPU that computes bfloat16 natively"):
            PretrainConfig(mixed_precision=True)
        return
    a, _ = _run(tmp_path, "a")
    b, info = _run(tmp_path, "b", mixed_precision=True)
    assert info["precision"] == "bfloat16 autocast" and info["bfloat16"] is True
    assert not torch.equal(a["conv1_1.weight"], b["conv1_1.weight"])  # it does change the weights


def test_threads_are_checked():
    with pytest.raises(UserError, match="pretrain threads must be >= 1"):
        PretrainConfig(threads=0)


def test_an_embedding_only_file_loads_with_a_fresh_classifier_and_a_broken_one_is_refused(tmp_path):
    from dpa.contract.architecture import ArchConfig
    from exporter.vggface import build_parts, load_weights

    state, _ = _run(tmp_path, "a", keep_classifier=False)
    assert not any(k.startswith("fc8.") for k in state)
    arch = ArchConfig(image_size=64, width=0.25, num_classes=7, dropout=0.0)
    head, tail = build_parts(arch, "fc7")
    load_weights((head, tail), tmp_path / "a" / "w.pt", seed=3)
    assert torch.equal(head.state_dict()["conv1_1.weight"], state["conv1_1.weight"])
    assert tail.state_dict()["fc8.weight"].shape == (7, state["fc7.weight"].shape[0])
    del state["conv1_1.weight"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(UserError, match=r"missing conv1_1\.weight"):
        load_weights(build_parts(arch, "fc7"), tmp_path / "broken.pt")


def test_the_sidecar_names_a_command_dpa_pretrain_accepts(tmp_path):
    """Every option of the reproducing command is one `dpa pretrain` has (shipped weights name it)."""
    from typer.testing import CliRunner

    from dpa.cli.app import app

    _, info = _run(tmp_path, "a", loss="cosface", augment=True, cosine_schedule=True, keep_classifier=False)
    assert info["command"].startswith("dpa pretrain ") and "--loss cosface" in info["command"]
    assert info["sha256"] == __import__("hashlib").sha256((tmp_path / "a" / "w.pt").read_bytes()).hexdigest()
    help_text = CliRunner().invoke(app, ["pretrain", "--help"], terminal_width=200).output
    flags = [w for w in info["command"].split() if w.startswith("--")]
    assert flags and all(f in help_text for f in flags), [f for f in flags if f not in help_text]


def test_a_run_that_never_leaves_chance_says_so_in_its_history(tmp_path):
    """Guessing is loss ln(K) and accuracy 1/K: a run at a learning rate too small to move (1e-12) is flagged
    every epoch; the shipped weights' own history (CosFace on 1600 identities, far below its guessing loss)
    is not."""
    import math

    _, info = _run(tmp_path, "stuck", lr=1e-12)
    assert [row["at_chance"] for row in info["history"]] == [True, True]
    assert info["history"][-1]["loss"] == pytest.approx(math.log(4), rel=0.02)
    assert at_chance(math.log(2000), 0.0005, 2000) and at_chance(0.99 * math.log(10), 0.2, 10)
    assert not at_chance(0.97 * math.log(10), 0.1, 10) and not at_chance(math.log(10), 0.21, 10)
    from dpa.runs.shipped_weights import shipped_info

    info = shipped_info()
    last, k, cfg = info["history"][-1], len(info["identities"]), info["config"]
    sm = cfg["scale"] * cfg["margin"]
    guess = sm + math.log(math.exp(-sm) + k - 1) if cfg["loss"] == "cosface" else math.log(k)
    assert not last["at_chance"] and not at_chance(last["loss"], last["train_accuracy"], k, guess)


def test_a_run_started_from_earlier_weights_starts_there_and_records_them(tmp_path):
    """--init: at a learning rate too small to move (1e-12) the result is the init file's backbone, bit for
    bit up to that step, and not the fresh initialisation (seed 0); fc8 for the new identities is fresh;
    the sidecar names the init file's hash and the command that made it (the chain that reproduces)."""
    import hashlib

    first, first_info = _run(tmp_path, "first", keep_classifier=False, seed=5)
    second, info = _run(tmp_path, "second", init=tmp_path / "first" / "w.pt", lr=1e-12, identities=6)
    fresh, _ = _run(tmp_path, "fresh", lr=1e-12, identities=6)
    for name in ("conv1_1.weight", "fc7.weight"):
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=1e-9)
        assert not torch.allclose(fresh[name], first[name])
    assert second["fc8.weight"].shape[0] == 6 and "fc8.weight" not in first
    init = info["init"]
    assert init["sha256"] == hashlib.sha256((tmp_path / "first" / "w.pt").read_bytes()).hexdigest()
    assert init["command"] == first_info["command"] and "--init " in info["command"]
    with pytest.raises(UserError, match="pretrain --init: no weights file at"):
        PretrainConfig(init=tmp_path / "missing.pt")


def test_cosface_accuracy_is_the_nearest_direction_and_its_guessing_loss_is_its_own():
    """Scored with its margin, a CosFace run that learned well read 0.000 train accuracy on 1600 identities,
    and its loss sat above ln K, so `at_chance` misfired; guessing (every cosine 0) costs s m + ln(e^-sm + K-1)."""
    import math

    from exporter.pretrain import PretrainLoss, _Objective

    cfg = PretrainConfig(loss=PretrainLoss.COSFACE, margin=0.35, scale=30.0, margin_ramp_epochs=0.0)
    tail = torch.nn.Module()
    tail.fc8 = torch.nn.Linear(4, 3)
    with torch.no_grad():
        tail.fc8.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]))
    objective = _Objective(tail, cfg)
    # nearer its own identity (0) than identity 1, but not by the margin:
    emb = torch.tensor([[0.9, 0.8, 0.0, 0.0]])  # cosines 0.747 and 0.664: 0.747 - m < 0.664
    loss, logits, guess = objective(emb, torch.tensor([0]), epoch=5.0)
    assert logits.argmax(1).item() == 0
    torch.testing.assert_close(logits, 30.0 * torch.nn.functional.normalize(emb, dim=1) @ tail.fc8.weight.T)
    orthogonal = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    loss0, _, guess0 = objective(orthogonal, torch.tensor([0]), epoch=5.0)
    assert guess0 == pytest.approx(float(loss0), rel=1e-6) and guess0 > math.log(3)
    assert at_chance(float(loss0), 0.0, 3, guess0) and not at_chance(float(loss0), 0.0, 3 * 10**6, math.log(3 * 10**6))
