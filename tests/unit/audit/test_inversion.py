"""Inversion audit: the decoder and the white-box MAP attack against DP-A releases at conv1_1."""

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
from dpa.audit.report import image_metrics, verdict

EPSILONS = (math.inf, 1e5, 1e3, 8.0)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """64x64, width 0.25, cut conv1_1, clip 10; 8 aux identities x 8 images, 3 victims x 8; the decoder
    (10 epochs) and the MAP attack (100 steps) on the same releases; each epsilon's releases recorded."""
    cfg = InversionConfig(
        epsilons=EPSILONS,
        clip=10.0,  # an untrained head has no public clip: the audit is told it
        aux_identities=8,
        victim_identities=3,
        images_per_identity=8,
        epochs=10,
        grid_columns=6,
        threads=None,  # torch's own setting (one thread a worker under pytest-xdist)
        cache_dir=tmp_path_factory.mktemp("faces"),
        record_view=tmp_path_factory.mktemp("views"),
    )
    return run_inversion(cfg)


@pytest.mark.long  # the module's audit takes half a minute
def test_map_attack_recovers_a_noiseless_release_and_falls_with_epsilon(report):
    print(f"\nbaseline (mean aux face): SSIM {report.baseline_ssim_mean:.3f} PSNR {report.baseline_psnr_mean:.2f} dB")
    for r in report.results:
        each = ", ".join(f"{k} {v['ssim_mean']:.3f}" for k, v in r.by_attack.items())
        print(
            f"epsilon {r.epsilon:g}: strongest {r.strongest_attack} SSIM {r.ssim_mean:.3f} PSNR {r.psnr_mean:.2f} dB "
            f"({each}), SNR/element {r.snr_per_element:.3g} -> {r.verdict}"
        )
    print(f"run time {report.seconds:.1f} s")
    inf, large, small, tiny = (report.result(e) for e in EPSILONS)
    # The white-box MAP attack inverts conv1_1 almost exactly without noise (He et al. report 0.99).
    assert inf.strongest_attack == "map" and inf.by_attack["map"]["ssim_mean"] >= 0.95
    assert inf.by_attack["map"]["ssim_mean"] > inf.by_attack["decoder"]["ssim_mean"] + 0.1
    assert inf.verdict.startswith("at the no-defence level")
    assert inf.recognisable_fraction == 1.0 and inf.beats_prior_fraction == 1.0
    # The report keeps the strongest attack: its figures are the maximum over attacks.
    for r in report.results:
        assert r.ssim_mean == max(v["ssim_mean"] for v in r.by_attack.values())
        assert r.by_attack[r.strongest_attack]["psnr_mean"] == r.psnr_mean
        assert r.by_attack["map"]["tv_weight"] in report.config.map_tv_weights
    # SSIM falls as the noise grows (SNR per element ~0.9 at 1e5, ~0.08 at 1e3), to the no-data baseline.
    assert inf.ssim_mean > large.ssim_mean + 0.2
    assert large.ssim_mean > small.ssim_mean + 0.1
    assert inf.psnr_mean > large.psnr_mean > small.psnr_mean
    assert tiny.ssim_mean == pytest.approx(report.baseline_ssim_mean, abs=0.05)
    assert not tiny.verdict.startswith("recognisable")
    assert inf.snr_per_element == math.inf and large.snr_per_element > small.snr_per_element > tiny.snr_per_element


