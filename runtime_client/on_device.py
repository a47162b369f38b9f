"""Classify clean inputs on the device with what the server learned from releases alone.

The server's class templates (``GET /v1/templates``) are means of DP-A releases: post-processing,
so the device may use them freely. It classifies its own images without noise: the head's
(centred) activation, clipped and rescaled exactly as a release is, scored against each template
by the cosine ``<x, t_c> / ||t_c||`` (``template_scores``).

Why the cosine and not the inner product ``<x, t_c>`` it replaced: a class-sum template is its noisy
sum over a noisy count, so the count's noise only rescales the template, and under ``<x, t_c>`` a
template whose count came out low wins probes it should not. The cosine is blind to that scale
(and to the noise's share of ``||t_c||``), and the probes are clipped to C, so it is face
recognition's cosine to a template. Chosen on the public task of seed 4 (the class-sum release simulated
at fc7, 20 splits, ``scripts/projection_lever.py``): on the shipped weights 0.962 either way at whole-run
epsilon 8 and 0.924 -> 0.936 at epsilon 1; on the weaker 800-identity weights before them 0.815 -> 0.822
and 0.734 -> 0.751. Post-processing of the release: no privacy cost.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpa.base.atomic import atomic_write_bytes
from dpa.contract.errors import UserError
from dpa.contract.manifest import Manifest
from dpa.faces.lfw import FaceIndex, load_batch
from dpa.faces.verification import unit_rows
from dpa.privacy.clipping import clip_factors, l2_norms, scale_examples
from dpa.privacy.mechanism import DPConfig
from runtime_client.dataset import load_examples
from runtime_client.head import HeadModel

__all__ = [
    "GALLERY_FILE",
    "Gallery",
    "clean_embeddings",
    "embed_files",
    "pair_embeddings",
    "load_gallery",
    "save_gallery",
    "template_scores",
    "template_accuracy",
]

#: In the device's state dir: the server's templates as the device keeps them, to recognise new images
#: locally (``dpa recognize``) and to measure verification and open-set figures.
GALLERY_FILE = "gallery.npz"


@dataclass(frozen=True)
class Gallery:
    """The server's class templates kept on the device, with what a probe must be made like to match them."""

    templates: np.ndarray  # (classes, *activation_shape), float32
    counts: np.ndarray  # (classes,) releases (or noisy counts) behind each template
    names: tuple[str, ...]  # the identity of each class, as the device's data names it
    clip: float  # the probe is clipped to this norm ...
    scale: float  # ... and multiplied by this public constant, as a release is
    # Thresholds chosen on PUBLIC faces (dpa.runs.recognition), NaN until then: a probe's best cosine to a
    # template above ``open_set_threshold`` is that identity, else "unknown"; two images whose cosine is
    # at least ``pair_threshold`` are the same person.
    open_set_threshold: float = math.nan
    pair_threshold: float = math.nan


def save_gallery(path: Path, gallery: Gallery) -> None:
    buf = io.BytesIO()
    np.savez(buf, templates=gallery.templates, counts=gallery.counts, names=np.array(gallery.names, dtype=str),
             clip=np.float64(gallery.clip), scale=np.float64(gallery.scale),
             open_set_threshold=np.float64(gallery.open_set_threshold),
             pair_threshold=np.float64(gallery.pair_threshold))  # fmt: skip
    atomic_write_bytes(path, buf.getvalue())


def load_gallery(path: Path) -> Gallery:
    try:
        with np.load(path, allow_pickle=False) as z:
            return Gallery(z["templates"], z["counts"], tuple(str(n) for n in z["names"]), float(z["clip"]),
                           float(z["scale"]), float(z["open_set_threshold"]), float(z["pair_threshold"]))  # fmt: skip
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"no readable gallery at {path} ({exc}): enrol first (dpa client with the server's "
                        "templates)") from None  # fmt: skip


def clean_embeddings(head: HeadModel, images: np.ndarray, clip: float, scale: float) -> np.ndarray:
    """Clean probes as templates are made: the head's (centred) activation, clipped, times the public scale."""
    a = head.forward(images)
    return scale_examples(a, clip_factors(l2_norms(a), clip=clip)) * np.float32(scale)


def _over_files(
    embed: Callable[[np.ndarray], np.ndarray], manifest: Manifest, paths: list[Path], batch: int
) -> np.ndarray:
    """``embed`` of image files, preprocessed as the manifest says, ``batch`` at a time: (N, elements), float64."""
    out = [np.zeros((0, manifest.activation_numel))]
    for start in range(0, len(paths), batch):
        x = load_batch(list(paths[start : start + batch]), size=manifest.image_size, mean=manifest.pixel_mean,
                       std=manifest.pixel_std)  # fmt: skip
        out.append(np.asarray(embed(x), dtype=np.float64).reshape(len(x), -1))
    return np.concatenate(out)


def embed_files(
    head: HeadModel, manifest: Manifest, paths: list[Path], clip: float, scale: float, batch: int = 64
) -> np.ndarray:
    """``clean_embeddings`` of image files, preprocessed as the manifest says: (N, elements), float64."""
    return _over_files(lambda x: clean_embeddings(head, x, clip, scale), manifest, paths, batch)


def pair_embeddings(
    head: HeadModel, manifest: Manifest, paths: list[Path], batch: int = 64, *, flip: bool = False
) -> np.ndarray:
    """Unit-norm ``HeadModel.embed`` rows of image files (N, elements), float64: what verification compares.

    Not the release's centred activation: the public network was trained (CosFace) on the cosine of its own
    output, and on held-out public pairs (seed 2) that cosine scored ROC AUC 0.9826 where the centred one
    scored 0.9816 (``dpa.runs.recognition`` chooses the pair threshold in this space too). Centring is for
    the release, where it lifts the class sums at whole-run epsilon 1 (0.897 -> 0.936 on the public task).

    ``flip``: the embedding of the image plus that of its mirror image, the field's test-time flip. Chosen on
    LFW's View 1 for dlib's network (ROC AUC 0.99889 -> 0.99902 on pairsDevTest, 0.99887 -> 0.99912 on
    pairsDevTrain); off by default, where nothing measured it."""
    embed = (lambda x: head.embed(x) + head.embed(np.ascontiguousarray(x[..., ::-1]))) if flip else head.embed
    return unit_rows(_over_files(embed, manifest, paths, batch))


def template_scores(x: np.ndarray, templates: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(B, classes) scores of clean, clipped, rescaled activations ``x`` against the templates:
    <x, t_c> / ||t_c|| (see the module's docstring; a zero template scores 0 before the mask)."""
    flat_x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    t = np.asarray(templates, dtype=np.float64).reshape(len(templates), -1)
    scores = flat_x @ (t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-30)).T
    scores[:, np.asarray(counts) == 0] = -np.inf  # a class the server never received
    return scores


def template_accuracy(
    head: HeadModel,
    dp: DPConfig,
    test: FaceIndex,
    manifest: Manifest,
    templates: np.ndarray,
    counts: np.ndarray,
    batch: int = 32,
) -> float:
    """Held-out accuracy of the nearest-template classifier on clean inputs, computed on the device."""
    scale = dp.release_scale(manifest.activation_numel)
    correct = 0
    for start in range(0, len(test.paths), batch):
        rows = np.arange(start, min(start + batch, len(test.paths)))
        images, labels = load_examples(test, rows, manifest)
        x = clean_embeddings(head, images, dp.clip, scale)
        correct += int((template_scores(x, templates, counts).argmax(axis=1) == labels).sum())
    return correct / max(len(test.paths), 1)
