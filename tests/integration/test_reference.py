"""The non-private reference (issue 23): the fine-tune is the SGD it says it is, and its hyperparameters are
chosen on public faces without touching the device's test set."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from dpa.contract.architecture import ArchConfig
from dpa.faces.lfw import index_faces, split_faces
from dpa.faces.synth import SynthConfig, cached_faces
from dpa.runs.recognition import STRANGER_SEED
from dpa.runs.reference import (
    TUNING_SEED,
    Preprocess,
    ReferenceConfig,
    _key,
    reference_accuracies,
    tune_reference,
    tuning_path,
)
from dpa.runs.shipped_weights import SHIPPED_WEIGHTS, shipped_info
from exporter.export import VGGFACE_MEAN
from exporter.fine_tune import FineTuneConfig, fine_tune
from exporter.pretrain import PRETRAIN_PIXEL_STD, PUBLIC_SEED, VALIDATION_SEED
from exporter.vggface import build_parts, load_weights

ARCH = ArchConfig(image_size=64, width=0.25, num_classes=3, dropout=0.0)
PRE = Preprocess(64, tuple(VGGFACE_MEAN), (PRETRAIN_PIXEL_STD,) * 3)


def _device(tmp_path, per_identity=8):
    root = cached_faces(tmp_path / "device", SynthConfig(identities=3, per_identity=per_identity, size=64, seed=0))
    return split_faces(index_faces(root, min_faces_per_person=2), test_fraction=0.25, seed=0)


def test_the_fine_tune_is_sgd_with_momentum_weight_decay_and_a_cosine_by_autograd(tmp_path):
    train, _ = _device(tmp_path)
    x, y = PRE.load(train), train.labels.astype(np.int64)
    cfg = FineTuneConfig(lr=0.01, epochs=2, batch_size=len(x), augment=False, seed=5)  # two full-batch steps
    tuned = fine_tune(SHIPPED_WEIGHTS, ARCH, x, y, cfg)
    # The reference, by hand from the same start (public weights, fc8 fresh from the seed): buffer b = mu b + g +
    # wd p (torch's SGD starts b at the first gradient), p -= lr_t b, lr_t = lr (1 + cos(pi t / T)) / 2.
    head, tail = build_parts(ARCH, "fc7")
    load_weights((head, tail), SHIPPED_WEIGHTS, seed=5)
    model = torch.nn.Sequential(head, tail)
    params = [p.detach().clone() for p in model.parameters()]
    buffers = None
    for t in range(2):
        for p, value in zip(model.parameters(), params, strict=True):
            p.data.copy_(value)
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        grads = torch.autograd.grad(loss, list(model.parameters()))
        steps = [g + cfg.weight_decay * p for g, p in zip(grads, params, strict=True)]
        buffers = steps if buffers is None else [cfg.momentum * b + s for b, s in zip(buffers, steps, strict=True)]
        lr_t = cfg.lr * 0.5 * (1 + math.cos(math.pi * t / 2))
        params = [p - lr_t * b for p, b in zip(params, buffers, strict=True)]
    start = dict(load_state(ARCH))
    for (name, got), want in zip(tuned.named_parameters(), params, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=2e-4, atol=1e-6, msg=name)
        assert not torch.equal(got.detach(), start[name]), name  # every layer moved: end to end


def load_state(arch):
    head, tail = build_parts(arch, "fc7")
    load_weights((head, tail), SHIPPED_WEIGHTS, seed=5)
    return [(n, p.detach().clone()) for n, p in torch.nn.Sequential(head, tail).named_parameters()]


def test_bad_fine_tune_input_is_a_clear_error(tmp_path):
    train, _ = _device(tmp_path)
    x = PRE.load(train)
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        fine_tune(SHIPPED_WEIGHTS, ARCH, x, np.full(len(x), 3), FineTuneConfig(epochs=1))
    with pytest.raises(ValueError, match="learning rate must be > 0"):
        FineTuneConfig(lr=0)


def test_hyperparameters_are_chosen_on_public_faces_never_the_device_test_set(tmp_path):
    assert TUNING_SEED not in {0, PUBLIC_SEED, VALIDATION_SEED, STRANGER_SEED}  # a public task of its own people
    cfg = ReferenceConfig(lrs=(1e-4, 3e-3), epochs=2, probe_cs=(1e-3, 1.0), tuning_identities=3, tuning_per_identity=8)
    cache = tmp_path / "tuning.json"
    messages: list[str] = []
    tuning = tune_reference(SHIPPED_WEIGHTS, ARCH, PRE, cfg, cache=cache, workdir=tmp_path / "public",
                            say=messages.append)  # fmt: skip
    assert [p.name for p in (tmp_path / "public").iterdir()] == [f"synthetic-3x8-64px-s{TUNING_SEED}"]
    fine, probe = tuning["fine_tune_public_accuracy"], tuning["probe_public_accuracy"]
    assert tuning["fine_tune_lr"] == max(cfg.lrs, key=lambda lr: (fine[str(lr)], -lr))
    assert tuning["probe_c"] == max(cfg.probe_cs, key=lambda c: (probe[str(c)], -c))
    # The device's data comes in only after the choice, and scoring it leaves the choice as it was, whatever
    # its test labels say (permuted here: the probe's figure moves, the choice does not).
    train, test = _device(tmp_path, per_identity=12)
    before = cache.read_bytes()
    right = reference_accuracies(SHIPPED_WEIGHTS, ARCH, PRE, train, test, tuning, cfg)
    relabelled = dataclasses.replace(test, labels=(test.labels + 1) % 3)
    wrong = reference_accuracies(SHIPPED_WEIGHTS, ARCH, PRE, train, relabelled, tuning, cfg)
    assert cache.read_bytes() == before and wrong != right
    again: list[str] = []
    assert tune_reference(SHIPPED_WEIGHTS, ARCH, PRE, cfg, cache=cache, workdir=tmp_path / "public",
                          say=again.append) == tuning and again == []  # fmt: skip
    # Another grid is another choice: the cache is keyed by it, and tuned again.
    other = ReferenceConfig(lrs=(3e-3,), epochs=2, probe_cs=(1.0,), tuning_identities=3, tuning_per_identity=8)
    tune_reference(SHIPPED_WEIGHTS, ARCH, PRE, other, cache=cache, workdir=tmp_path / "public", say=again.append)
    assert again and json.loads(cache.read_text())["fine_tune_lr"] == 3e-3


def test_the_shipped_tuning_is_the_one_the_demo_reads_for_the_shipped_weights():
    """The demo's preprocessing and default grid on the shipped weights find the shipped tuning (no retune)."""
    info = json.loads(tuning_path(SHIPPED_WEIGHTS).read_text())
    demo_arch = ArchConfig(image_size=64, width=0.25, num_classes=10, dropout=0.0)
    assert info["key"] == _key(SHIPPED_WEIGHTS, demo_arch, PRE, ReferenceConfig())
    assert info["key"]["weights_sha256"] == shipped_info()["sha256"]
    assert info["public_task"]["seed"] == TUNING_SEED and info["command"] == "python scripts/tune_reference.py"
    assert info["fine_tune_lr"] in ReferenceConfig().lrs and info["probe_c"] in ReferenceConfig().probe_cs
