"""`dpa sweep` on a tiny configuration: results, total epsilon and plots that read back."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
from PIL import Image

from dpa.cli.errors import parse_epsilons
from dpa.privacy.accountant import epsilon_spent
from dpa.privacy.mechanism import DPConfig
from dpa.runs.sweep import SweepConfig, run_sweep


def test_sweep_writes_results_and_plots(tmp_path):
    cfg = SweepConfig(
        workdir=tmp_path,
        epsilons=(1e3, math.inf),
        epochs=2,
        identities=4,
        per_identity=8,
        max_steps_per_epoch=3,
        attack_epochs=2,
        attack_aux_identities=4,
        attack_victim_identities=2,
        attack_images_per_identity=6,
    )
    results = run_sweep(cfg, say=lambda _msg: None)
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert len(rows) == 2 * 2 and {r["epsilon_per_release"] for r in rows} == {"1000", "inf"}
    data = json.loads((tmp_path / "sweep.json").read_text())
    noisy = data["runs"][0]
    # Total epsilon over the run is the PLD composition of `epochs` releases, more than one release.
    dp = DPConfig(clip=cfg.clip, epsilon=1e3, delta=cfg.delta)
    expected = epsilon_spent(mechanism=dp.mechanism, noise_multiplier=dp.noise_multiplier, releases=2, delta=cfg.delta)
    assert noisy["total_epsilon"] == expected and 1e3 < expected < 2e3
    assert data["runs"][1]["total_epsilon"] == "inf"
    assert all(0.0 <= r["inversion_ssim"] <= 1.0 for r in results["runs"])
    for name in ("accuracy.png", "loss.png", "privacy_utility.png", "inversion.png"):
        with Image.open(tmp_path / name) as img:
            pixels = np.asarray(img.convert("L"), dtype=np.float32)
        assert min(pixels.shape) >= 200, name
        assert pixels.std() > 5, f"{name} is blank"  # curves, bars and text, not a uniform canvas
    with Image.open(tmp_path / "accuracy.png") as img:
        assert img.size == (720, 480)  # 6 x 4 inches at 120 dpi


def test_parse_epsilons():
    assert parse_epsilons("0.5, 1,inf") == (0.5, 1.0, math.inf)
    for bad, message in (("0", "must be > 0"), ("x", "is not a number"), ("-1", "must be > 0")):
        try:
            parse_epsilons(bad)
        except ValueError as exc:
            assert message in str(exc)
        else:
            raise AssertionError(bad)
