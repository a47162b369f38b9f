"""`dpa demo` on a tiny configuration: four runs, the JSON the README documents, recorded views."""

from __future__ import annotations

import io
import json
import warnings

import pytest
from rich.console import Console

from dpa.audit.class_sum_audit import is_class_sum_view
from dpa.cli.demo import print_summary
from dpa.contract.server_view import load_view
from dpa.runs.demo import DemoConfig, demo_summary, run_demo
from dpa.runs.reference import ReferenceConfig


def test_demo_runs_and_its_json_has_every_field(tmp_path):
    cfg = DemoConfig(
        workdir=tmp_path, identities=4, per_identity=12, pretrain_identities=6, pretrain_per_identity=6,
        pretrain_epochs=1, nonprivate_epochs=1, pretrain=True, recognition_public_identities=10,
        recognition_strangers=4,
        reference=ReferenceConfig(lrs=(1e-3, 1e-2), epochs=1, probe_cs=(0.1, 1.0), tuning_identities=3,
                                  tuning_per_identity=8),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = demo_summary(run_demo(cfg, say=lambda _msg: None))
    data = json.loads(json.dumps(summary))
    names = [r["name"] for r in data["runs"]]
    assert names == ["non-private", "private", "private, per-example", "private, conv1_1"]
    nonprivate, private, per_example, seed_cut = data["runs"]
    assert nonprivate["epsilon_total"] is None and nonprivate["label_epsilon"] is None
    # The reference is the best of every non-private recipe, and names it; private runs are shares of it.
    recipes = nonprivate["recipes"]
    assert set(recipes) == {"class templates", "head + tail", "linear probe", "fine-tune"}
    assert recipes["head + tail"] == nonprivate["tail_clean_test_accuracy"]
    assert nonprivate["clean_test_accuracy"] == max(recipes.values()) == recipes[nonprivate["clean_classifier"]]
    for run in data["runs"]:
        assert run["share_of_nonprivate"] == pytest.approx(run["clean_test_accuracy"] / max(recipes.values()))
    for run in (private, per_example, seed_cut):
        assert 0 < run["epsilon_total"] <= 8.0 and run["delta"] == 1e-5 and run["releases_per_example"] == 1
        assert run["clean_classifier"] == "class templates" and set(run["recipes"]) == {"class templates"}
    for run in (private, seed_cut):  # the class sums: labels inside their guarantee, no tail trained
        assert run["release"] == "class-sums" and run["label_epsilon"] == "in class sums"
        assert run["epsilon_activations"] == run["epsilon_total"] and run["private_test_accuracy"] is None
        assert is_class_sum_view(run["view"])
    assert per_example["release"] == "examples" and per_example["label_epsilon"] == 4.0
    assert per_example["epsilon_activations"] < per_example["epsilon_total"]
    assert private["cut"] == per_example["cut"] == "fc7" and seed_cut["cut"] == "conv1_1"
    assert private["device_flops_share"] > 0.9 > seed_cut["device_flops_share"]
    for run in data["runs"]:
        assert set(run) >= {"name", "epsilon_total", "delta", "releases_per_example", "clean_test_accuracy",
                            "private_test_accuracy", "chance", "view", "label_epsilon", "release"}  # fmt: skip
        assert run["chance"] == pytest.approx(0.25) and 0 <= run["clean_test_accuracy"] <= 1
        if run["release"] == "examples":
            assert len(load_view(run["view"]).releases) >= 1
    # The field's figures, per run, with thresholds from public faces (dpa.runs.recognition).
    for run in data["runs"]:
        assert 0 <= run["verification_auc"] <= 1 and 0 <= run["tar_at_far_1e-3"] <= 1
        assert 0 <= run["open_set_rejection"] <= 1 and run["open_set_far_public"] == 0.01
        assert 0 <= run["identification_accuracy"] <= 1
    assert private["identification_accuracy"] == private["clean_test_accuracy"]  # the device's own classifier
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # What the figures depend on is in the JSON: the seed, float32 pretraining (bf16 only on request), the CPU.
    assert data["seed"] == 0 and data["pretraining"]["precision"] == "float32"
    assert {"model", "avx512", "bf16", "summary"} <= set(data["cpu"])
    # Printed at 80 columns (piped, CI, a narrow terminal): every headline figure of the JSON, none cut.
    out = Console(width=80, file=io.StringIO(), record=True)
    print_summary(out, summary, 4, tmp_path, None)
    text = out.export_text()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    for run in data["runs"]:
        assert run["name"] in text
        for key, form in (("clean_test_accuracy", ".3f"), ("verification_auc", ".3f"), ("tar_at_far_1e-3", ".3f"),
                          ("open_set_rejection", ".2f"), ("share_of_nonprivate", ".1%"),
                          ("private_test_accuracy", ".3f"), ("device_flops_share", ".1%")):  # fmt: skip
            if run[key] is not None:
                assert f"  {format(run[key], form)}" in text, (run["name"], key)
    # A second run reuses the pretrained weights instead of training them again.
    messages: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_demo(cfg, say=messages.append)
    assert any(m.startswith("reusing the public pretrained weights") for m in messages)
    assert not any(m.startswith("choosing the reference's") for m in messages)  # the public tuning is cached
