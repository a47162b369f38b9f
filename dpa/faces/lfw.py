"""Reading an LFW-style face folder on the device: index, split, batch, load.

The layout is one sub-folder per identity holding that person's images (JPEG or
PNG), as in the real LFW data set and in the synthetic one written by
:mod:`dpa.faces.synth`. Like scikit-learn's
``fetch_lfw_people(min_faces_per_person=...)``, identities with too few images are
dropped, because a class with one picture can't be both trained on and tested.

Every step is deterministic and independent of the order in which the file system
lists entries, so a device and a test run given the same folder and seed agree on
which image is in which split. Only numpy and pillow are used: this runs on the
phone, and ``load_batch`` sits on its per-step hot path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dpa.contract.errors import UserError

__all__ = [
    "IMAGE_EXTENSIONS",
    "FaceIndex",
    "index_faces",
    "split_faces",
    "load_batch",
    "iter_batches",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png"})
"""Matched case-insensitively; anything else in an identity folder is ignored."""


@dataclass(frozen=True, eq=False)
class FaceIndex:
    """Which image files make up a data set, and whose face each one is.

    ``labels[i]`` is the class of ``paths[i]`` and ``names[label]`` the identity
    folder it came from. ``names`` always lists every identity of the full index,
    even in a split where some have no images, so labels mean the same everywhere.
    (``eq=False``: arrays have no single truth value, so field-wise ``==`` would fail.)
    """

    root: Path
    paths: tuple[Path, ...]
    labels: np.ndarray
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        labels = np.array(self.labels, dtype=np.int64, copy=True).reshape(-1)
        if labels.shape[0] != len(self.paths):
            raise UserError(f"FaceIndex has {len(self.paths)} paths but {labels.shape[0]} labels")
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.names)):
            raise UserError(
                f"FaceIndex labels must lie in [0, {len(self.names)}), got range [{labels.min()}, {labels.max()}]"
            )
        labels.setflags(write=False)  # frozen means frozen, arrays included
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "paths", tuple(Path(p) for p in self.paths))
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "root", Path(self.root))

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_identities(self) -> int:
        """Number of classes (the model's output width), including empty ones."""
        return len(self.names)

    def subset(self, indices: Sequence[int] | np.ndarray) -> FaceIndex:
        """The images at ``indices``, in that order, with the same label space."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return FaceIndex(
            root=self.root,
            paths=tuple(self.paths[i] for i in idx.tolist()),
            labels=self.labels[idx],
            names=self.names,
        )


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def index_faces(root: Path, *, min_faces_per_person: int = 2) -> FaceIndex:
    """Index ``root/<identity>/<image>``; keep identities with enough images.

    Identities are sorted by folder name and images by file name, and labels are
    positions among the kept identities, so the result depends only on the folder's
    contents. Hidden entries and files that are not .jpg/.jpeg/.png are skipped.
    """
    root = Path(root)
    if isinstance(min_faces_per_person, bool) or not isinstance(min_faces_per_person, int):
        raise UserError(f"min_faces_per_person must be an int, got {min_faces_per_person!r}")
    if min_faces_per_person < 1:
        raise UserError(f"min_faces_per_person must be >= 1, got {min_faces_per_person}")
    if not root.exists():
        raise UserError(f"face folder {root} does not exist")
    if not root.is_dir():
        raise UserError(f"face folder {root} is not a folder")

    folders = sorted((p for p in root.iterdir() if _visible(p) and p.is_dir()), key=lambda p: p.name)
    paths: list[Path] = []
    labels: list[int] = []
    names: list[str] = []
    seen_images = 0
    for folder in folders:
        images = sorted(
            (p for p in folder.iterdir() if _visible(p) and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
            key=lambda p: p.name,
        )
        seen_images += len(images)
        if len(images) < min_faces_per_person:
            continue
        label = len(names)
        names.append(folder.name)
        paths.extend(images)
        labels.extend([label] * len(images))
    if not names:
        raise UserError(
            f"no identity in {root} has at least {min_faces_per_person} images: found "
            f"{seen_images} images in {len(folders)} identity folders "
            f"(expected layout root/<identity>/<image>.jpg|.jpeg|.png)"
        )
    return FaceIndex(root=root, paths=tuple(paths), labels=np.array(labels, dtype=np.int64), names=tuple(names))


def _name_seed(name: str) -> int:
    """A stable 64-bit number for a name (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def split_faces(
    index: FaceIndex, *, test_fraction: float = 0.25, seed: int = 0, train_per_identity: int | None = None
) -> tuple[FaceIndex, FaceIndex]:
    """Split by image within each identity into (train, test), deterministically.

    ``train_per_identity``: exactly that many training images per identity and the rest held out (a phone
    that enrols a person from a few photos); an identity with no more images than that is refused.

    Each identity's images are sorted by path, then shuffled by a generator seeded
    from ``seed`` and the identity's name, so the split depends on neither the
    listing order nor the other identities. The test part gets
    ``round(n * test_fraction)`` images (Python rounding), capped at ``n - 1`` so
    every identity keeps a training image. Both parts come out sorted by
    (label, path) and share the full label space.
    """
    if not isinstance(test_fraction, (int, float)) or isinstance(test_fraction, bool):
        raise UserError(f"test_fraction must be a number, got {test_fraction!r}")
    if not 0.0 <= float(test_fraction) < 1.0:
        raise UserError(f"test_fraction must satisfy 0 <= test_fraction < 1, got {test_fraction}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be a non-negative int, got {seed!r}")

    train: list[int] = []
    test: list[int] = []
    labels = index.labels
    for label, name in enumerate(index.names):
        members = np.flatnonzero(labels == label).tolist()
        if not members:
            continue
        members.sort(key=lambda i: str(index.paths[i]))
        n = len(members)
        n_test = min(round(n * float(test_fraction)), n - 1)
        if train_per_identity is not None:
            if n <= train_per_identity:
                raise UserError(f"{name} has {n} images: enrolling {train_per_identity} leaves none to test")
            n_test = n - train_per_identity
        rng = np.random.default_rng(np.random.SeedSequence([seed, _name_seed(name)]))
        order = rng.permutation(n)
        chosen = set(order[:n_test].tolist())
        for pos, i in enumerate(members):
            (test if pos in chosen else train).append(i)
    return index.subset(train), index.subset(test)


def _check_stats(name: str, values: Sequence[float], *, positive: bool) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    if arr.shape != (3,):
        raise UserError(f"{name} must have 3 values (R, G, B), got {len(arr)}")
    if not np.all(np.isfinite(arr)):
        raise UserError(f"{name} must be finite, got {list(values)}")
    if positive and not np.all(arr > 0):
        raise UserError(f"{name} must be > 0, got {list(values)}")
    return arr


def _read_square(path: Path, size: int) -> Image.Image:
    """Decode, centre-crop to a square and resize to size x size, as RGB."""
    with Image.open(path) as im:
        if im.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still leaves at
            # least size x size pixels: far less work than decoding everything.
            im.draft("RGB", (size, size))
        rgb = im.convert("RGB")
    w, h = rgb.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return rgb.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))


