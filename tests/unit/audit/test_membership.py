"""Loss-threshold membership inference: AUC (Mann-Whitney), advantage, and the CLI end to end."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

from dpa.audit.membership import auc_mann_whitney, membership_advantage, membership_scores
from dpa.audit.victim import cross_entropy


def test_perfectly_separated_losses_give_auc_one_and_advantage_one():
    result = membership_scores([0.1, 0.2, 0.3], [0.5, 0.9, 1.4, 2.0])
    assert result.auc == 1.0
    assert result.advantage == 1.0
    assert result.threshold == 0.3  # every member at or below, no non-member
    assert (result.members, result.nonmembers) == (3, 4)
    reversed_ = membership_scores([0.5, 0.9], [0.1, 0.2])
    assert reversed_.auc == 0.0 and reversed_.advantage == 0.0 and reversed_.threshold == -math.inf


def test_identical_losses_give_chance():
    losses = [0.3, 0.7, 1.1, 0.2]
    result = membership_scores(losses, losses)
    assert result.auc == 0.5
    assert result.advantage == 0.0
    assert membership_scores([1.0, 1.0], [1.0, 1.0, 1.0]).auc == 0.5  # all tied


def test_auc_hand_computed_with_a_tie():
    # Members (lower loss = more member-like): 1, 2, 4; non-members: 2, 3.
    # Pairs (m, n) where m < n: (1,2) (1,3) (2,3) (4,-) -> 3 wins; (2,2) one tie -> 0.5; 6 pairs in all.
    # AUC = (3 + 0.5) / 6 = 7/12.
    auc = membership_scores([1.0, 2.0, 4.0], [2.0, 3.0]).auc
    assert auc == pytest.approx(7 / 12, abs=1e-12)
    # Scores directly: positives should score higher; same pairs with signs flipped.
    assert auc_mann_whitney([-1.0, -2.0, -4.0], [-2.0, -3.0]) == pytest.approx(7 / 12, abs=1e-12)
    # Brute force on random data with many ties.
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 30).astype(float)
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auc_mann_whitney(pos, neg) == pytest.approx(brute, abs=1e-12)


def test_advantage_hand_computed():
    # members 1, 2, 4; non-members 2, 3, 5. Guess "member" iff loss <= t:
    # t=1: TPR 1/3, FPR 0 -> 1/3; t=2: 2/3 - 1/3 = 1/3; t=3: 2/3 - 2/3 = 0; t=4: 1 - 2/3 = 1/3; t=5: 0.
    adv, t = membership_advantage([1.0, 2.0, 4.0], [2.0, 3.0, 5.0])
    assert adv == pytest.approx(1 / 3) and t == 1.0  # the first (lowest) threshold attaining it
    # members 0.1, 0.2, 0.9, 1.0; non-members 0.5, 0.6: t = 0.2 gives 2/4 - 0 = 0.5, the maximum.
    adv, t = membership_advantage([0.1, 0.2, 0.9, 1.0], [0.5, 0.6])
    assert adv == pytest.approx(0.5) and t == 0.2


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="empty"):
        membership_scores([], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        membership_scores([np.nan], [1.0])


def test_cross_entropy_matches_log_softmax():
    logits = np.array([[2.0, 0.0, -1.0], [1000.0, 0.0, 0.0]])  # the second would overflow a naive exp
    labels = np.array([0, 1])
    expected0 = -(2.0 - np.log(np.exp(2.0) + 1.0 + np.exp(-1.0)))
    ce = cross_entropy(logits, labels)
    assert ce[0] == pytest.approx(expected0)
    assert ce[1] == pytest.approx(1000.0)
    with pytest.raises(ValueError):
        cross_entropy(logits, np.array([0, 3]))


def test_membership_cli_on_an_overfit_tail(tmp_path):
    """Export (AdamW, to overfit fast), overfit the tail on the client's training split, then attack."""
    import torch

    torch.set_num_threads(1)
    from conftest import SMALL

    from dpa.audit.victim import TrainedSplitModel
    from dpa.cli.app import app as root_app
    from dpa.cli.attack import attack_app
    from dpa.contract.devices import resolve_device
    from dpa.contract.manifest import load_manifest
    from dpa.faces.synth import SynthConfig
    from dpa.privacy.mechanism import DPActivations, DPConfig
    from runtime_client.config import ClientConfig
    from runtime_client.dataset import load_examples as _load
    from runtime_client.dataset import prepare_data
    from runtime_client.head import HEAD_CHECKPOINT, HeadModel
    from runtime_server.tail import TailModel

    del root_app  # importing the app must keep working; the attack app is tested on its own
    from dpa.contract.manifest import OptimizerConfig, OptimizerName
    from exporter.export import ExportConfig, export

    artifacts = tmp_path / "artifacts"
    export(
        ExportConfig(arch=SMALL, cut="conv1_1", optimizer=OptimizerConfig(OptimizerName.ADAMW, lr=1e-3), out=artifacts)
    )
    manifest = load_manifest(artifacts)
    client_state, server_state = tmp_path / "client", tmp_path / "server"
    cfg = ClientConfig(
        artifacts=artifacts,
        synth=SynthConfig(identities=SMALL.num_classes, per_identity=8),
        state_dir=client_state,
    )
    train, test = prepare_data(cfg, manifest)
    device = resolve_device("cpu")
    head = HeadModel(artifacts, manifest, device)
    head.save(client_state / HEAD_CHECKPOINT)
    tail = TailModel(artifacts, manifest, device, server_state)
    images, labels = _load(train, np.arange(len(train.paths)), manifest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dp = DPActivations(DPConfig(clip=10.0, epsilon=math.inf), np.random.default_rng(0))
    released, _ = dp.release(head.forward(images))
    # Enough full-batch steps to overfit whatever the float rounding: at 25 the AUC was 0.61 or above 0.7
    # depending on which conv-gradient kernel ran; at 40 it was 0.84, at 60 0.93.
    for _ in range(60):
        tail.train_step(released, labels)
    tail.save()

    model = TrainedSplitModel(artifacts, tail_checkpoint=server_state, head_checkpoint=client_state, threads=1)
    clean = model.losses(train, DPConfig(clip=10.0, epsilon=math.inf), noisy=False)
    np.testing.assert_allclose(clean, model.tail_losses(released, labels), rtol=1e-4, atol=1e-5)

    result = CliRunner().invoke(
        attack_app,
        [
            "membership",
            "--artifacts", str(artifacts),
            "--server-state", str(server_state),
            "--client-state", str(client_state),
            "--identities", str(SMALL.num_classes),
            "--per-identity", "8",
            "--epsilon", "inf",
            "--clip", "10",
            "--out", str(tmp_path / "out"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "membership.json").read_text())
    rows = report["results"]
    print({k: (round(v["auc"], 3), round(v["advantage"], 3)) for k, v in rows.items()})
    clean_row = rows["tail on clean activations"]
    assert clean_row["members"] == len(train.paths) and clean_row["nonmembers"] == len(test.paths)
    assert clean_row["member_loss_mean"] < clean_row["nonmember_loss_mean"]
    assert clean_row["auc"] > 0.7
    # At epsilon = inf the deployed release is the clean activation: same figures.
    assert rows["head+tail with DP-A release"]["auc"] == pytest.approx(clean_row["auc"])

    missing = CliRunner().invoke(
        attack_app,
        ["membership", "--artifacts", str(artifacts), "--server-state", str(tmp_path / "nowhere")]
        + ["--client-state", str(client_state), "--clip", "10"],
    )
    assert missing.exit_code == 2 and "no checkpoint" in missing.output
    unclipped = CliRunner().invoke(attack_app, ["membership", "--artifacts", str(artifacts)])
    assert unclipped.exit_code == 2 and "carries no public release clip" in unclipped.output
