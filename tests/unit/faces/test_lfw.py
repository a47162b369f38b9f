"""LFW-style folder loader: indexing, splitting, batch loading and shuffling."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpa.faces.lfw import FaceIndex, index_faces, iter_batches, load_batch, split_faces
from dpa.faces.synth import SynthConfig, identity_names, render_face, write_synthetic_faces

MEAN = (129.186279296875, 104.76238250732422, 93.59396362304688)
STD = (58.3, 57.1, 61.9)


def _image(path: Path, colour: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


@pytest.fixture
def hand_made(tmp_path: Path) -> Path:
    root = tmp_path / "lfw"
    _image(root / "Bob_Beta" / "Bob_Beta_0001.jpg")  # below a threshold of 2
    _image(root / "Ann_Alpha" / "Ann_Alpha_0002.png")
    _image(root / "Ann_Alpha" / "Ann_Alpha_0001.JPG")
    _image(root / "Ann_Alpha" / "Ann_Alpha_0003.jpeg")
    (root / "Ann_Alpha" / "notes.txt").write_text("not an image")
    _image(root / "Ann_Alpha" / ".hidden.jpg")
    _image(root / "Cy_Gamma" / "b.png")
    _image(root / "Cy_Gamma" / "a.jpg")
    _image(root / ".cache" / "x.jpg")
    _image(root / ".cache" / "y.jpg")
    (root / "README").write_text("stray file at the root")
    return root


def test_index_hand_made_folder(hand_made: Path) -> None:
    index = index_faces(hand_made)
    assert index.root == hand_made
    assert index.names == ("Ann_Alpha", "Cy_Gamma")
    assert [str(p.relative_to(hand_made)) for p in index.paths] == [
        "Ann_Alpha/Ann_Alpha_0001.JPG",
        "Ann_Alpha/Ann_Alpha_0002.png",
        "Ann_Alpha/Ann_Alpha_0003.jpeg",
        "Cy_Gamma/a.jpg",
        "Cy_Gamma/b.png",
    ]
    assert index.labels.dtype == np.int64
    assert index.labels.tolist() == [0, 0, 0, 1, 1]
    assert len(index) == 5 and index.num_identities == 2

    everyone = index_faces(hand_made, min_faces_per_person=1)
    assert everyone.names == ("Ann_Alpha", "Bob_Beta", "Cy_Gamma")
    assert everyone.labels.tolist() == [0, 0, 0, 1, 2, 2]
    assert index_faces(hand_made, min_faces_per_person=3).names == ("Ann_Alpha",)


def test_index_synthetic_folder(tmp_path: Path) -> None:
    cfg = SynthConfig(identities=4, per_identity=3, size=32, seed=2)
    index = index_faces(write_synthetic_faces(tmp_path / "faces", cfg))
    assert index.names == tuple(sorted(identity_names(cfg)))
    assert np.bincount(index.labels).tolist() == [3, 3, 3, 3]
    for path, label in zip(index.paths, index.labels, strict=True):
        assert path.parent.name == index.names[label]


def test_index_errors(tmp_path: Path, hand_made: Path) -> None:
    with pytest.raises(ValueError, match=r"face folder .*nowhere does not exist"):
        index_faces(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"face folder .*README is not a folder"):
        index_faces(hand_made / "README")
    with pytest.raises(
        ValueError, match=r"no identity in .* has at least 4 images: found 6 images in 3 identity folders"
    ):
        index_faces(hand_made, min_faces_per_person=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"found 0 images in 0 identity folders"):
        index_faces(tmp_path / "empty")
    with pytest.raises(ValueError, match="min_faces_per_person must be >= 1, got 0"):
        index_faces(hand_made, min_faces_per_person=0)


def test_face_index_validates_and_freezes(hand_made: Path) -> None:
    index = index_faces(hand_made)
    with pytest.raises(ValueError, match="5 paths but 4 labels"):
        FaceIndex(root=hand_made, paths=index.paths, labels=index.labels[:4], names=index.names)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        FaceIndex(root=hand_made, paths=index.paths, labels=index.labels + 1, names=index.names)
    with pytest.raises(ValueError):
        index.labels[0] = 1  # read-only


def _make_tree(root: Path, people: dict[str, int], *, reverse: bool = False) -> Path:
    """The same files, created forwards or backwards (file systems may list them so)."""
    names = sorted(people, reverse=reverse)
    for name in names:
        files = sorted((f"{name}_{k:04d}.png" for k in range(1, people[name] + 1)), reverse=reverse)
        for f in files:
            _image(root / name / f, colour=(len(f), 0, 0), size=(2, 2))
    return root


def _rel(index: FaceIndex) -> list[str]:
    return [str(p.relative_to(index.root)) for p in index.paths]


def test_split_is_deterministic_and_order_independent(tmp_path: Path) -> None:
    people = {"Al_One": 9, "Bo_Two": 4, "Cy_Three": 2, "Di_Four": 1, "Ed_Five": 13}
    a = index_faces(_make_tree(tmp_path / "a", people), min_faces_per_person=1)
    b = index_faces(_make_tree(tmp_path / "b", people, reverse=True), min_faces_per_person=1)
    train_a, test_a = split_faces(a, test_fraction=0.25, seed=3)
    train_b, test_b = split_faces(b, test_fraction=0.25, seed=3)
    assert (_rel(train_a), _rel(test_a)) == (_rel(train_b), _rel(test_b))
    # a shuffled index splits the same way: the split sorts before it permutes
    shuffled = a.subset(np.random.default_rng(0).permutation(len(a)))
    train_s, test_s = split_faces(shuffled, test_fraction=0.25, seed=3)
    assert (_rel(train_s), _rel(test_s)) == (_rel(train_a), _rel(test_a))
    assert np.array_equal(train_s.labels, train_a.labels)

    assert train_a.names == test_a.names == a.names
    counts = np.bincount(a.labels, minlength=a.num_identities)
    test_counts = np.bincount(test_a.labels, minlength=a.num_identities)
    train_counts = np.bincount(train_a.labels, minlength=a.num_identities)
    assert test_counts.tolist() == [min(round(n * 0.25), n - 1) for n in counts]
    assert np.all(train_counts >= 1)
    assert sorted(_rel(train_a) + _rel(test_a)) == sorted(_rel(a))

    other_train, _ = split_faces(a, test_fraction=0.25, seed=4)
    assert _rel(other_train) != _rel(train_a)


def test_split_of_one_identity_ignores_the_others(tmp_path: Path) -> None:
    small = index_faces(_make_tree(tmp_path / "s", {"Al_One": 12}))
    big = index_faces(_make_tree(tmp_path / "b", {"Al_One": 12, "Zed_Z": 5}))
    _, t_small = split_faces(small, seed=9)
    _, t_big = split_faces(big, seed=9)
    assert _rel(t_small) == [r for r in _rel(t_big) if r.startswith("Al_One/")]


def test_split_edges_and_validation(hand_made: Path) -> None:
    index = index_faces(hand_made)
    train, test = split_faces(index, test_fraction=0.0)
    assert len(test) == 0 and _rel(train) == _rel(index)
    train, test = split_faces(index, test_fraction=0.99)
    assert np.bincount(train.labels).tolist() == [1, 1]  # capped at n - 1
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="test_fraction must satisfy 0 <= test_fraction < 1"):
            split_faces(index, test_fraction=bad)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        split_faces(index, seed=-1)


@pytest.mark.parametrize("shape", [(5, 7), (12, 4), (3, 3)])
def test_load_batch_constant_colour_matches_hand_computed(tmp_path: Path, shape: tuple[int, int]) -> None:
    colour = (200, 17, 93)
    p = _image(tmp_path / "c.png", colour, shape)
    batch = load_batch([p, p], size=6, mean=MEAN, std=STD)
    assert batch.shape == (2, 3, 6, 6) and batch.dtype == np.float32 and batch.flags.c_contiguous
    for c in range(3):
        expected32 = (np.float32(colour[c]) - np.float32(MEAN[c])) / np.float32(STD[c])
        assert np.all(batch[:, c] == expected32)
        np.testing.assert_allclose(batch[:, c], (colour[c] - MEAN[c]) / STD[c], rtol=1e-6)


def test_load_batch_centre_crops_and_converts_modes(tmp_path: Path) -> None:
    # three vertical bands: the centre square of a 30x10 image is the middle one
    bands = np.zeros((10, 30, 3), np.uint8)
    bands[:, :10] = (255, 0, 0)
    bands[:, 10:20] = (0, 255, 0)
    bands[:, 20:] = (0, 0, 255)
    wide = tmp_path / "wide.png"
    Image.fromarray(bands).save(wide)
    tall = tmp_path / "tall.png"
    Image.fromarray(bands.transpose(1, 0, 2).copy()).save(tall)
    grey = tmp_path / "grey.png"
    Image.new("L", (4, 4), 77).save(grey)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (4, 4), (1, 2, 3, 128)).save(rgba)
    batch = load_batch([wide, tall, grey, rgba], size=10, mean=(0, 0, 0), std=(1, 1, 1))
    assert np.all(batch[0] == np.array([0, 255, 0], np.float32)[:, None, None])
    assert np.all(batch[1] == np.array([0, 255, 0], np.float32)[:, None, None])
    assert np.all(batch[2] == 77)
    assert np.all(batch[3] == np.array([1, 2, 3], np.float32)[:, None, None])
    assert load_batch([], size=4, mean=MEAN, std=STD).shape == (0, 3, 4, 4)


def test_load_batch_jpeg_draft_stays_faithful(tmp_path: Path) -> None:
    """Reduced-scale JPEG decoding must look like a full decode followed by resize."""
    cfg = SynthConfig(identities=2, per_identity=2, size=256)
    p = tmp_path / "big.jpg"
    Image.fromarray(render_face(0, 0, cfg)).save(p, quality=95)
    fast = load_batch([p], size=32, mean=(0, 0, 0), std=(1, 1, 1))[0]
    with Image.open(p) as im:
        ref = np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR), np.float32)
    assert np.abs(fast.transpose(1, 2, 0) - ref).mean() < 4.0


def test_load_batch_speed_at_224(tmp_path: Path) -> None:
    cfg = SynthConfig(identities=2, per_identity=8, size=250)
    paths = []
    for k in range(8):
        paths.append(tmp_path / f"f_{k}.jpg")
        Image.fromarray(render_face(k % 2, k, cfg)).save(paths[-1], quality=95)
    load_batch(paths[:1], size=224, mean=MEAN, std=STD)  # warm up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        batch = load_batch(paths, size=224, mean=MEAN, std=STD)
        best = min(best, time.perf_counter() - start)
    print(f"\nload_batch: 8 images 250x250 JPEG -> 224x224 in {best * 1000:.1f} ms")
    assert batch.shape == (8, 3, 224, 224)
    assert best < 0.5  # target is well under 0.1 s; slack for a loaded CI machine


def test_load_batch_errors_name_the_file(tmp_path: Path) -> None:
    good = _image(tmp_path / "good.png")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"definitely not a jpeg")
    with pytest.raises(ValueError, match=r"cannot read image .*junk\.jpg"):
        load_batch([good, junk], size=4, mean=MEAN, std=STD)
    whole = tmp_path / "whole.jpg"
    Image.fromarray(render_face(0, 0, SynthConfig(size=64))).save(whole, quality=95)
    cut = tmp_path / "truncated.jpg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cannot read image .*truncated\.jpg"):
        load_batch([cut], size=4, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=r"cannot read image .*missing\.png"):
        load_batch([tmp_path / "missing.png"], size=4, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=r"std must be > 0"):
        load_batch([good], size=4, mean=MEAN, std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match=r"mean must have 3 values \(R, G, B\), got 2"):
        load_batch([good], size=4, mean=(1.0, 2.0), std=STD)
    with pytest.raises(ValueError, match="size must be a positive int, got 0"):
        load_batch([good], size=0, mean=MEAN, std=STD)


def test_iter_batches_cover_an_epoch(hand_made: Path) -> None:
    index = index_faces(hand_made, min_faces_per_person=1)  # 6 images
    batches = list(iter_batches(index, batch_size=4, rng=np.random.default_rng(1)))
    assert [len(b) for b in batches] == [4, 2]
    assert all(b.dtype == np.int64 for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == list(range(6))
    again = list(iter_batches(index, batch_size=4, rng=np.random.default_rng(1)))
    assert all(np.array_equal(x, y) for x, y in zip(batches, again, strict=True))
    dropped = list(iter_batches(index, batch_size=4, rng=np.random.default_rng(1), drop_last=True))
    assert [len(b) for b in dropped] == [4]
    assert list(iter_batches(index, batch_size=6, rng=np.random.default_rng(0), drop_last=True))[0].size == 6
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        next(iter_batches(index, batch_size=0, rng=np.random.default_rng(0)))


def test_device_modules_do_not_import_torch() -> None:
    """The device side ships numpy + pillow only; torch must never sneak in."""
    code = (
        "import sys, dpa.faces.lfw, dpa.faces.synth; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx')); "
        "assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
