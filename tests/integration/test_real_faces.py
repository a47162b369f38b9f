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


def _subset_folder(out: Path) -> Path:
    """Links to a few LFW people's photos (never copies): 4 with >= 20 photos (20 each), 24 with 2-9, 6 with one."""
    counts = {p.name: len(list(p.glob("*.jpg"))) for p in LFW_IMAGES.iterdir() if p.is_dir()}
    big = sorted(n for n, c in counts.items() if c >= 20)[:4]
    small = sorted(n for n, c in counts.items() if 2 <= c < 10)[:24]
    single = sorted(n for n, c in counts.items() if c == 1)[:6]
    for name in big + small + single:
        (out / name).mkdir(parents=True)
        for photo in sorted((LFW_IMAGES / name).glob("*.jpg"))[:20]:
            (out / name / photo.name).symlink_to(photo)
    return out


@pytest.mark.long
def test_demo_on_real_faces_keeps_the_device_and_the_public_people_apart(tmp_path: Path) -> None:
    """The real-face demo end to end on a small LFW subset: alignment, dlib's export, a real server, the
    device's class sums; every public set disjoint from the device's people; the figures' bookkeeping."""
    from dpa.runs.real_faces import RealFacesConfig, run_real_faces

    faces = _subset_folder(tmp_path / "lfw")
    cfg = RealFacesConfig(faces=faces, workdir=tmp_path / "work", public_centre_identities=8,
                          public_val_identities=10, strangers=6, epsilons=(8.0,), release_dims=8,
                          runs=("main", "per-example"), few_min_images=10, attack=False)  # fmt: skip
    out = run_real_faces(cfg, say=lambda _m: None)
    sets = {p.name: {q.name for q in p.iterdir()} for p in (tmp_path / "work" / "sets").iterdir()}
    assert len(sets["device"]) == 4
    for public in ("public-centre", "public-val", "strangers"):
        assert not sets[public] & sets["device"] and not sets[public] & sets["few"]
    assert not sets["public-val"] & sets["strangers"] and not sets["public-centre"] & sets["public-val"]
    singles = {p.name for p in faces.iterdir() if len(list(p.iterdir())) == 1}
    assert len(singles) == 6 and not singles & sets["public-centre"]  # one photo: open set's faces only
    assert len(singles & sets["public-val"]) == 3 and len(singles & sets["strangers"]) == 3
    main = out["main"]
    assert main["identities"] == 4 and main["enrolled"] == 60 and main["probes"] == 20
    local, private = main["runs"]
    assert local["epsilon_total"] is None and local["identification_accuracy"] >= 0.9
    assert private["epsilon_total"] <= 8.0 and private["delta"] == 1e-5 and private["adjacency"] == "add-remove"
    assert private["epsilon_replace_one"] > private["epsilon_total"]  # the same noise read under replace-one
    assert private["share_of_nonprivate"] == pytest.approx(private["identification_accuracy"]
                                                           / main["best_nonprivate"])  # fmt: skip
    assert 0 <= private["open_set_rejection"] <= 1 and 0 <= private["open_set_identification_rate"] <= 1
    # DP-A per example at the early cut: the export and the server's view are that cut's
    import json as _json

    per = out["per_example"]
    assert per["cut"] == "res3" and per["epsilon_total"] <= 8.0 and per["releases_per_example"] == 1
    manifest = _json.loads((tmp_path / "work" / "artifacts-res3" / "manifest.json").read_text())
    assert manifest["cut"] == "res3" and manifest["activation_shape"] == [32, 35, 35]
    assert _json.loads((Path(per["view"]) / "view.json").read_text())["cut"] == "res3"
    assert "flip_average" not in manifest  # a feature map: no mirror average there
    # the embedding exports average each photo with its mirror image, and the class-sum view says so
    for folder in ("artifacts", "artifacts-main"):
        assert _json.loads((tmp_path / "work" / folder / "manifest.json").read_text())["flip_average"] is True
    assert main["flip_average"] is True
    view = tmp_path / "work" / "main-private-eps8" / "view" / "header.json"
    assert _json.loads(view.read_text())["flip_average"] is True
    # dpa recognize / dpa verify on raw photographs: the device aligns them as the manifest says
    from PIL import Image

    from dpa.contract.errors import UserError
    from runtime_client.recognize import recognize, verify

    art, state = tmp_path / "work" / "artifacts-main", tmp_path / "work" / "main-private-eps8" / "client"
    person = sorted(sets["device"])[0]
    photos = sorted((faces / person).iterdir())
    found = recognize(art, state, photos[-2:])
    assert [r.identity for r in found] == [person, person]
    same, _score, _t = verify(art, state, photos[0], photos[1])
    other = sorted((faces / sorted(sets["device"])[1]).iterdir())[0]
    different, _score, _t = verify(art, state, photos[0], other)
    assert same and not different
    blank = tmp_path / "blank.jpg"
    Image.new("RGB", (250, 250), (90, 90, 90)).save(blank)
    with pytest.raises(UserError, match=f"no face found in {blank}"):
        recognize(art, state, [photos[0], blank])


