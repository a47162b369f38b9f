"""fc7 features of the shipped public weights on built-in faces, and the L2 clip: what the lever studies
(``precision_lever.py``, ``projection_lever.py``) simulate the class-sum release on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dpa.contract.architecture import ArchConfig
from dpa.faces.lfw import index_faces, load_batch
from dpa.faces.synth import SynthConfig, cached_faces
from dpa.runs.shipped_weights import SHIPPED_WEIGHTS
from exporter.export import VGGFACE_MEAN
from exporter.pretrain import PRETRAIN_PIXEL_STD
from exporter.vggface import build_parts, load_weights

ARCH = ArchConfig(image_size=64, width=0.25, num_classes=10, dropout=0.0)


def features(root: Path, cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """(fc7 activations (N, d) float64, labels) of the built-in faces of ``cfg``, drawn under ``root``."""
    index = index_faces(cached_faces(root, cfg), min_faces_per_person=1)
    x = load_batch(list(index.paths), size=64, mean=VGGFACE_MEAN, std=(PRETRAIN_PIXEL_STD,) * 3)
    head, tail = build_parts(ARCH, "fc7")
    load_weights((head, tail), SHIPPED_WEIGHTS)
    with torch.no_grad():
        f = np.concatenate([head(torch.from_numpy(x[i : i + 256])).flatten(1).numpy() for i in range(0, len(x), 256)])
    return f.astype(np.float64), np.asarray(index.labels)


def clip(g: np.ndarray, c: float) -> np.ndarray:
    """Each row scaled to L2 norm at most ``c``, as the device clips a release."""
    return g * np.minimum(1.0, c / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12))
