"""Alignment on real photographs: a face found, a chip of dlib's geometry, no chip where there is no face,
and a folder aligned whole or not at all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpa.contract.errors import UserError
from dpa.faces.align import Aligner, align_folder, align_images, chip_path, model_file
from tests.conftest import LFW_IMAGES, needs_lfw

PEOPLE = ("Aaron_Peirsol", "Abdullah_Gul", "Ai_Sugiyama", "Alejandro_Toledo", "Ali_Naimi", "Amelie_Mauresmo")


def _photos() -> list[Path]:
    return [LFW_IMAGES / name / f"{name}_0001.jpg" for name in PEOPLE]


def _eyes_and_nose(chips: list[np.ndarray]) -> np.ndarray:
    """(N, 5, 2): dlib's 5 landmarks found again inside each chip, on the whole chip as the face box."""
    import dlib

    sp = dlib.shape_predictor(str(model_file("shape_predictor_5_face_landmarks.dat")))
    out = []
    for chip in chips:
        shape = sp(np.ascontiguousarray(chip), dlib.rectangle(20, 20, 130, 130))
        out.append([(shape.part(i).x, shape.part(i).y) for i in range(5)])
    return np.array(out, dtype=np.float64)


@needs_lfw
def test_alignment_undoes_a_rotated_and_shifted_photo() -> None:
    """The similarity transform maps every face onto dlib's canonical one: a photo turned by 15 degrees and
    shifted gives a chip whose landmarks sit where the upright photo's chip has them (1.5 px on average), while a
    centre crop of the turned photo (what an unaligned export sees) moves them far more."""
    aligner = Aligner()
    upright, turned, crops = [], [], []
    for p in _photos()[:4]:
        with Image.open(p) as im:
            rgb = im.convert("RGB")
        moved = rgb.rotate(15, resample=Image.Resampling.BILINEAR, translate=(12, -8), fillcolor=(0, 0, 0))
        a, b = aligner.chip(np.asarray(rgb))[0], aligner.chip(np.asarray(moved))[0]
        assert a is not None and b is not None and a.shape == b.shape == (150, 150, 3) and a.dtype == np.uint8
        upright.append(a)
        turned.append(b)
        crops.append(np.asarray(moved.crop((50, 50, 200, 200))))
    reference = _eyes_and_nose(upright)
    aligned_error = np.abs(_eyes_and_nose(turned) - reference).mean()
    cropped_error = np.abs(_eyes_and_nose(crops) - reference).mean()
    assert aligned_error <= 1.5, aligned_error
    assert cropped_error > 4 * max(aligned_error, 1.0), cropped_error


def test_an_image_with_no_face_gets_no_chip_and_is_named(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    (src / "Nobody").mkdir(parents=True)
    Image.new("RGB", (250, 250), (128, 128, 128)).save(src / "Nobody" / "Nobody_0001.jpg")
    report = align_folder(src, tmp_path / "chips", workers=1)
    assert report.aligned == 0 and report.no_face == (src / "Nobody" / "Nobody_0001.jpg",)
    assert not list((tmp_path / "chips").rglob("*.png"))


@needs_lfw
def test_a_folder_is_aligned_into_the_same_layout_and_a_second_call_reuses_the_chips(tmp_path: Path) -> None:
    photos = _photos()[:2]
    report = align_images(photos, LFW_IMAGES, tmp_path / "chips", workers=2)
    assert report.aligned == 2 and report.reused == 0 and not report.no_face
    for p in photos:
        chip = chip_path(LFW_IMAGES, tmp_path / "chips", p)
        assert chip.parent.name == p.parent.name and chip.suffix == ".png"
        assert Image.open(chip).size == (150, 150)
    again = align_images(photos, LFW_IMAGES, tmp_path / "chips", workers=1)
    assert again.reused == 2 and again.aligned == 2


def test_align_folder_refuses_bad_input_and_changes_nothing(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is not a folder"):
        align_folder(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images in"):
        align_folder(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="exists: align into a new folder"):
        align_folder(tmp_path / "empty", tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())