def load_batch(paths: Sequence[Path], *, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Load images as a float32 (B, 3, size, size) C-contiguous batch.

    Each image is converted to RGB, centre-cropped to a square, resized (bilinear)
    and normalised per channel as ``(pixel - mean[c]) / std[c]`` on the 0..255
    scale. A file that can't be decoded raises ValueError naming it, so a single
    bad image in a data set is easy to find.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"size must be a positive int, got {size!r}")
    m = _check_stats("mean", mean, positive=False)
    s = _check_stats("std", std, positive=True)
    out = np.empty((len(paths), 3, size, size), dtype=np.float32)
    pixels = np.empty((size, size, 3), dtype=np.float32)
    for i, path in enumerate(paths):
        try:
            img = _read_square(Path(path), size)
            np.copyto(pixels, np.asarray(img), casting="unsafe")
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, SyntaxError) as exc:
            raise UserError(f"cannot read image {path}: {exc}") from exc
        pixels -= m
        pixels /= s
        out[i] = pixels.transpose(2, 0, 1)
    return out


def iter_batches(
    index: FaceIndex, *, batch_size: int, rng: np.random.Generator, drop_last: bool = False
) -> Iterator[np.ndarray]:
    """Yield int64 index arrays covering one shuffled epoch of ``index``.

    The caller loads ``[index.paths[i] for i in batch]`` with :func:`load_batch`;
    keeping loading out of here keeps the shuffle testable without touching disk.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive int, got {batch_size!r}")
    order = rng.permutation(len(index)).astype(np.int64)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]
