"""The wire format: exact bytes, round trips, overhead, and every malformed message."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpa.contract import wire
from dpa.contract.wire import WireError, decode, encode, encoded_size


def test_pinned_bytes_of_a_small_message():
    msg = encode({"x": np.array([1.0, -2.0], dtype=np.float32)}, {"step": 1})
    meta = b'{"step":1}'
    expected = (
        b"DPAW"
        + struct.pack("<HHII", 1, 1, len(meta), 0)
        + meta
        + b"\0" * 6  # header 16 + meta 10, pad to 32
        + struct.pack("<HBB", 1, 1, 1)
        + b"x"
        + struct.pack("<I", 2)  # 4 + 1 + 4 = 9 bytes, at 32..41
        + b"\0" * 7  # pad to 48
        + struct.pack("<2f", 1.0, -2.0)  # 8 bytes of data
    )
    assert bytes(msg) == expected


def test_round_trip_keeps_dtype_shape_values_and_meta():
    rng = np.random.default_rng(0)
    tensors = {
        "activation": rng.standard_normal((3, 4, 5, 6), dtype=np.float32),
        "labels": np.array([0, 5, 2], dtype=np.int64),
        "half": rng.standard_normal((7,)).astype(np.float16),
        "scalar": np.float32(2.5),
        "empty": np.zeros((0, 3), dtype=np.int32),
        "bytes": np.arange(5, dtype=np.uint8),
    }
    msg = decode(encode(tensors, {"global_step": 9}))
    assert msg.meta == {"global_step": 9}
    assert list(msg.tensors) == list(tensors)
    for name, array in tensors.items():
        got = msg.tensors[name]
        assert got.dtype == np.asarray(array).dtype and got.shape == np.asarray(array).shape
        np.testing.assert_array_equal(got, array)
        assert got.ctypes.data % 8 == 0 or got.size == 0  # aligned, decoded without a copy


def test_framing_overhead_is_far_below_one_percent_at_batch_8():
    act = np.zeros((8, 16, 64, 64), dtype=np.float32)  # a small conv1_1 batch
    labels = np.zeros(8, dtype=np.int64)
    size = encoded_size({"activation": act, "labels": labels})
    overhead = size / (act.nbytes + labels.nbytes) - 1
    assert overhead < 1e-3
    print(f"wire overhead at batch 8, 16x64x64: {overhead:.2e}")


@given(
    shape=st.lists(st.integers(0, 5), max_size=4),
    dtype=st.sampled_from(["<f4", "<f2", "<i8", "<i4", "u1"]),
    meta=st.dictionaries(st.text(max_size=5), st.integers(-5, 5), max_size=3),
)
@settings(max_examples=60, deadline=None)
def test_round_trip_property(shape, dtype, meta):
    array = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    msg = decode(encode({"t": array}, meta))
    np.testing.assert_array_equal(msg.tensors["t"], array)
    assert msg.meta == meta


def _good() -> bytes:
    return bytes(encode({"a": np.ones((2, 2), np.float32)}))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:10], "a header alone is 16"),
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: b[:4] + struct.pack("<H", 2) + b[6:], "wire version 2 is not supported"),
        (lambda b: b[:-1], "truncated in the data of tensor 'a'"),
        (lambda b: b + b"\0" * 8, "8 unexpected bytes after the last tensor"),
        (lambda b: b[:6] + struct.pack("<H", 99) + b[8:], "99 tensors in one message"),
        (lambda b: b[:16] + struct.pack("<HBB", 1, 42, 2) + b[20:], "unknown dtype code 42"),
        (lambda b: b[:16] + struct.pack("<HBB", 1, 1, 9) + b[20:], "9 dimensions"),
        (lambda b: b[:8] + struct.pack("<I", 1000) + b[12:], "truncated inside the metadata"),
        (lambda b: b[:12] + struct.pack("<I", 1) + b[16:], "reserved header field must be 0"),
    ],
)
def test_malformed_messages_are_named(mutate, message):
    with pytest.raises(WireError, match=message):
        decode(mutate(_good()))


def test_duplicate_names_and_bad_meta():
    one = _good()
    # Build a two-tensor message whose second tensor reuses the first's name.
    two = bytearray(encode({"a": np.ones((2, 2), np.float32), "b": np.ones((2, 2), np.float32)}))
    idx = two.index(b"b", 40)
    two[idx : idx + 1] = b"a"
    with pytest.raises(WireError, match="tensor 'a' appears twice"):
        decode(bytes(two))
    bad_meta = b"DPAW" + struct.pack("<HHII", 1, 0, 3, 0) + b"[1]" + b"\0" * 5
    with pytest.raises(WireError, match="metadata must be a JSON object"):
        decode(bad_meta)
    assert decode(one).tensors["a"].shape == (2, 2)


def test_encode_refuses_what_cannot_travel():
    with pytest.raises(WireError, match="dtype float64 cannot be sent"):
        encode({"x": np.zeros(2)})
    with pytest.raises(WireError, match="must be 1..64 ASCII characters"):
        encode({"é": np.zeros(2, np.float32)})
    with pytest.raises(ValueError):
        encode({"x": np.zeros(2, np.float32)}, {"bad": float("nan")})
    assert wire.CONTENT_TYPE == "application/x-dpa-tensors"
