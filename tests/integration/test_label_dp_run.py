"""Label privacy end to end: randomised labels on the wire, the session says so, a budget the labels
would exceed is refused before anything is sent, and the server's label inference stays within the
bound the run's epsilon implies."""

from __future__ import annotations

import asyncio
import math
import warnings

import numpy as np
import pytest

from dpa.audit.label_attack import attack_labels
from dpa.contract.server_view import load_view
from dpa.faces.synth import SynthConfig
from dpa.privacy.accountant import BudgetExceeded
from dpa.privacy.label_accounting import label_guess_bound
from dpa.privacy.mechanism import DPConfig
from runtime_client.config import ClientConfig
from runtime_client.trainer import run_training


def _cfg(server, export, tmp_path, **kw):  # type: ignore[no-untyped-def]
    base = {
        "server": server.url, "artifacts": export, "epochs": 3, "batch_size": 4,
        "dp": DPConfig(clip=50.0, epsilon=None if kw.get("total_epsilon") else 1.0),
        "synth": SynthConfig(identities=6, per_identity=16),
        "progress": False, "seed": 5, "state_dir": tmp_path / "client",
    }  # fmt: skip
    return ClientConfig(**(base | kw))


def test_labels_are_randomised_and_the_label_audit_stays_within_its_bound(small_export, start_server, tmp_path):
    server = start_server(small_export)
    cfg = _cfg(server, small_export, tmp_path, label_epsilon=0.5, label_prior="uniform", record_view=tmp_path / "view")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = asyncio.run(run_training(cfg))
    total = report["privacy"]["total"]
    assert total["label_epsilon"] == 1.5 and total["labels"].startswith("randomised")
    assert total["epsilon"] > total["activation_epsilon"]
    view = load_view(tmp_path / "view")
    assert view.header["labels"] == {"mechanism": "rr-with-prior", "epsilon": 0.5}
    sent = np.concatenate([view.arrays(i)[1] for i in range(len(view.releases))])
    true = np.concatenate([view.true_labels(i) for i in range(len(view.releases))])
    keep = math.exp(0.5) / (math.exp(0.5) + 5)
    assert abs((sent == true).mean() - keep) < 0.12  # 216 labels at keep 0.25: sd 0.03
    assert (sent != true).any()
    server.stop()
    result = attack_labels(tmp_path / "view", small_export, server.state.config.state_dir)
    print(f"\nlabel inference: {result}")
    assert result.examples == 72 and result.releases_per_example == 3
    assert result.bound_labels_only == pytest.approx(label_guess_bound(epsilon=1.5, delta=0.0, classes=6))
    assert result.accuracy_labels_only <= result.bound_labels_only
    assert result.accuracy_everything <= result.bound_everything
    assert result.accuracy_labels_only > result.chance - 0.1


def test_a_budget_the_labels_would_exceed_is_refused_before_anything_is_sent(small_export, start_server, tmp_path):
    server = start_server(small_export)
    cfg = _cfg(server, small_export, tmp_path, label_epsilon=4.0, total_epsilon=5.0, epochs=2)
    with pytest.raises(BudgetExceeded, match="alone spend epsilon 8"):
        asyncio.run(run_training(cfg))
    assert not server.state.sessions.sessions and server.state.tail.global_step == 0


def test_labels_in_clear_warn_and_the_session_records_it(small_export, start_server, tmp_path):
    server = start_server(small_export)
    cfg = _cfg(server, small_export, tmp_path, label_epsilon=math.inf, epochs=1, max_steps_per_epoch=1)
    with pytest.warns(UserWarning, match="label-epsilon inf: every training label"):
        report = asyncio.run(run_training(cfg))
    assert report["privacy"]["total"]["covers"] == "activations only: labels travel in clear"
    assert "labels are sent to the server in clear" in report["warnings"]
