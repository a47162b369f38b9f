"""Inversion audit: an inverse network on auxiliary faces against DP-A releases at conv1_1."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dpa.audit.config import InversionConfig
from dpa.audit.figures import grid_pixel_size, write_grid
from dpa.audit.inversion import run_inversion
from dpa.audit.report import HE2021_RECOGNISABLE_SSIM, image_metrics, verdict

EPSILONS = (math.inf, 1e5, 1e3, 8.0)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """64x64, width 0.25, cut conv1_1, clip 10; 8 aux identities x 8 images, 3 victims x 8, 10 epochs (~20 s)."""
    cfg = InversionConfig(
        epsilons=EPSILONS,
        aux_identities=8,
        victim_identities=3,
        images_per_identity=8,
        epochs=10,
        grid_columns=6,
        threads=1,
        cache_dir=tmp_path_factory.mktemp("faces"),
    )
    return run_inversion(cfg)


def test_ssim_falls_with_epsilon_and_inf_is_recognisable(report):
    print(f"\nbaseline (mean aux face): SSIM {report.baseline_ssim_mean:.3f} PSNR {report.baseline_psnr_mean:.2f} dB")
    for r in report.results:
        print(
            f"epsilon {r.epsilon:g}: SSIM {r.ssim_mean:.3f} (median {r.ssim_median:.3f}) PSNR {r.psnr_mean:.2f} dB, "
            f"SNR/element {r.snr_per_element:.3g}, recognisable {r.recognisable_fraction:.0%}, "
            f"beats prior {r.beats_prior_fraction:.0%} -> {r.verdict}"
        )
    print(f"run time {report.seconds:.1f} s")
    inf, large, small, tiny = (report.result(e) for e in EPSILONS)
    # conv1_1 is nearly invertible: without noise the faces come back, well above 0.3 and the prior.
    assert inf.ssim_mean > HE2021_RECOGNISABLE_SSIM + 0.25
    assert inf.ssim_mean > report.baseline_ssim_mean + 0.2
    assert inf.recognisable_fraction == 1.0 and inf.beats_prior_fraction == 1.0
    assert inf.verdict.startswith("recognisable")
    # SSIM falls as the noise grows (SNR per element ~0.9 at 1e5, ~0.08 at 1e3).
    assert inf.ssim_mean > large.ssim_mean + 0.05
    assert large.ssim_mean > small.ssim_mean + 0.1
    # PSNR, which the decoder's MSE loss optimises, falls monotonically all the way down ...
    assert inf.psnr_mean > large.psnr_mean > small.psnr_mean > tiny.psnr_mean
    # ... to the prior-only baseline: at epsilon 8 (SNR/element 0.003) the decoder outputs the mean face,
    # whose SSIM is ~0.3 on these faces, which is why the verdict compares against the baseline too.
    assert tiny.psnr_mean == pytest.approx(report.baseline_psnr_mean, abs=0.5)
    assert tiny.ssim_mean == pytest.approx(report.baseline_ssim_mean, abs=0.05)
    assert not tiny.verdict.startswith("recognisable")
    assert inf.snr_per_element == math.inf and large.snr_per_element > small.snr_per_element > tiny.snr_per_element


def test_report_json_and_grid(report, tmp_path):
    data = json.loads(json.dumps(report.to_json()))  # strict JSON: inf written as a string
    assert data["results"][0]["epsilon"] == "inf"
    assert data["cut"] == "conv1_1" and data["activation_shape"] == [16, 64, 64]
    assert data["victim_images"] == 24 and data["aux_images"] == 64
    assert set(data["victim_identities"]).isdisjoint(data["aux_identities"])
    path = write_grid(report, tmp_path / "grid.png")
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == grid_pixel_size(1 + len(EPSILONS), 6) == (150 + 6 * 96, 40 + 5 * 96)


def test_image_metrics_agree_with_skimage():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a = np.full((32, 32, 3), 0.5)
    b = a + 0.1  # MSE 0.01 -> PSNR 20 dB exactly
    psnr, ssim = image_metrics(a, b)
    assert psnr == pytest.approx(20.0, abs=1e-9)
    rng = np.random.default_rng(0)
    x = rng.random((32, 32, 3))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    psnr, ssim = image_metrics(x, y)
    assert psnr == pytest.approx(peak_signal_noise_ratio(x, y, data_range=1.0))
    assert ssim == pytest.approx(structural_similarity(x, y, channel_axis=2, data_range=1.0))
    assert image_metrics(x, x) == (math.inf, pytest.approx(1.0))
    with pytest.raises(ValueError):
        image_metrics(x, x[:, :, :1])


def test_verdict_thresholds():
    assert verdict(38.0, 0.5, 0.3).startswith("at the no-defence level")
    assert verdict(20.0, 0.6, 0.3).startswith("recognisable")
    assert verdict(13.0, 0.32, 0.31).startswith("SSIM > 0.3 but no better")
    assert verdict(13.0, 0.2, 0.3) == "not recognisable"


def test_config_is_validated():
    with pytest.raises(ValueError, match="epsilon"):
        InversionConfig(epsilons=(0.0,))
    with pytest.raises(ValueError, match="clip"):
        InversionConfig(clip=-1.0)
    with pytest.raises(ValueError, match="epsilon"):
        InversionConfig(epsilons=())


def test_cli_writes_json_and_png(tmp_path):
    from conftest import export_small

    from dpa.cli.attack import attack_app

    artifacts = export_small(tmp_path / "artifacts")
    out = tmp_path / "out"
    args = ["inversion", "--artifacts", str(artifacts), "--epsilons", "inf,100", "--epochs", "1"]
    args += ["--aux-identities", "2", "--victim-identities", "2", "--per-identity", "3", "--threads", "1"]
    result = CliRunner().invoke(attack_app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "mean aux face" in result.output and "verdict" in result.output
    data = json.loads((out / "inversion.json").read_text())
    assert [r["epsilon"] for r in data["results"]] == ["inf", 100.0]
    assert data["head_source"].endswith("head/checkpoint") and data["pixel_std"] == [64.0, 64.0, 64.0]
    with Image.open(out / "inversion.png") as img:
        assert img.size == grid_pixel_size(3, 6)
    bad = CliRunner().invoke(attack_app, ["inversion", "--epsilons", "0,inf"])
    assert bad.exit_code == 2 and "epsilon must be > 0" in bad.output
