"""The device's classifier scores a probe by its cosine to each template (runtime_client.on_device)."""

from __future__ import annotations

import numpy as np

from runtime_client.on_device import template_scores


def test_scores_are_cosines_and_blind_to_a_templates_scale():
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(5, 7)), rng.normal(size=(3, 7))
    want = x @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T  # the formula, written out
    np.testing.assert_allclose(template_scores(x, t, np.ones(3)), want, rtol=1e-12)
    # A class-sum template is a noisy sum over a noisy count: a count that came out at a third of the
    # truth triples the template. The inner product would then hand that class a probe of class 0.
    probe, truth = np.array([[1.0, 0.2]]), np.array([[1.0, 0.0], [0.6, 0.8]])
    low_count = truth * np.array([[1.0], [3.0]])
    assert (probe @ low_count.T).argmax() == 1  # what <x, t_c> did
    assert (
        template_scores(probe, low_count, np.ones(2)).argmax()
        == 0
        == template_scores(probe, truth, np.ones(2)).argmax()
    )


def test_a_class_never_received_never_wins():
    s = template_scores(np.ones((2, 3)), np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]), np.array([0, 4]))
    assert np.all(s[:, 0] == -np.inf) and np.all(np.isfinite(s[:, 1]))
