"""The open-set threshold is chosen against the device's own gallery: at most 1% of public faces pass it."""

from __future__ import annotations

import numpy as np

from dpa.runs.recognition import OPEN_SET_FAR, _public_thresholds


def test_open_set_threshold_lets_one_percent_of_public_faces_past_the_devices_own_templates() -> None:
    rng = np.random.default_rng(0)
    templates = rng.standard_normal((5, 16)) * 3.0  # norms differ: the cosine ignores them
    public = rng.standard_normal((400, 16))
    labels = np.repeat(np.arange(100), 4)
    _, threshold = _public_thresholds(public, labels, public, templates)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    best = (unit(public) @ unit(templates).T).max(axis=1)
    assert np.mean(best > threshold) <= OPEN_SET_FAR
    assert np.mean(best >= threshold) > OPEN_SET_FAR  # the smallest such threshold: one more face would pass
    # a noisier gallery (the same templates plus noise) gets its own, lower threshold, not the clean one's
    noisy = templates + rng.standard_normal(templates.shape) * 10.0
    _, noisy_threshold = _public_thresholds(public, labels, public, noisy)
    noisy_best = (unit(public) @ unit(noisy).T).max(axis=1)
    assert np.mean(noisy_best > noisy_threshold) <= OPEN_SET_FAR and noisy_threshold != threshold
