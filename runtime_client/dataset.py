"""The device's own examples: the train/test split, loading a batch, held-out accuracy."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from dpa.contract.errors import UserError
from dpa.contract.manifest import Manifest
from dpa.faces.lfw import FaceIndex, index_faces, load_batch, split_faces
from dpa.faces.synth import SynthConfig, cached_faces
from dpa.privacy.noise_source import secure_generator
from runtime_client.alignment import aligned_folder
from runtime_client.config import ClientConfig
from runtime_client.split_step import SplitTrainer

__all__ = ["prepare_data", "load_examples", "noise_generator", "evaluate"]


def prepare_data(cfg: ClientConfig, manifest: Manifest) -> tuple[FaceIndex, FaceIndex]:
    """Train/test split of the configured data; synthetic faces are generated once and cached."""
    if cfg.data == "synthetic":
        synth = SynthConfig(
            identities=cfg.synth.identities,
            per_identity=cfg.synth.per_identity,
            size=manifest.image_size,
            seed=cfg.synth.seed,
        )
        root = cached_faces(cfg.state_dir / "data", synth)
    else:
        root = aligned_folder(Path(cfg.data), manifest, cfg.state_dir)
    index = index_faces(root, min_faces_per_person=cfg.min_faces_per_person)
    if len(index.names) > manifest.num_classes:
        raise UserError(
            f"{root} has {len(index.names)} identities but the export classifies {manifest.num_classes}: "
            f"export with --classes {len(index.names)} or raise --min-faces-per-person"
        )
    return split_faces(index, test_fraction=cfg.test_fraction, seed=cfg.split_seed,
                       train_per_identity=cfg.train_per_identity)  # fmt: skip


def load_examples(index: FaceIndex, rows: np.ndarray, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    images = load_batch(
        [index.paths[i] for i in rows], size=manifest.image_size, mean=manifest.pixel_mean, std=manifest.pixel_std
    )
    return images, index.labels[rows].astype(np.int64)


def noise_generator(cfg: ClientConfig, data_seed: int) -> tuple[np.random.Generator, int]:
    if cfg.seed is not None:
        warnings.warn(
            f"--seed {cfg.seed}: DP noise is reproducible, which is for experiments only", UserWarning, stacklevel=3
        )
        return secure_generator([cfg.seed, 1]), data_seed
    return secure_generator(), data_seed  # AES-CTR from OS entropy: the server cannot predict the noise


#: A frozen head's held-out activations are kept between evaluations up to this many bytes.
_KEEP_TEST_BYTES = 256 << 20


class TestActivations:
    """A frozen head's clean activations of the held-out images, computed once for every evaluation
    (a quarter of a demo run's head work at pool5 went to recomputing them). Only the activations are
    kept, never a release: each evaluation still draws fresh noise. Off where they would not fit."""

    def __init__(self, test: FaceIndex, manifest: Manifest) -> None:
        self.enabled = len(test.paths) * manifest.activation_numel * 4 <= _KEEP_TEST_BYTES
        self.kept: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # batch start -> (labels, activation)


async def evaluate(
    trainer: SplitTrainer, test: FaceIndex, manifest: Manifest, batch: int, keep: TestActivations | None = None
) -> float:
    correct = 0
    for start in range(0, len(test.paths), batch):
        rows = np.arange(start, min(start + batch, len(test.paths)))
        if keep is not None and start in keep.kept:
            labels, activation = keep.kept[start]
        else:
            images, labels = load_examples(test, rows, manifest)
            activation = trainer.head.forward(images)
            if keep is not None and keep.enabled:
                keep.kept[start] = (labels, activation)
        correct += int((await trainer.predict_activation(activation) == labels).sum())
    return correct / max(len(test.paths), 1)
