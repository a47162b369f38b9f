"""The open-set threshold is chosen against the device's own gallery: at most 1% of faces like the public ones
pass it, with 95% confidence."""

from __future__ import annotations

import numpy as np
from scipy.stats import binom

from dpa.runs.recognition import OPEN_SET_CONFIDENCE, OPEN_SET_FAR, _public_thresholds


def _certified(accepted: int, n: int) -> bool:
    """The reference: so few accepts among n would be unlikely (<= 1 - confidence) at a true rate of 1%."""
    return bool(binom.cdf(accepted, n, OPEN_SET_FAR) <= 1 - OPEN_SET_CONFIDENCE)


def test_open_set_threshold_bounds_the_public_faces_past_the_devices_own_templates() -> None:
    rng = np.random.default_rng(0)
    templates = rng.standard_normal((5, 16)) * 3.0  # norms differ: the cosine ignores them
    public = rng.standard_normal((2000, 16))
    labels = np.repeat(np.arange(500), 4)
    _, threshold = _public_thresholds(public, labels, public, templates)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    best = (unit(public) @ unit(templates).T).max(axis=1)
    accepted = int(np.sum(best > threshold))
    assert _certified(accepted, len(best)) and not _certified(accepted + 1, len(best))  # the most it can let in
    assert 0 < accepted < OPEN_SET_FAR * len(best)
    # a noisier gallery (the same templates plus noise) gets its own, lower threshold, not the clean one's
    noisy = templates + rng.standard_normal(templates.shape) * 10.0
    _, noisy_threshold = _public_thresholds(public, labels, public, noisy)
    noisy_best = (unit(public) @ unit(noisy).T).max(axis=1)
    assert _certified(int(np.sum(noisy_best > noisy_threshold)), len(best)) and noisy_threshold != threshold