def test_the_device_aligns_its_own_photos_as_the_manifest_says(tmp_path: Path) -> None:
    """A dlib-resnet export names its alignment: the device indexes chips it made from its raw photos (kept
    in its state folder), leaves out a photo without a face, and reads a folder of chips as it is."""
    from PIL import Image

    from dpa.contract.architecture import ArchConfig
    from dpa.contract.choices import NetworkName
    from dpa.contract.manifest import load_manifest
    from exporter.export import ExportConfig, export
    from runtime_client.config import ClientConfig
    from runtime_client.dataset import prepare_data

    art = tmp_path / "art"
    export(ExportConfig(network=NetworkName.DLIB_RESNET, arch=ArchConfig(num_classes=2), cut="embedding", out=art,
                        verify=False))  # fmt: skip
    photos = tmp_path / "photos"
    for name in ("Aaron_Peirsol", "Abdullah_Gul"):
        (photos / name).mkdir(parents=True)
        for photo in sorted((LFW_IMAGES / name).glob("*.jpg"))[:4]:
            (photos / name / photo.name).symlink_to(photo)
    Image.new("RGB", (250, 250), (90, 90, 90)).save(photos / "Abdullah_Gul" / "Abdullah_Gul_9999.jpg")
    cfg = ClientConfig(artifacts=art, data=str(photos), state_dir=tmp_path / "state", min_faces_per_person=2)
    train, test = prepare_data(cfg, load_manifest(art))
    paths = [*train.paths, *test.paths]
    assert len(paths) == 8 and all(p.suffix == ".png" and Image.open(p).size == (150, 150) for p in paths)
    assert all((tmp_path / "state" / "chips" / "dlib-5pt-150") in p.parents for p in paths)
    assert not any("9999" in p.name for p in paths)  # no face: left out, nothing released for it
    chips_cfg = ClientConfig(artifacts=art, data=str(tmp_path / "state" / "chips" / "dlib-5pt-150"),
                             state_dir=tmp_path / "state2", min_faces_per_person=2)  # fmt: skip
    again = prepare_data(chips_cfg, load_manifest(art))
    assert [p.name for p in again[0].paths] == [p.name for p in train.paths]  # chips are read as they are
    assert not (tmp_path / "state2" / "chips").exists()


def test_dpa_faces_align_writes_chips_and_names_the_photo_without_a_face(tmp_path: Path) -> None:
    from PIL import Image

    from dpa.cli.app import app

    src = tmp_path / "photos"
    (src / "Aaron_Peirsol").mkdir(parents=True)
    for photo in sorted((LFW_IMAGES / "Aaron_Peirsol").glob("*.jpg"))[:2]:
        (src / "Aaron_Peirsol" / photo.name).symlink_to(photo)
    Image.new("RGB", (250, 250), (90, 90, 90)).save(src / "Aaron_Peirsol" / "blank.jpg")
    result = CliRunner().invoke(app, ["faces", "align", str(src), str(tmp_path / "chips"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "no face found in" in result.output and "blank.jpg" in result.output and "2 chips in" in result.output
    assert sorted(p.name for p in (tmp_path / "chips" / "Aaron_Peirsol").iterdir()) == [
        "Aaron_Peirsol_0001.png", "Aaron_Peirsol_0002.png"]  # fmt: skip
    again = CliRunner().invoke(app, ["faces", "align", str(src), str(tmp_path / "chips")])
    assert again.exit_code == 2 and "exists: align into a new folder" in again.output


def test_export_lists_dlibs_cuts_at_80_columns() -> None:
    from dpa.cli.app import app

    result = CliRunner().invoke(app, ["export", "--network", "dlib-resnet", "--list-cuts"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert all(cut in result.output for cut in ("stem", "res11", "256x4x4", "embedding"))
    assert max(len(line) for line in result.output.splitlines()) <= 80
