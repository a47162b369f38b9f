"""dpa.contract.buffers: a pooled buffer is handed out again only once nothing else reads it."""

from __future__ import annotations

import numpy as np
import pytest

from dpa.contract import wire
from dpa.contract.buffers import BufferPool

MB = 1 << 20


def test_an_unreferenced_buffer_is_handed_out_again():
    pool = BufferPool(keep=2)
    first = pool.take(2 * MB)
    first_id = id(first)
    del first
    again = pool.take(2 * MB)
    assert id(again) == first_id and pool.reused == 1
    assert len(again) == 2 * MB


@pytest.mark.parametrize("reader", ["array", "memoryview"])
def test_a_buffer_still_read_is_never_handed_out(reader):
    pool = BufferPool(keep=2)
    first = pool.take(2 * MB)
    first[:4] = b"keep"
    view = np.frombuffer(first, dtype=np.uint8) if reader == "array" else memoryview(first)[:8]
    del first
    other = pool.take(2 * MB)
    other[:4] = b"over"
    assert bytes(view[:4]) == b"keep" and pool.reused == 0


def test_the_pool_keeps_at_most_keep_buffers_and_drops_the_oldest_unused():
    pool = BufferPool(keep=2)
    a, b = pool.take(2 * MB), pool.take(3 * MB)
    c = pool.take(4 * MB)  # both kept ones in use: c is not kept
    del c
    pool.take(4 * MB)
    assert pool.reused == 0
    del a
    d = pool.take(5 * MB)  # a (unused, another size) makes room for d
    d_id = id(d)
    del d
    d = pool.take(5 * MB)  # d was kept
    assert id(d) == d_id and pool.reused == 1
    pool.take(2 * MB)
    assert pool.reused == 1  # a was dropped
    assert len(b) == 3 * MB  # b, in use all along, was never handed out


def test_small_buffers_and_keep_zero_are_not_pooled():
    for pool, size in ((BufferPool(keep=2), MB - 1), (BufferPool(keep=0), 2 * MB)):
        first = pool.take(size)
        del first
        pool.take(size)
        assert pool.reused == 0


def test_a_reused_dirty_buffer_encodes_the_same_bytes_as_a_fresh_one():
    """Padding is written, not inherited: stale bytes must not leak into a message."""
    pool = BufferPool(keep=1)
    # 3 float32 and a 5-character name: both the tensor header and the data need padding.
    tensors = {"abcde": np.arange(3, dtype=np.float32), "big": np.ones((MB // 4,), dtype=np.float32)}
    size = wire.encoded_size(tensors, {"step": 1})
    dirty = pool.take(size)
    dirty[:] = b"\xff" * size
    del dirty
    pooled = wire.encode(tensors, {"step": 1}, pool)
    assert pool.reused == 1
    assert bytes(pooled) == bytes(wire.encode(tensors, {"step": 1}))