@pytest.mark.long  # the module's audit takes half a minute
def test_an_audit_of_the_recorded_view_gives_the_live_figures(report):
    """The view holds exactly the releases the live audit attacked: the same attacks on it, read back
    from disk, score the same, to the last bit."""
    from dpa.audit.view_audit import audit_view
    from dpa.contract.server_view import load_view

    folder = report.config.record_view / "eps-100000"
    view = load_view(folder)
    assert sum(r["examples"] for r in view.releases) == report.victim_images
    assert len({r["head"] for r in view.releases}) == 1  # one head, stored once
    replayed = audit_view(folder, report.config)
    live = report.result(1e5)
    got, clean = replayed.results
    assert got.ssim_per_image == live.ssim_per_image and got.psnr_per_image == live.psnr_per_image
    assert got.by_attack == live.by_attack and got.strongest_attack == live.strongest_attack
    assert replayed.baseline_ssim_mean == report.baseline_ssim_mean
    # Beside it, the same attacks' power without noise on the same images (issue 27): at conv1_1 it rebuilds
    # them, so the noisy figure's distance from it is the noise's doing.
    print(f"\nview at epsilon 1e5: SSIM {got.ssim_mean:.3f}; without noise {clean.ssim_mean:.3f}")
    assert math.isinf(clean.epsilon) and clean.noise_std == 0
    assert clean.ssim_mean > max(got.ssim_mean, replayed.baseline_ssim_mean) + 0.2


def test_map_reconstruct_inverts_a_known_linear_head():
    """Against an independent reference: a 1x1 convolution with an invertible matrix and no clipping is
    solved exactly by least squares, so the MAP optimum without noise or prior is the image itself."""
    import torch

    from dpa.audit.config import MapSettings
    from dpa.audit.map_inversion import map_reconstruct

    rng = np.random.default_rng(0)
    conv = torch.nn.Conv2d(3, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(
            torch.from_numpy(rng.normal(size=(3, 3, 1, 1)).astype(np.float32) + 2 * np.eye(3)[..., None, None])
        )
    truth = rng.random((2, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        observed = conv(torch.from_numpy((truth * 255.0 - 128.0) / 64.0)).numpy()
    clip = 2 * float(np.linalg.norm(observed.reshape(2, -1), axis=1).max())  # clips nothing
    got = map_reconstruct(
        conv, observed, clip=clip, noise_std=0.0, pixel_mean=(128.0,) * 3, pixel_std=(64.0,) * 3, image_size=8,
        start_colour=(0.5, 0.5, 0.5), tv_weight=0.0, settings=MapSettings(steps=2000, lr=0.01),
    )  # fmt: skip
    np.testing.assert_allclose(got, truth.transpose(0, 2, 3, 1), atol=5e-3)


@pytest.mark.long  # the module's audit takes half a minute
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
    with pytest.raises(ValueError, match="attacks must be distinct names among decoder, map"):
        InversionConfig(attacks=("map", "guess"))
    with pytest.raises(ValueError, match="prior weights"):
        InversionConfig(map_tv_weights=(-1.0,))


def test_cli_writes_json_and_png(tmp_path):
    from conftest import export_small

    from dpa.cli.attack import attack_app

    artifacts = export_small(tmp_path / "artifacts")
    out = tmp_path / "out"
    args = ["inversion", "--artifacts", str(artifacts), "--epsilons", "inf,100", "--epochs", "1", "--clip", "10"]
    args += ["--aux-identities", "2", "--victim-identities", "2", "--per-identity", "3", "--threads", "1"]
    result = CliRunner().invoke(attack_app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "mean aux" in result.output and "verdict" in result.output and "map" in result.output
    data = json.loads((out / "inversion.json").read_text())
    assert [r["epsilon"] for r in data["results"]] == ["inf", 100.0]
    assert data["head_source"].endswith("head/checkpoint") and data["pixel_std"] == [64.0, 64.0, 64.0]
    with Image.open(out / "inversion.png") as img:
        assert img.size == grid_pixel_size(3, 6)
    bad = CliRunner().invoke(attack_app, ["inversion", "--epsilons", "0,inf"])
    assert bad.exit_code == 2 and "epsilon must be > 0" in bad.output
    # An export without a public clip, and no --clip: refused by the one clip policy, naming the export.
    unclipped = CliRunner().invoke(attack_app, ["inversion", "--artifacts", str(artifacts), "--out", str(out)])
    assert unclipped.exit_code == 2 and "carries no public release clip" in unclipped.output, unclipped.output
