"""The tail's child process: steps through shared memory equal steps through the pipe."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from dpa.contract.devices import resolve_device
from dpa.contract.manifest import load_manifest
from runtime_server import shared_arrays
from runtime_server.shared_arrays import SharedStep, StepLayout
from runtime_server.tail import NonFiniteStep, TailModel
from runtime_server.tail_worker import TailWorker


def _batch(manifest, batch: int, seed: int = 0):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    act = rng.standard_normal((batch, *manifest.activation_shape), dtype=np.float32)
    return act, rng.integers(0, manifest.num_classes, batch).astype(np.int64)


def test_shared_memory_steps_equal_in_process_steps(small_export, tmp_path):
    """Two steps and an eval through the worker match the same calls on an in-process TailModel, bit for bit."""
    manifest = load_manifest(small_export)
    device = resolve_device("cpu")
    reference = TailModel(small_export, manifest, device, tmp_path / "ref")
    worker = TailWorker(small_export, manifest, device, tmp_path / "shm", max_batch=4)
    try:
        assert worker._shared is not None
        name = worker._shared.name
        for seed, batch in ((0, 4), (1, 3)):  # a full batch, then a smaller one in the same segment
            act, labels = _batch(manifest, batch, seed)
            want = reference.train_step(act, labels)
            got = worker.train_step(act, labels)
            assert got.loss == want.loss
            np.testing.assert_array_equal(got.activation_gradient, want.activation_gradient)
            np.testing.assert_array_equal(got.logits, want.logits)
            assert got.activation_gradient.shape == (batch, *manifest.activation_shape)
            assert (worker.global_step, worker.examples_seen) == (reference.global_step, reference.examples_seen)
        act, _ = _batch(manifest, 2, 5)
        np.testing.assert_array_equal(worker.eval_step(act), reference.eval_step(act))
        want_params, got_params = reference.parameters(), worker.parameters()
        assert want_params.keys() == got_params.keys()
        for key in want_params:
            np.testing.assert_array_equal(got_params[key], want_params[key])
    finally:
        worker.close()
    assert not Path(f"/dev/shm/{name}").exists()  # the server unlinks its segment


def test_batch_beyond_the_segment_and_no_shared_memory_use_the_pipe(small_export, tmp_path, monkeypatch, caplog):
    manifest = load_manifest(small_export)
    device = resolve_device("cpu")
    reference = TailModel(small_export, manifest, device, tmp_path / "ref")
    small = TailWorker(small_export, manifest, device, tmp_path / "small", max_batch=2)
    monkeypatch.setattr(shared_arrays, "shm_room", lambda: 1024)  # a container's tiny /dev/shm
    with caplog.at_level(logging.WARNING):
        piped = TailWorker(small_export, manifest, device, tmp_path / "piped", max_batch=4)
    try:
        assert piped._shared is None
        assert "shared memory too small" in caplog.text
        act, labels = _batch(manifest, 3)  # e.g. a journal entry written under a larger --max-batch
        want = reference.train_step(act, labels)
        for worker in (small, piped):
            got = worker.train_step(act, labels)
            np.testing.assert_array_equal(got.activation_gradient, want.activation_gradient)
            assert got.loss == want.loss
    finally:
        small.close()
        piped.close()


def test_non_finite_step_through_shared_memory_is_refused_and_changes_nothing(small_export, tmp_path):
    manifest = load_manifest(small_export)
    worker = TailWorker(small_export, manifest, resolve_device("cpu"), tmp_path / "w", max_batch=2)
    try:
        before = worker.parameters()
        act, labels = _batch(manifest, 2)
        act[0, 0, 0, 0] = np.inf  # the server refuses this up front; the tail must refuse it too
        with pytest.raises(NonFiniteStep):
            worker.train_step(act, labels)
        after = worker.parameters()
        assert all(np.array_equal(before[k], after[k]) for k in before)
        assert worker.global_step == 0
    finally:
        worker.close()


def test_layout_is_aligned_and_disjoint():
    layout = StepLayout(max_batch=3, activation_shape=(5, 7, 7), num_classes=11)
    segment = SharedStep(layout)
    try:
        spans = []
        base = np.frombuffer(segment._shm.buf, dtype=np.uint8).ctypes.data
        for name, shape, dtype in layout.specs():
            array = segment.arrays[name]
            assert array.shape == shape and array.dtype == dtype and array.flags.c_contiguous
            start = array.ctypes.data - base
            assert start % 64 == 0
            spans.append((start, start + array.nbytes))
        spans.sort()
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))
        assert spans[-1][1] == layout.nbytes <= segment._shm.size
        assert os.path.exists(f"/dev/shm/{segment.name}")
    finally:
        segment.close()
    assert not os.path.exists(f"/dev/shm/{segment.name}")
