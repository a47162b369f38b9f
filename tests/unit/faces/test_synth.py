"""Synthetic faces: LFW layout, determinism, atomic writes, and "not trivially separable"."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpa.faces.lfw import index_faces, load_batch, split_faces
from dpa.faces.synth import SynthConfig, identity_names, render_face, write_synthetic_faces

NAME_RE = re.compile(r"^[A-Z][A-Za-z]+(?:_[A-Z][A-Za-z]+)+$")
CLASSES, PER, SIZE = 8, 30, 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthConfig]:
    cfg = SynthConfig(identities=CLASSES, per_identity=PER, size=SIZE, seed=0)
    out = tmp_path_factory.mktemp("synth") / "faces"
    assert write_synthetic_faces(out, cfg) == out
    return out, cfg


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_matches_lfw(dataset: tuple[Path, SynthConfig]) -> None:
    root, cfg = dataset
    folders = sorted(p for p in root.iterdir())
    assert len(folders) == cfg.identities
    assert sorted(p.name for p in folders) == sorted(identity_names(cfg))
    for folder in folders:
        assert folder.is_dir() and NAME_RE.match(folder.name), folder.name
        files = sorted(p.name for p in folder.iterdir())
        assert files == [f"{folder.name}_{k:04d}.jpg" for k in range(1, cfg.per_identity + 1)]
    with Image.open(folders[0] / f"{folders[0].name}_0001.jpg") as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (cfg.size, cfg.size))
    # no staging folder left next to the output
    assert [p.name for p in root.parent.iterdir()] == [root.name]


def test_names_are_distinct_and_seeded() -> None:
    names = identity_names(SynthConfig(identities=200, seed=5))
    assert len(set(names)) == 200
    assert names == identity_names(SynthConfig(identities=200, seed=5))
    assert names != identity_names(SynthConfig(identities=200, seed=6))


def test_progress_counts_every_image(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    cfg = SynthConfig(identities=2, per_identity=3, size=32)
    write_synthetic_faces(tmp_path / "out", cfg, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(k, 6) for k in range(1, 7)]


def test_same_seed_same_bytes_different_seed_differs(tmp_path: Path) -> None:
    cfg = SynthConfig(identities=3, per_identity=2, size=32, seed=11)
    a = _files(write_synthetic_faces(tmp_path / "a", cfg))
    b = _files(write_synthetic_faces(tmp_path / "b", cfg))
    assert a == b
    c = write_synthetic_faces(tmp_path / "c", SynthConfig(identities=3, per_identity=2, size=32, seed=12))
    assert sorted(a.values()) != sorted(_files(c).values())
    assert np.array_equal(render_face(1, 4, cfg), render_face(1, 4, cfg))
    assert not np.array_equal(render_face(1, 4, cfg), render_face(1, 5, cfg))


def test_render_face_shape_and_range() -> None:
    cfg = SynthConfig(identities=2, per_identity=2, size=48)
    img = render_face(0, 7, cfg)  # indices past per_identity are allowed: more samples
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8
    with pytest.raises(ValueError, match=r"identity must be in \[0, 2\), got 2"):
        render_face(2, 0, cfg)
    with pytest.raises(ValueError, match="image_index must be >= 0, got -1"):
        render_face(0, -1, cfg)


def test_refuses_non_empty_output_and_accepts_empty(tmp_path: Path) -> None:
    cfg = SynthConfig(identities=2, per_identity=2, size=32)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"output folder .*out is not empty"):
        write_synthetic_faces(out, cfg)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    empty = tmp_path / "empty"
    empty.mkdir()
    write_synthetic_faces(empty, cfg)
    assert len(list(empty.rglob("*.jpg"))) == 4

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        write_synthetic_faces(a_file, cfg)


def test_failure_leaves_nothing_behind(tmp_path: Path) -> None:
    def boom(done: int, total: int) -> None:
        if done == 3:
            raise RuntimeError("interrupted")

    out = tmp_path / "new" / "deeper" / "faces"
    with pytest.raises(RuntimeError, match="interrupted"):
        write_synthetic_faces(out, SynthConfig(identities=2, per_identity=2, size=32), progress=boom)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"identities": 1}, r"SynthConfig.identities must be between 2 and \d+, got 1"),
        ({"per_identity": 1}, r"SynthConfig.per_identity must be between 2 and 9999 .*got 1"),
        ({"per_identity": 10000}, r"SynthConfig.per_identity must be between 2 and 9999 .*got 10000"),
        ({"size": 31}, r"SynthConfig.size must be >= 32 pixels, got 31"),
        ({"seed": -1}, r"SynthConfig.seed must be >= 0, got -1"),
        ({"size": 32.0}, r"SynthConfig.size must be an int, got 32.0"),
    ],
)
def test_bad_config(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SynthConfig(**kwargs)  # type: ignore[arg-type]


def _pixels(root: Path) -> tuple[np.ndarray, np.ndarray]:
    index = index_faces(root)
    x = load_batch(index.paths, size=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return x.reshape(len(x), -1), index.labels


def test_images_of_one_identity_vary_a_lot(dataset: tuple[Path, SynthConfig]) -> None:
    x, y = _pixels(dataset[0])
    sq = (x * x).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0))
    same = y[:, None] == y[None, :]
    off_diag = ~np.eye(len(y), dtype=bool)
    ratio = dist[same & off_diag].mean() / dist[~same].mean()
    print(f"\nwithin/between identity pixel distance ratio: {ratio:.3f}")
    assert ratio > 0.7


def test_linear_classifier_on_raw_pixels_is_far_from_perfect(dataset: tuple[Path, SynthConfig]) -> None:
    train, test = split_faces(index_faces(dataset[0]), test_fraction=0.25, seed=0)
    stats = {"size": SIZE, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    xtr = load_batch(train.paths, **stats).reshape(len(train), -1).astype(np.float64)
    xte = load_batch(test.paths, **stats).reshape(len(test), -1).astype(np.float64)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    ytr, yte = train.labels, test.labels
    onehot = np.eye(CLASSES)[ytr]
    w, b = np.zeros((xtr.shape[1], CLASSES)), np.zeros(CLASSES)
    for _ in range(300):  # softmax regression, full-batch gradient descent, small L2
        logits = xtr @ w + b
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(xtr)
        w -= 0.05 * (xtr.T @ g + 1e-3 * w)
        b -= 0.05 * g.sum(0)
    train_acc = float(((xtr @ w + b).argmax(1) == ytr).mean())
    test_acc = float(((xte @ w + b).argmax(1) == yte).mean())
    print(f"\nlinear softmax on raw pixels: train {train_acc:.3f}, held-out {test_acc:.3f} "
          f"({CLASSES} identities, chance {1 / CLASSES:.3f})")  # fmt: skip
    assert train_acc > 0.95  # it fits the training set: the gap is generalisation
    assert test_acc < 0.8  # not trivially separable
    assert test_acc > 2.0 / CLASSES  # but identity is in the pixels
