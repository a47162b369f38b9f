"""`dpa recognize` and `dpa verify` on real image files, with the templates a device kept after enrolling
through the real server (issue 23): known answers, and a clear error for every bad input."""

from __future__ import annotations

import asyncio
import math
import warnings

import numpy as np
import pytest
from conftest import RunningServer
from typer.testing import CliRunner

from dpa.cli.app import app
from dpa.faces.lfw import index_faces
from dpa.faces.synth import SynthConfig
from dpa.privacy.mechanism import DPConfig
from dpa.runs.recognition import OPEN_SET_FAR, calibrate_gallery, recognition_data
from runtime_client.config import ClientConfig
from runtime_client.on_device import GALLERY_FILE, load_gallery
from runtime_client.trainer import run_training
from runtime_server.config import ServerConfig


@pytest.fixture(scope="module")
def enrolled(small_export, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A device that enrolled 4 identities (noiseless class sums) and calibrated its gallery on public faces."""
    root = tmp_path_factory.mktemp("enrolled")
    server = RunningServer(ServerConfig(artifacts=small_export, port=0, device="cpu", state_dir=root / "server"))
    try:
        cfg = ClientConfig(
            server=server.url, artifacts=small_export, dp=DPConfig(clip=50.0, epsilon=math.inf), frozen_head=True,
            release="class-sums", on_device_templates=True, synth=SynthConfig(identities=4, per_identity=8),
            progress=False, seed=0, state_dir=root / "client", label_epsilon=math.inf,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            asyncio.run(run_training(cfg))
    finally:
        server.stop()
    calibrate_gallery(small_export, root / "client", recognition_data(root / "recognition", 64, public_identities=8,
                                                                      strangers=3))  # fmt: skip
    faces = next((root / "client").glob("**/synthetic-4x8-*"))
    return small_export, root / "client", index_faces(faces, min_faces_per_person=2), root


def _run(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, list(args), terminal_width=200)


def _expected(art, state, paths):  # type: ignore[no-untyped-def]
    """The answer computed here, independently of runtime_client.recognize: the head's centred activation,
    clipped to the gallery's clip, times its scale; the cosine to each template; the best one."""
    from dpa.contract.devices import DeviceProfile, resolve_device
    from dpa.contract.manifest import load_manifest
    from dpa.faces.lfw import load_batch
    from runtime_client.head import HeadModel

    m = load_manifest(art)
    g = load_gallery(state / GALLERY_FILE)
    a = (
        HeadModel(art, m, resolve_device(DeviceProfile.CPU))
        .forward(load_batch(paths, size=m.image_size, mean=m.pixel_mean, std=m.pixel_std))
        .reshape(len(paths), -1)
        .astype(np.float64)
    )
    a = a * np.minimum(1.0, g.clip / np.linalg.norm(a, axis=1, keepdims=True)) * g.scale
    t = g.templates.reshape(len(g.templates), -1).astype(np.float64)
    cos = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (
        t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    ).T
    cos[:, g.counts <= 0] = -np.inf  # classes the export has and no identity filled
    return [g.names[k] for k in cos.argmax(axis=1)], cos.max(axis=1)


def test_recognize_gives_the_independently_computed_answer_and_unknown_below_the_threshold(enrolled):
    from runtime_client.recognize import UNKNOWN, recognize

    art, state, index, _ = enrolled
    gallery = load_gallery(state / GALLERY_FILE)
    assert math.isfinite(gallery.open_set_threshold) and math.isfinite(gallery.pair_threshold)
    paths = list(index.paths[::5])
    names, best = _expected(art, state, paths)
    got = recognize(art, state, paths)
    assert [r.best_match for r in got] == names
    np.testing.assert_allclose([r.score for r in got], best, atol=1e-5)
    t = gallery.open_set_threshold
    assert [r.identity for r in got] == [n if s > t else UNKNOWN for n, s in zip(names, best, strict=True)]
    result = _run("recognize", *map(str, paths[:3]), "--artifacts", str(art), "--state-dir", str(state),
                  "--threshold", "1.01")  # fmt: skip
    assert result.exit_code == 0 and result.output.count("unknown") == 3, result.output
    assert all(n in result.output for n in names[:3])  # the best match is still shown
    assert 0 < OPEN_SET_FAR < 1


def test_verify_says_same_for_one_image_twice_and_different_above_any_score(enrolled):
    art, state, index, _ = enrolled
    a, b = str(index.paths[0]), str(index.paths[-1])
    same = _run("verify", a, a, "--artifacts", str(art), "--state-dir", str(state))
    assert same.exit_code == 0 and "same person" in same.output and "cosine 1.000" in same.output
    other = _run("verify", a, b, "--artifacts", str(art), "--state-dir", str(state), "--threshold", "1.01")
    assert other.exit_code == 1 and "different people" in other.output
    # The score is the cosine of the two images' uncentred head outputs (what the public network was trained
    # to compare), computed here from the activation plus the export's centre, if it has one.
    from dpa.contract.devices import DeviceProfile, resolve_device
    from dpa.contract.manifest import load_manifest, load_release_centre
    from dpa.faces.lfw import load_batch
    from runtime_client.head import HeadModel
    from runtime_client.recognize import verify

    m = load_manifest(art)
    x = load_batch([a, b], size=m.image_size, mean=m.pixel_mean, std=m.pixel_std)
    centre = load_release_centre(art, m)
    raw = HeadModel(art, m, resolve_device(DeviceProfile.CPU)).forward(x).astype(np.float64)
    raw = (raw + (0 if centre is None else centre)).reshape(2, -1)  # (test_public_recipe: a centred one)
    want = raw[0] @ raw[1] / np.linalg.norm(raw[0]) / np.linalg.norm(raw[1])
    assert verify(art, state, a, b)[1] == pytest.approx(want, abs=1e-5)


def test_bad_input_gets_one_clear_line(enrolled, tmp_path):
    art, state, index, _ = enrolled
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    cases = [
        (["recognize", str(tmp_path / "missing.jpg")], "no such image"),
        (["recognize", str(junk)], "cannot read image"),
        (["verify", str(index.paths[0]), str(junk)], "cannot read image"),
    ]
    for args, message in cases:
        result = _run(*args, "--artifacts", str(art), "--state-dir", str(state))
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    fresh = _run("recognize", str(index.paths[0]), "--artifacts", str(art), "--state-dir", str(tmp_path / "none"))
    assert fresh.exit_code == 2 and "enrol first" in fresh.output
    assert np.isfinite(load_gallery(state / GALLERY_FILE).pair_threshold)  # nothing of that changed the gallery


def test_a_runs_public_embeddings_are_made_once_and_give_the_same_thresholds(enrolled):  # type: ignore[no-untyped-def]
    """RecognitionData keeps the public faces' embeddings per export head, clip and scale: a second gallery
    calibrated with it embeds nothing again, and its thresholds are those a fresh object gives."""
    art, state, _, root = enrolled
    before = load_gallery(state / GALLERY_FILE)
    data = recognition_data(root / "recognition", 64, public_identities=8, strangers=3)
    calibrate_gallery(art, state, data)
    first = load_gallery(state / GALLERY_FILE)
    assert len(data.embedded) == 2  # the open-set faces and the pairs
    kept = {k: v.copy() for k, v in data.embedded.items()}
    calibrate_gallery(art, state, data)
    again = load_gallery(state / GALLERY_FILE)
    assert (again.open_set_threshold, again.pair_threshold) == (first.open_set_threshold, first.pair_threshold)
    assert (first.open_set_threshold, first.pair_threshold) == (before.open_set_threshold, before.pair_threshold)
    assert data.embedded.keys() == kept.keys() and all(np.array_equal(data.embedded[k], kept[k]) for k in kept)
    # what it keeps is what it uses: other public faces under the same key give another threshold
    key = next(k for k in data.embedded if k[0] == "public")
    data.embedded[key] = data.embedded[key][: len(data.embedded[key]) // 2] * -1.0
    calibrate_gallery(art, state, data)
    assert load_gallery(state / GALLERY_FILE).open_set_threshold != first.open_set_threshold
    calibrate_gallery(art, state, recognition_data(root / "recognition", 64, public_identities=8, strangers=3))
