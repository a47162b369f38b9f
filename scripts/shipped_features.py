"""fc7 features of the shipped public weights on built-in faces, and the product's class-sum release of them:
what the lever studies (``precision_lever.py``, ``projection_lever.py``) measure. The release, the templates
and the device's scoring are the product's own (``dpa.privacy.class_sums``, ``runtime_client.on_device``),
so a lever study measures what a device would get."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dpa.contract.architecture import ArchConfig
from dpa.faces.lfw import index_faces, load_batch
from dpa.faces.synth import SynthConfig, cached_faces
from dpa.privacy.class_sums import class_templates, contributions, release_class_sums
from dpa.privacy.clipping import clip_l2
from dpa.runs.shipped_weights import SHIPPED_WEIGHTS
from exporter.export import VGGFACE_MEAN
from exporter.pretrain import PRETRAIN_PIXEL_STD
from exporter.vggface import build_parts, load_weights
from runtime_client.on_device import template_scores

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
    """Each row scaled to L2 norm at most ``c``: the device's clip (``dpa.privacy.clipping.clip_l2``)."""
    return clip_l2(np.ascontiguousarray(g), clip=c)[0]


def released_templates(
    x: np.ndarray, y: np.ndarray, classes: int, c: float, z: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(templates, counts) from one class-sum release of clipped ``x`` at noise multiplier ``z`` (0: exact),
    as the device releases and the server turns them into templates."""
    totals = contributions(x, y, classes, c)
    released = release_class_sums(totals, clip=c, noise_multiplier=z, rng=rng)
    return class_templates(released.sums, released.counts)


def device_accuracy(x: np.ndarray, y: np.ndarray, templates: np.ndarray, counts: np.ndarray) -> float:
    """Held-out accuracy of clipped ``x`` scored as the device scores (``template_scores``: the cosine)."""
    return float(np.mean(template_scores(x, templates, counts).argmax(1) == y))
