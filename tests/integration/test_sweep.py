"""`dpa sweep` on a tiny frontier: points, whole-run epsilon, both accuracies, attack, device cost,
a table and a figure that read back, and a re-run that resumes instead of retraining."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from dpa.cli.errors import parse_dims_list, parse_epsilons, parse_positive_list
from dpa.cli.sweep import print_frontier
from dpa.contract.manifest import load_manifest
from dpa.privacy.accountant import calibrate_noise_multiplier, epsilon_spent
from dpa.runs.sweep import SweepConfig, run_sweep


def test_frontier_writes_table_and_figure_and_resumes(tmp_path):
    cfg = SweepConfig(
        workdir=tmp_path,
        total_epsilons=(1e3,),
        cuts=("conv1_1", "pool1"),
        sizes=((4, 8),),
        epochs=2,
        max_steps_per_epoch=2,
        batch_size=4,
        attack_epochs=1,
        attack_aux_identities=2,
        attack_images_per_identity=4,
    )
    results = run_sweep(cfg, say=lambda _msg: None, progress=False)
    rows = list(csv.DictReader((tmp_path / "frontier.csv").open()))
    assert [(r["cut"], r["epsilon_budget"]) for r in rows] == [
        ("conv1_1", ""), ("conv1_1", "1000"), ("pool1", ""), ("pool1", "1000"),
    ]  # fmt: skip
    data = json.loads((tmp_path / "frontier.json").read_text())
    assert data == json.loads(json.dumps(results, default=str)) or data["points"]
    for p in results["points"]:
        # Both accuracies, the non-private reference of the same cut, and the ratio between them.
        assert 0 <= p["clean_test_accuracy"] <= 1 and 0 <= p["private_test_accuracy"] <= 1
        ref = next(q for q in results["points"] if q["cut"] == p["cut"] and q["epsilon_budget"] is None)
        assert p["nonprivate_clean_accuracy"] == ref["clean_test_accuracy"]
        if ref["clean_test_accuracy"]:
            assert p["relative_clean_accuracy"] == pytest.approx(p["clean_test_accuracy"] / ref["clean_test_accuracy"])
        # The strongest attack against its baseline, and the device's cost of the cut.
        assert 0 <= p["attack_ssim"] <= 1 and 0 <= p["baseline_ssim"] <= 1 and p["attack"] in ("decoder", "map")
        assert 0 < p["head_flops_share"] < 1 and p["head_step_ms"] > 0 and p["peak_rss_mb"] > 10
    private = [p for p in results["points"] if p["epsilon_budget"] is not None]
    # The whole run's epsilon is the accountant's, within the budget, for `epochs` releases of each example.
    for p in private:
        z = calibrate_noise_multiplier(mechanism="gaussian", total_epsilon=1e3, delta=cfg.delta, releases=2)
        assert p["noise_multiplier"] == pytest.approx(z)
        assert p["epsilon_total"] == pytest.approx(
            epsilon_spent(mechanism="gaussian", noise_multiplier=z, releases=2, delta=cfg.delta)
        )
        assert p["epsilon_total"] <= 1e3 and p["releases_per_example"] == 2
    conv, pool = (p for p in results["points"] if p["epsilon_budget"] is None)
    assert conv["wire_bytes_per_example"] == 4 * 16 * 64 * 64 and pool["wire_bytes_per_example"] == 4 * 16 * 32 * 32
    assert len(results["smallest_epsilon_at"]) == 2
    with Image.open(tmp_path / "frontier.png") as img:
        pixels = np.asarray(img.convert("L"), dtype=np.float32)
        assert img.size == (960, 600)
    assert pixels.std() > 5, "frontier.png is blank"
    # `dpa sweep`'s table at 80 columns (piped, CI, a narrow terminal) cuts no figure.
    out = Console(width=80, file=io.StringIO(), record=True)
    print_frontier(out, results, "DP-A frontier", tmp_path)
    printed = out.export_text()
    assert "…" not in printed and max(map(len, printed.splitlines())) <= 80, printed
    for p in results["points"]:
        assert f"  {p['clean_test_accuracy']:.3f}" in printed and f"  {p['attack_ssim']:.3f}" in printed
    # Resumable: a second run with the same settings trains nothing and gives the same table.
    before = (tmp_path / "points").stat().st_mtime_ns, sorted(p.name for p in (tmp_path / "points").iterdir())
    again = run_sweep(cfg, say=lambda msg: pytest.fail(f"retrained: {msg}"), progress=False)
    assert [p["clean_test_accuracy"] for p in again["points"]] == [p["clean_test_accuracy"] for p in results["points"]]
    assert sorted(p.name for p in (tmp_path / "points").iterdir()) == before[1]


def test_sweep_config_is_checked():
    with pytest.raises(ValueError, match="total epsilon"):
        SweepConfig(total_epsilons=(math.inf,))
    with pytest.raises(ValueError, match="cut"):
        SweepConfig(cuts=("conv9",))
    with pytest.raises(ValueError, match="data size"):
        SweepConfig(sizes=((1, 10),))
    with pytest.raises(ValueError, match="a release projection needs a public recipe"):
        SweepConfig(release_dims=(0, 16))
    with pytest.raises(ValueError, match="release dims must be >= 0"):
        SweepConfig(recipe="class-sums", release_dims=(-1,))


def test_parse_positive_list():
    assert parse_positive_list("clip scale", "0.5, 1,2") == (0.5, 1.0, 2.0)
    for bad, message in (("0", "clip scale must be > 0"), ("x", "clip scale 'x' is not a number"),
                         ("inf", "must be finite"), ("", "give at least one clip scale")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            parse_positive_list("clip scale", bad)
    assert parse_dims_list("0, 16") == (0, 16)
    for bad, message in (("1.5", "whole numbers >= 0"), ("-2", "whole numbers >= 0"), ("", "give at least one")):
        with pytest.raises(ValueError, match=message):
            parse_dims_list(bad)


def test_parse_epsilons():
    assert parse_epsilons("0.5, 1,inf") == (0.5, 1.0, math.inf)
    for bad, message in (("0", "must be > 0"), ("x", "is not a number"), ("-1", "must be > 0")):
        try:
            parse_epsilons(bad)
        except ValueError as exc:
            assert message in str(exc)
        else:
            raise AssertionError(bad)


@pytest.mark.long
def test_the_class_sum_recipe_sweeps_with_its_own_attack(tmp_path):
    """`--recipe class-sums`: one release of each class's sum per point (no tail trained), the whole-run
    epsilon of one Gaussian release, the class-sum attack's figures beside each point, the field's figures
    (verification, open set), and the clip lever: each clip scale its own frontier against its own
    non-private run."""
    cfg = SweepConfig(
        workdir=tmp_path, total_epsilons=(8.0,), cuts=("pool5",), sizes=((4, 8),), batch_size=4, attack_epochs=1,
        image_size=32, attack_aux_identities=2, attack_images_per_identity=4, recipe="class-sums",
        pretrain_identities=4, pretrain_per_identity=4, pretrain_epochs=1, clip_scales=(2.0,), release_dims=(0, 3),
        recognition_public_identities=6, recognition_strangers=3,
    )  # fmt: skip
    results = run_sweep(cfg, say=lambda _msg: None, progress=False)
    clear, private, clear2, private2 = results["points"]
    assert [p["release_dims"] for p in results["points"]] == [0, 0, 3, 3]
    assert {p["clip_scale"] for p in results["points"]} == {2.0}
    # Each export's clip is twice its own public clip (the projected one measures it in its 3 dimensions).
    plain, projected = (load_manifest(tmp_path / "exports" / name) for name in ("pool5", "pool5-dims3"))
    assert projected.activation_shape == (3,) and plain.release_dims is None
    assert clear["clip"] == private["clip"] == pytest.approx(2 * plain.release_clip)
    assert clear2["clip"] == private2["clip"] == pytest.approx(2 * projected.release_clip)
    assert private2["noise_multiplier"] == pytest.approx(private["noise_multiplier"])  # the levers move sigma only
    assert private2["nonprivate_clean_accuracy"] == clear2["clean_test_accuracy"]
    assert private["nonprivate_clean_accuracy"] == clear["clean_test_accuracy"]
    assert [r["release_dims"] for r in results["smallest_epsilon_at"]] == [0, 3]
    # Verification scores cosines of the frozen head's clean embeddings: clipping scales a vector, so every
    # point of one export has the same pairs' figures; open set depends on the point's templates.
    for p in results["points"]:
        assert p["verification_auc"] == (clear if p["release_dims"] == 0 else clear2)["verification_auc"]
        assert 0 <= p["verification_auc"] <= 1 and 0 <= p["tar_at_far_1e-3"] <= 1 and 0 <= p["open_set_rejection"] <= 1
    rows = list(csv.DictReader((tmp_path / "frontier.csv").open()))
    assert [float(r["verification_auc"]) for r in rows] == pytest.approx(
        [p["verification_auc"] for p in results["points"]], rel=1e-5
    )
    assert [r["release_dims"] for r in rows] == ["0", "0", "3", "3"]
    z = calibrate_noise_multiplier(mechanism="gaussian", total_epsilon=8.0, delta=cfg.delta, releases=1)
    assert private["noise_multiplier"] == pytest.approx(z) and private["releases_per_example"] == 1
    assert private["epsilon_total"] == pytest.approx(
        epsilon_spent(mechanism="gaussian", noise_multiplier=z, releases=1, delta=cfg.delta)
    )
    for p in (clear, private):
        assert p["tail_clean_test_accuracy"] is None and p["private_test_accuracy"] is None
        assert 0 <= p["clean_test_accuracy"] <= 1 and p["clean_classifier"] == "class templates on the device"
        assert 0 <= p["attack_ssim"] <= 1 and 0 <= p["attack_held_out_ssim"] <= 1 and 0 <= p["baseline_ssim"] <= 1
    assert (tmp_path / "frontier.png").is_file()
