"""The federation's gallery (dpa.federation.gallery): releases checked as dpa serve checks them, kept once by
their bytes across a restart, scattered to the devices' identities, a second draw refused."""

from __future__ import annotations

import numpy as np
import pytest

from dpa.contract import messages
from dpa.contract.manifest import load_manifest
from dpa.federation.config import FederationConfig
from dpa.federation.gallery import Gallery, Refused
from dpa.privacy.class_sums import class_templates


def _release(rng, k, d, shape=(16, 64, 64)):
    sums = rng.normal(size=(k, *shape)).astype(np.float32)
    counts = rng.uniform(2, 9, size=k).astype(np.float32)
    return bytes(messages.encode_class_sums(sums, counts)), sums, counts


@pytest.fixture
def setup(small_export, tmp_path):
    manifest = load_manifest(small_export)  # 6 classes, conv1_1
    cfg = FederationConfig(artifacts=small_export, state_dir=tmp_path, devices=4, identities_per_device=6,
                           shared_per_device=2, edge_servers=2)  # fmt: skip
    return cfg, manifest


def test_releases_scatter_to_their_identities_and_survive_a_restart(setup):
    cfg, manifest = setup
    d = manifest.activation_numel
    rng = np.random.default_rng(0)
    gallery = Gallery(cfg, manifest)
    ids = {0: [0, 1, 2, 3, 16, 17], 1: [4, 5, 6, 7, 16, 17], 2: [8, 9, 10, 11, 16, 17]}
    bodies = {}
    want_sums, want_counts = np.zeros((cfg.identities, d)), np.zeros(cfg.identities)
    for device, rows in ids.items():
        body, sums, counts = _release(rng, 6, d)
        bodies[device] = body
        assert gallery.keep(device, rows, body) is True
        want_sums[rows] += sums.reshape(6, -1)
        want_counts[rows] += counts
    assert gallery.keep(1, ids[1], bodies[1]) is False  # a replay: kept once
    templates, counts = gallery.templates()
    t, n = class_templates(want_sums, want_counts)
    np.testing.assert_array_equal(counts, n)
    np.testing.assert_allclose(templates, t, rtol=1e-6)
    # Identity 16 was enrolled from devices 0, 1 and 2: every release's row, summed.
    assert counts[16] == round(float(want_counts[16]))
    # A restarted server reads the same gallery back, and still knows the replays.
    again = Gallery(cfg, manifest)
    np.testing.assert_array_equal(again.templates()[0], templates)
    assert again.releases == 3 and again.keep(0, ids[0], bodies[0]) is False
    assert [len(s) for s in again.stores] == [2, 1]  # devices 0, 2 on edge server 0; device 1 on 1


def test_bad_releases_are_refused_and_change_nothing(setup):
    cfg, manifest = setup
    d = manifest.activation_numel
    rng = np.random.default_rng(1)
    gallery = Gallery(cfg, manifest)
    body, _, _ = _release(rng, 6, d)
    gallery.keep(0, [0, 1, 2, 3, 16, 17], body)
    before = gallery.templates()[0].copy()
    second, _, _ = _release(rng, 6, d)
    with pytest.raises(Refused, match="device 0 sent another release than the one kept: a second draw"):
        gallery.keep(0, [0, 1, 2, 3, 16, 17], second)
    with pytest.raises(Refused, match="class_sums must have shape"):
        gallery.keep(1, [4, 5, 6, 7, 16, 17], _release(rng, 5, d)[0])
    with pytest.raises(Refused, match="identities that do not map its classes"):
        gallery.keep(1, [4, 5, 6, 7, 16, 16], second)
    with pytest.raises(Refused, match="identities that do not map its classes"):
        gallery.keep(1, [4, 5, 6, 7, 16, cfg.identities], second)
    with pytest.raises(Refused, match="device 2"):
        gallery.keep(2, [8, 9, 10, 11, 18, 19], b"DPAW not a message")
    np.testing.assert_array_equal(gallery.templates()[0], before)
    assert gallery.releases == 1
