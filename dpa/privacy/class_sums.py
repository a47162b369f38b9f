"""One Gaussian release of the device's per-class sums: labels and activations protected together.

Pure math, no I/O. Per-example DP-A releases every example with its own noise, so a class template
the server averages from n releases carries noise of variance sigma^2 / n per element. The device
holds all its examples, though, and what the template learner needs is only, per class, the sum of
the clipped activations and their count. Releasing those sums ONCE, with one draw of noise, gives
each template noise of variance sigma^2 / n^2: n times less at the same epsilon (measured on the
built-in faces at fc7, whole-run epsilon 8: 0.48 against 0.37 from per-example releases, where the
noiseless templates score 0.49; docs/history.md).

The release. Each example (x, y), x already centred and L2-clipped to C, contributes the vector
v(x, y) in R^(K x (d + 1)) that is zero except for its label's row, which is [x, C] (the count
coordinate scaled by C). The device releases S + N(0, sigma^2 I) with S = sum_i v(x_i, y_i) and
sigma = 2 z C. The server divides each row by its (noisy) count.

Sensitivity 2C (replace one example), labels included. Replacing (x, y) by (x', y') changes S by
v(x', y') - v(x, y):
* same label: only row y changes, by [x' - x, 0], of norm <= ||x'|| + ||x|| <= 2C;
* different labels: row y loses [x, C] and row y' gains [x', C]; the rows are disjoint, so the
  squared norm is ||x||^2 + C^2 + ||x'||^2 + C^2 <= 4 C^2, a norm <= 2C.
So one release of S at noise multiplier z = sigma / 2C is exactly the Gaussian mechanism our
accountant counts as one release (``PrivacyAccountant``, ``epsilon_spent(z, releases=1)``), and the
label of every example is inside that guarantee: no randomised response, no label epsilon.

What the server learns is a function of this one release only (post-processing), so the templates it
returns cost nothing more, and the device classifies its clean images with them.

Two adjacencies (``Adjacency``), stated with every figure:
* **replace-one** (above; the default): neighbouring data sets differ in one example's image and label,
  the number of examples is public. Sensitivity 2C with the count coordinate.
* **add-remove** (Opacus and the DP-SGD papers): neighbours differ by one example present or absent. The
  release then carries no counts: the device scores by cosine, which needs only each sum's direction, and
  adding or removing (x, y) moves row y by x alone: sensitivity C. The count column is a public constant
  (1 per class), so the wire and the server's template rule are unchanged and a template is its class's
  noisy sum. The same noise read under replace-one has sensitivity 2C (replacing is a removal and an
  addition): ``replace_one_noise_multiplier`` gives the multiplier that reading implies, so a run reports
  its epsilon under both. Measured on public LFW identities (10-19 images, 75/25): at whole-run epsilon 1
  the add-remove release scored 0.26-0.31 where replace-one scored 0.07-0.10; at epsilon 8, 0.98 against 0.86.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpa.contract.choices import Choice
from dpa.privacy import checks
from dpa.privacy.mechanism import snap_step

__all__ = [
    "Adjacency", "ClassSums", "class_templates", "contributions", "class_sums_sensitivity", "release_class_sums",
    "replace_one_noise_multiplier",
]  # fmt: skip


class Adjacency(Choice):
    """Which data sets are neighbours: the unit the guarantee protects (see the module's docstring)."""

    REPLACE_ONE = "replace-one"  # one example's image and label changed; counts released (sensitivity 2C)
    ADD_REMOVE = "add-remove"  # one example added or removed; no counts released (sensitivity C)


@dataclass(frozen=True)
class ClassSums:
    """A class-sum release: ``sums`` (K, d) or (K, *activation_shape) float32 and ``counts`` (K,) float32,
    both noisy."""

    sums: np.ndarray
    counts: np.ndarray
    noise_scale: float  # sigma of every element of [sums, C * counts]

    def means(self) -> np.ndarray:
        """Each class's template (``class_templates``)."""
        return class_templates(self.sums, self.counts)[0]


def class_templates(sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(templates float32 of ``sums``' shape, counts int64): each noisy count rounded and floored at 0,
    each class's sum over it, and 0 where it is 0. Post-processing of the release, so free; the one
    rule the server (``GET /v1/templates``), the audit and the tests use."""
    n = np.maximum(np.rint(np.asarray(counts, dtype=np.float64)), 0).astype(np.int64)
    flat = np.asarray(sums, dtype=np.float64).reshape(len(n), -1)
    means = np.where(n[:, None] > 0, flat / np.maximum(n, 1)[:, None], 0.0)
    return means.astype(np.float32).reshape(np.shape(sums)), n


def class_sums_sensitivity(clip: float, adjacency: Adjacency = Adjacency.REPLACE_ONE) -> float:
    """The L2 sensitivity of the release, see above: 2C under replace-one (the count coordinate scaled by
    C included), C under add-remove (no counts)."""
    c = checks.positive_finite("clip", clip)
    return 2.0 * c if Adjacency.parse(adjacency) is Adjacency.REPLACE_ONE else c


def replace_one_noise_multiplier(noise_multiplier: float, adjacency: Adjacency) -> float:
    """The noise multiplier the same noise has under replace-one: sigma / 2C. An add-remove release's
    sigma = z C reads as z / 2 there (replacing one example moves a row by up to 2C)."""
    z = checks.noise_multiplier(noise_multiplier)
    return z if Adjacency.parse(adjacency) is Adjacency.REPLACE_ONE else z / 2.0


def contributions(
    clipped: np.ndarray, labels: np.ndarray, num_classes: int, clip: float, *, counts: bool = True
) -> np.ndarray:
    """(K, d + 1) float64: sum over examples of v(x, y), rows [sum of x, C * count] per class
    (``counts`` False: the last column stays 0, an add-remove release's, which carries no counts).

    ``clipped`` (n, ...) must already be clipped to L2 norm ``clip`` (checked: a norm above it would
    break the sensitivity); ``labels`` (n,) in [0, num_classes)."""
    c = checks.positive_finite("clip", clip)
    x = np.asarray(clipped, dtype=np.float64).reshape(len(clipped), -1)
    y = np.asarray(labels)
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be ({len(x)},) integers, got {y.shape} {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {y.min()}..{y.max()}")
    norms = np.linalg.norm(x, axis=1)
    if not np.all(np.isfinite(norms)) or np.any(norms > c * (1 + 1e-5)):
        raise ValueError(f"every activation must be finite and clipped to norm {c:g} before it is summed")
    out = np.zeros((num_classes, x.shape[1] + 1), dtype=np.float64)
    for k in np.unique(y):
        rows = x[y == k]
        out[k, :-1] = rows.sum(axis=0)
        out[k, -1] = c * len(rows) if counts else 0.0
    return out


def release_class_sums(
    totals: np.ndarray, *, clip: float, noise_multiplier: float, rng: np.random.Generator,
    adjacency: Adjacency = Adjacency.REPLACE_ONE,
) -> ClassSums:  # fmt: skip
    """``totals`` (K, d + 1), the sum of ``contributions`` over every example, with N(0, (z D)^2) on every
    element, D = ``class_sums_sensitivity(clip, adjacency)``; the counts divided back by C. Under add-remove
    only the sums are released (``totals`` made with ``counts=False``) and the counts are the public
    constant 1: no noise, nothing of the data.

    z = 0 releases them exactly (no privacy: for a non-private reference). The noisy values are
    rounded to the release grid (``mechanism.snap_step``), as every DP-A release is."""
    z = checks.noise_multiplier(noise_multiplier)
    c = checks.positive_finite("clip", clip)
    adjacency = Adjacency.parse(adjacency)
    s = np.asarray(totals, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] < 2:
        raise ValueError(f"totals must be (classes, elements + 1), got {s.shape}")
    with_counts = adjacency is Adjacency.REPLACE_ONE
    if not with_counts and np.any(s[:, -1] != 0):
        raise ValueError("an add-remove release carries no counts: make its totals with counts=False")
    sigma = z * class_sums_sensitivity(c, adjacency)
    if sigma > 0:
        noisy = s if with_counts else s[:, :-1]
        noisy = noisy + rng.standard_normal(noisy.shape) * sigma
        step = snap_step(sigma)
        noisy = np.round(noisy / step) * step
        s = noisy if with_counts else np.concatenate([noisy, s[:, -1:]], axis=1)
    sums, counts = s[:, :-1], (s[:, -1] / c if with_counts else np.ones(len(s)))
    if not (np.all(np.isfinite(sums)) and np.all(np.isfinite(counts))):
        raise ValueError("the class-sum release is not finite")
    return ClassSums(sums.astype(np.float32), counts.astype(np.float32), float(sigma))
