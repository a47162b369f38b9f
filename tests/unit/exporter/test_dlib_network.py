"""dlib's face network rebuilt in torch from its .dat file: the twin against dlib's own descriptor on real
photographs, its cuts, the reader's refusals, and the export at a cut."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dpa.contract import dlib_resnet as layout
from dpa.contract.architecture import ArchConfig
from dpa.contract.choices import NetworkName
from dpa.contract.errors import UserError
from exporter.networks import dlib_resnet as net
from exporter.networks.dlib import default_dat
from exporter.networks.dlib_dat import read_dat
from exporter.networks.dlib_twin import MAX_ELEMENT_SHARE, MIN_COSINE, compare_with_dlib
from tests.conftest import LFW_IMAGES, needs_lfw


@pytest.fixture(scope="module")
def full() -> tuple[torch.nn.Module, torch.nn.Module]:
    """Head up to res5 and the rest: every tensor of the .dat is in one of the two."""
    parts = net.build_parts("res5", num_classes=4)
    net.load_dat(parts, default_dat(), seed=0)
    return parts


@needs_lfw
def test_twin_matches_dlib_on_real_photographs(full) -> None:
    report = compare_with_dlib(*full, default_dat(), LFW_IMAGES)
    assert report.source.startswith("public faces") and report.chips == 8
    assert report.max_element_share <= MAX_ELEMENT_SHARE
    assert report.min_cosine >= MIN_COSINE


def test_twin_matches_dlib_on_rendered_faces(full) -> None:
    report = compare_with_dlib(*full, default_dat(), None)
    assert report.passed, report


def test_a_deliberate_break_fails_the_twin(full, monkeypatch: pytest.MonkeyPatch) -> None:
    """dlib zero-pads the smaller branch at the END of each dimension; padding at the start instead (a
    plausible mistake) moves res11's and res14's sums and the check refuses it."""

    def pad_at_start(x: torch.Tensor, pad: tuple[int, int, int]) -> torch.Tensor:
        dc, dh, dw = pad
        return torch.nn.functional.pad(x, (dw, 0, dh, 0, dc, 0))

    monkeypatch.setattr(net, "_pad", pad_at_start)
    report = compare_with_dlib(*full, default_dat(), None)
    assert not report.passed


def test_every_cut_has_the_layout_shape_and_the_halves_compose() -> None:
    x = torch.randn(2, 3, 150, 150, generator=torch.Generator().manual_seed(0))
    whole_head, whole_tail = net.build_parts("embedding", num_classes=3)
    net.load_dat((whole_head, whole_tail), default_dat(), seed=0)
    with torch.no_grad():
        reference = whole_head(x)
    for stage in layout.stages():
        head, tail = net.build_parts(stage.name, num_classes=3)
        net.load_dat((head, tail), default_dat(), seed=0)
        tail.classifier = None  # compare the embedding, not a classifier
        with torch.no_grad():
            a = head(x)
            assert tuple(a.shape[1:]) == stage.out_shape, stage.name
            torch.testing.assert_close(tail(a), reference, rtol=1e-5, atol=1e-6)


def test_reader_finds_dlibs_layers_in_forward_order() -> None:
    layers = read_dat(default_dat())
    kinds = [x.kind for x in layers]
    assert kinds[:5] == ["input", "con", "affine", "relu", "max_pool"]
    assert kinds[-2:] == ["avg_pool", "fc"]
    assert kinds.count("con") == 29 and kinds.count("add_prev") == 14
    np.testing.assert_allclose(layers[0].arrays["mean"], (122.782, 117.001, 104.298), atol=1e-4)


def test_reader_refuses_a_file_that_is_not_dlibs(tmp_path: Path) -> None:
    bad = tmp_path / "x.dat"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(UserError, match="not a dlib network file"):
        read_dat(bad)
    with pytest.raises(UserError, match="cannot read"):
        read_dat(tmp_path / "missing.dat")


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    cut = tmp_path / "cut.dat"
    cut.write_bytes(default_dat().read_bytes()[:200_000])
    with pytest.raises(UserError, match="truncated|damaged|not dlib's face ResNet"):
        parts = net.build_parts("embedding", num_classes=2)
        net.load_dat(parts, cut, seed=0)


def test_export_at_an_early_cut_names_the_network_and_its_preprocessing(tmp_path: Path) -> None:
    from exporter.export import ExportConfig, export

    manifest, report = export(ExportConfig(network=NetworkName.DLIB_RESNET, arch=ArchConfig(num_classes=5),
                                           cut="res3", out=tmp_path / "art"))  # fmt: skip
    data = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert data["arch"] == "dlib-resnet" and data["alignment"] == "dlib-5pt-150"
    assert data["image_size"] == 150 and data["activation_shape"] == [32, 35, 35]
    assert data["pixel_std"] == [256.0] * 3 and data["dropout"] == 0.0
    assert report is not None and report.max_rel_error < 2e-2
    assert any("matches dlib's compute_face_descriptor" in note for note in report.notes)


def test_export_refuses_an_unknown_cut_before_writing(tmp_path: Path) -> None:
    from exporter.export import ExportConfig, export

    with pytest.raises(UserError, match="unknown cut 'fc7'; valid cuts: stem, res1"):
        export(ExportConfig(network=NetworkName.DLIB_RESNET, cut="fc7", out=tmp_path / "art"))
    assert not (tmp_path / "art").exists()
