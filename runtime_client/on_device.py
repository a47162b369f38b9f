"""Classify clean inputs on the device with what the server learned from releases alone.

The server's class templates (``GET /v1/templates``) are means of DP-A releases: post-processing,
so the device may use them freely. It classifies its own images without noise: the head's
(centred) activation, clipped and rescaled exactly as a release is, scored against each template
by the inner product ``<x, t_c>`` (a matched filter). On the built-in faces at pool5 and whole-run
epsilon 8 this scored 0.37 where the nearest template in Euclidean distance scored 0.28, even with
the noise's expected share of ``||t_c||^2`` (d s^2 sigma^2 / n_c) taken out: at that noise the norm
term is mostly noise itself, and centred releases of different identities have similar norms.
"""

from __future__ import annotations

import numpy as np

from dpa.contract.manifest import Manifest
from dpa.faces.lfw import FaceIndex
from dpa.privacy.clipping import clip_factors, l2_norms, scale_examples
from dpa.privacy.mechanism import DPConfig
from runtime_client.dataset import load_examples
from runtime_client.head import HeadModel

__all__ = ["template_scores", "template_accuracy"]


def template_scores(x: np.ndarray, templates: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(B, classes) scores of clean, clipped, rescaled activations ``x`` against the templates: <x, t_c>."""
    flat_x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    t = np.asarray(templates, dtype=np.float64).reshape(len(templates), -1)
    scores = flat_x @ t.T
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
        a = head.forward(images)
        x = scale_examples(a, clip_factors(l2_norms(a), clip=dp.clip)) * np.float32(scale)
        correct += int((template_scores(x, templates, counts).argmax(axis=1) == labels).sum())
    return correct / max(len(test.paths), 1)
