"""Real photographs end to end: LFW's protocol through the device's pipeline on a small View 2 subset,
against dlib's own descriptors of the same chips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dpa.faces.align import chip_path, model_file
from dpa.faces.lfw_protocol import image_path, read_pairs, ten_fold_accuracy
from tests.conftest import LFW, LFW_IMAGES, needs_lfw

pytestmark = needs_lfw


def _subset(out: Path, per_half: int = 5) -> Path:
    """The first ``per_half`` matched and mismatched pairs of View 2's first two folds."""
    lines = (LFW / "pairs.txt").read_text().splitlines()[1:]
    keep = []
    for fold in range(2):
        block = lines[fold * 600 : (fold + 1) * 600]
        keep += block[:per_half] + block[300 : 300 + per_half]
    out.write_text(f"2\t{per_half}\n" + "\n".join(keep) + "\n")
    return out


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    from dpa.cli.app import app

    tmp = tmp_path_factory.mktemp("lfw")
    pairs = _subset(tmp / "pairs.txt")
    result = CliRunner().invoke(app, ["evaluate", "lfw", str(LFW), "--pairs", str(pairs), "--workdir",
                                      str(tmp / "work"), "--no-flip", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), pairs, tmp / "work"


def test_the_device_pipeline_scores_what_dlib_scores(evaluated) -> None:
    """The product's figure equals LFW's protocol on dlib's own descriptors of the same chips."""
    import dlib

    report, pairs_file, work = evaluated
    pairs = read_pairs(pairs_file)
    model = dlib.face_recognition_model_v1(str(model_file("dlib_face_recognition_resnet_model_v1.dat")))
    chips = work / "chips" / "dlib-5pt-150"
    from PIL import Image

    def descriptor(key: tuple[str, int]) -> np.ndarray:
        chip = np.asarray(Image.open(chip_path(LFW_IMAGES, chips, image_path(LFW_IMAGES, key))))
        d = np.array(model.compute_face_descriptor(np.ascontiguousarray(chip)))
        return d / np.linalg.norm(d)

    # the device's head in onnxruntime, on the chips the product wrote, gives dlib's descriptor
    from dpa.contract.devices import DeviceProfile, resolve_device
    from dpa.contract.manifest import load_manifest
    from runtime_client.head import HeadModel
    from runtime_client.on_device import pair_embeddings

    art = Path(report["artifacts"])
    manifest = load_manifest(art)
    keys = pairs.images()
    files = [chip_path(LFW_IMAGES, chips, image_path(LFW_IMAGES, k)) for k in keys]
    ours = pair_embeddings(HeadModel(art, manifest, resolve_device(DeviceProfile.CPU), frozen=True), manifest, files)
    theirs = np.stack([descriptor(k) for k in keys])
    assert np.min(np.sum(ours * theirs, axis=1)) >= 0.99999
    scores = np.array([descriptor(a) @ descriptor(b) for a, b in zip(pairs.first, pairs.second, strict=True)])
    reference = ten_fold_accuracy(scores, pairs)
    assert report["fold_accuracies"] == reference["fold_accuracies"]
    assert report["view2_accuracy"] == pytest.approx(reference["accuracy"])
    assert report["network"] == "dlib-resnet" and report["alignment"] == "dlib-5pt-150" and not report["flip"]
    assert report["alignment_report"]["aligned"] == len(pairs.images())
    assert Path(report["roc_png"]).is_file()


def test_a_second_evaluation_reuses_the_chips_and_the_export(evaluated) -> None:
    from dpa.runs.lfw_eval import LfwEvalConfig, evaluate_lfw

    report, pairs_file, work = evaluated
    again = evaluate_lfw(LfwEvalConfig(faces=LFW, pairs=pairs_file, workdir=work, flip=False), say=lambda _m: None)
    assert again["alignment_report"]["reused"] == again["alignment_report"]["aligned"]
    assert again["fold_accuracies"] == report["fold_accuracies"]


def test_a_pairs_file_naming_a_missing_image_is_refused(tmp_path: Path) -> None:
    from dpa.cli.app import app

    bad = tmp_path / "pairs.txt"
    bad.write_text("2\t1\nNobody_Here\t1\t2\nA\t1\tB\t1\nC\t1\t2\nD\t1\tE\t1\n")
    result = CliRunner().invoke(app, ["evaluate", "lfw", str(LFW), "--pairs", str(bad), "--workdir",
                                      str(tmp_path / "w")])  # fmt: skip
    assert result.exit_code == 2
    assert "8 images the pairs name are not under" in result.output and "A/A_0001.jpg" in result.output
    assert not (tmp_path / "w").exists()
