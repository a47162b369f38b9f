"""The wire format: named tensors as raw little-endian bytes behind a small header.

Both the device client and the edge server import this module; ``docs/protocol.md``
specifies the same bytes for implementations in other languages. Tensor data is never
JSON or base64: a conv1_1 batch is ~100 MB and must cross as itself. A message is::

    header   16 bytes  magic b"DPAW", u16 version, u16 tensor count, u32 meta length, u32 reserved (0)
    meta     meta-length bytes of UTF-8 JSON (an object; small scalars only), then zero padding to 8
    tensor*  u16 name length, u8 dtype code, u8 ndim, name (ASCII), ndim x u32 dims,
             zero padding to 8, data (prod(dims) x itemsize bytes, C order, little-endian),
             zero padding to 8

All integers are little-endian. Offsets are relative to the message start, so every
tensor's data is 8-byte aligned and decodes without a copy.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dpa.contract.buffers import BufferPool
from dpa.contract.choices import Choice

__all__ = [
    "MAGIC",
    "VERSION",
    "CONTENT_TYPE",
    "DTYPE_CODES",
    "WireError",
    "ReleaseDtype",
    "Message",
    "encode",
    "allocate",
    "decode",
    "encoded_size",
    "pieces",
    "read_streamed",
]

MAGIC = b"DPAW"
VERSION = 1
CONTENT_TYPE = "application/x-dpa-tensors"
_HEADER = struct.Struct("<4sHHII")  # magic, version, count, meta_len, reserved
_TENSOR_HEADER = struct.Struct("<HBB")  # name_len, dtype code, ndim
#: Limits that keep a hostile header from making us allocate or loop: no real message comes close.
MAX_TENSORS = 16
MAX_NDIM = 8
MAX_NAME = 64
MAX_META = 64 * 1024
_ALIGN = 8

#: dtype code on the wire -> numpy dtype (always little-endian).
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f2"),
    3: np.dtype("<i8"),
    4: np.dtype("<i4"),
    5: np.dtype("u1"),
}
_CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}


class ReleaseDtype(Choice):
    """How a device's DP-A release (the ``activation`` tensor) travels.

    float16 halves the upload. The noise is added in float32 and the noisy release is then
    rounded: post-processing of a DP output, so it costs no privacy. A normalized release
    has RMS <= 1, far inside float16's range (65504); the device refuses to send one that
    would overflow. Replies stay float32: gradients per element are far smaller than
    float16's smallest normal number (6e-5).
    """

    FLOAT32 = "float32"
    FLOAT16 = "float16"

    @property
    def numpy(self) -> np.dtype:
        return np.dtype("<f4") if self is ReleaseDtype.FLOAT32 else np.dtype("<f2")


class WireError(ValueError):
    """A message that does not follow the format (the server answers 400)."""


@dataclass(frozen=True)
class Message:
    tensors: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def _meta_bytes(meta: Mapping[str, Any] | None) -> bytes:
    if not meta:
        return b""
    data = json.dumps(dict(meta), separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_META:
        raise WireError(f"metadata is {len(data)} bytes; the limit is {MAX_META}")
    return data


def _tensor_layout(name: str, shape: tuple[int, ...], dtype: np.dtype) -> tuple[bytes, int, np.dtype]:
    """The tensor's header bytes, its data size, and its little-endian dtype."""
    dtype = np.dtype(dtype)
    dtype = dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype
    if dtype not in _CODE_OF:
        raise WireError(f"tensor {name!r}: dtype {dtype} cannot be sent; valid: float32, float16, int64, int32, uint8")
    encoded = name.encode("ascii", errors="strict") if name.isascii() else b""
    if not encoded or len(encoded) > MAX_NAME:
        raise WireError(f"tensor name {name!r} must be 1..{MAX_NAME} ASCII characters")
    if len(shape) > MAX_NDIM:
        raise WireError(f"tensor {name!r} has {len(shape)} dimensions; the limit is {MAX_NDIM}")
    if any(d >= 2**32 for d in shape):
        raise WireError(f"tensor {name!r} has a dimension too large for the wire")
    head = _TENSOR_HEADER.pack(len(encoded), _CODE_OF[dtype], len(shape)) + encoded
    head += struct.pack(f"<{len(shape)}I", *shape)
    return head, math.prod(shape) * dtype.itemsize, dtype


Spec = tuple[tuple[int, ...], Any]  # (shape, dtype) of a tensor to be written in place


def _specs(tensors: Mapping[str, np.ndarray]) -> dict[str, Spec]:
    return {name: (np.shape(a), np.asarray(a).dtype) for name, a in tensors.items()}


def _size(specs: Mapping[str, Spec], meta_b: bytes) -> int:
    size = _HEADER.size + len(meta_b)
    size += _pad(size)
    for name, (shape, dtype) in specs.items():
        head, nbytes, _ = _tensor_layout(name, tuple(shape), dtype)
        size += len(head)
        size += _pad(size) + nbytes
        size += _pad(size)
    return size


def encoded_size(tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> int:
    """Bytes ``encode`` will produce (for framing-overhead figures and body-size limits)."""
    return _size(_specs(tensors), _meta_bytes(meta))


def allocate(
    specs: Mapping[str, Spec], meta: Mapping[str, Any] | None = None, pool: BufferPool | None = None
) -> tuple[bytearray, dict[str, np.ndarray]]:
    """A message buffer with every header and padding byte written, and writable arrays over its tensor slots.

    Lets a sender produce tensors straight into the message (the device writes each
    example's DP-A release into it) instead of building them and copying them in.
    With ``pool`` the buffer may be a reused one: the slots then hold stale bytes until
    the caller writes them, which it must, all of them.
    """
    if len(specs) > MAX_TENSORS:
        raise WireError(f"{len(specs)} tensors in one message; the limit is {MAX_TENSORS}")
    meta_b = _meta_bytes(meta)
    size = _size(specs, meta_b)
    out = pool.take(size) if pool is not None else bytearray(size)
    view = memoryview(out)

    def framing(pos: int, data: bytes) -> int:
        """Write ``data`` and zero padding to the next 8-byte boundary at ``pos``; the new position."""
        end = pos + len(data)
        view[pos:end] = data
        view[end : end + _pad(end)] = bytes(_pad(end))
        return end + _pad(end)

    pos = framing(0, _HEADER.pack(MAGIC, VERSION, len(specs), len(meta_b), 0) + meta_b)
    slots: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in specs.items():
        head, nbytes, le_dtype = _tensor_layout(name, tuple(shape), dtype)
        pos = framing(pos, head)
        slots[name] = np.frombuffer(view[pos : pos + nbytes], dtype=le_dtype).reshape(shape)
        pos = framing(pos + nbytes, b"")
    return out, slots


def pieces(specs: Mapping[str, Spec], meta: Mapping[str, Any] | None = None) -> tuple[int, list[bytes | str]]:
    """The message as a sequence to send in order: framing bytes, and tensor names where a
    tensor's data (exactly its C-order bytes) goes; and the total size.

    Lets a sender stream a message whose tensors it produces piece by piece (the device
    releases one example at a time while the request uploads) with the Content-Length known.
    """
    if len(specs) > MAX_TENSORS:
        raise WireError(f"{len(specs)} tensors in one message; the limit is {MAX_TENSORS}")
    meta_b = _meta_bytes(meta)
    out: list[bytes | str] = []
    head = _HEADER.pack(MAGIC, VERSION, len(specs), len(meta_b), 0) + meta_b
    head += bytes(_pad(len(head)))
    size = len(head)
    for name, (shape, dtype) in specs.items():
        tensor_head, nbytes, _ = _tensor_layout(name, tuple(shape), dtype)
        head += tensor_head + bytes(_pad(size + len(tensor_head)))
        size += len(tensor_head) + _pad(size + len(tensor_head))
        out += [head, name]
        size += nbytes
        head = bytes(_pad(size))
        size += len(head)
    out.append(head)
    return size, [piece for piece in out if piece != b""]


async def read_streamed(
    read: Callable[[int], Awaitable[bytes]],
    length: int,
    split: Mapping[str, int],
    on_part: Callable[[str, int, np.ndarray], None],
) -> Message:
    """Parse a message from ``read(n)`` (exactly n bytes) without holding it whole.

    A tensor named in ``split`` is read in that many equal parts along its first axis,
    each handed to ``on_part(name, index, part)`` and then dropped; it is absent from the
    returned message. The rest is decoded as by ``decode``.
    """
    pos = 0

    async def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > length:
            raise WireError(f"message truncated: {n} bytes wanted at offset {pos} of {length}")
        data = await read(n)
        pos += n
        return data

    magic, version, count, meta_len, reserved = _HEADER.unpack(await take(_HEADER.size))
    _check_header(magic, version, count, meta_len, reserved)
    meta = _parse_meta(await take(meta_len))
    await take(_pad(pos))
    tensors: dict[str, np.ndarray] = {}
    for index in range(count):
        name_len, code, ndim = _TENSOR_HEADER.unpack(await take(_TENSOR_HEADER.size))
        _check_tensor_header(index, name_len, code, ndim)
        rest = await take(name_len + 4 * ndim)
        name = _tensor_name(index, rest[:name_len])
        dims = struct.unpack_from(f"<{ndim}I", rest, name_len)
        await take(_pad(pos))
        dtype = DTYPE_CODES[code]
        nbytes = math.prod(dims) * dtype.itemsize
        parts = split.get(name)
        if parts and dims and dims[0] == parts:
            step = nbytes // parts
            for i in range(parts):
                on_part(name, i, np.frombuffer(await take(step), dtype=dtype).reshape(dims[1:]))
        else:
            tensors[name] = np.frombuffer(await take(nbytes), dtype=dtype).reshape(dims)
        await take(_pad(pos))
    if pos != length:
        raise WireError(f"{length - pos} unexpected bytes after the last tensor")
    return Message(tensors=tensors, meta=meta)


def encode(
    tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None, pool: BufferPool | None = None
) -> bytearray:
    """One buffer holding the message (from ``pool`` if given); each tensor's bytes are copied exactly once."""
    arrays = {name: np.asarray(a) for name, a in tensors.items()}
    out, slots = allocate(_specs(arrays), meta, pool)
    for name, array in arrays.items():
        slots[name][...] = array
    return out


def _check_header(magic: bytes, version: int, count: int, meta_len: int, reserved: int) -> None:
    if magic != MAGIC:
        raise WireError(f"bad magic {bytes(magic)!r}; expected {MAGIC!r} (is this a dpa tensor message?)")
    if version != VERSION:
        raise WireError(f"wire version {version} is not supported (this side speaks {VERSION})")
    if reserved != 0:
        raise WireError("reserved header field must be 0")
    if count > MAX_TENSORS:
        raise WireError(f"{count} tensors in one message; the limit is {MAX_TENSORS}")
    if meta_len > MAX_META:
        raise WireError(f"metadata length {meta_len} exceeds the limit {MAX_META}")


def _parse_meta(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"metadata is not UTF-8 JSON: {exc}") from None
    except RecursionError:  # "[[[[..." 64 KiB deep: found by the fuzz test
        raise WireError("metadata is nested too deeply") from None
    if not isinstance(meta, dict):
        raise WireError("metadata must be a JSON object")
    return meta


def _check_tensor_header(index: int, name_len: int, code: int, ndim: int) -> None:
    if not 1 <= name_len <= MAX_NAME:
        raise WireError(f"tensor {index}: name length {name_len} outside 1..{MAX_NAME}")
    if ndim > MAX_NDIM:
        raise WireError(f"tensor {index}: {ndim} dimensions; the limit is {MAX_NDIM}")
    if code not in DTYPE_CODES:
        raise WireError(f"tensor {index}: unknown dtype code {code}; valid: {sorted(DTYPE_CODES)}")


def _tensor_name(index: int, raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise WireError(f"tensor {index}: name is not ASCII") from None


def decode(buffer: bytes | bytearray | memoryview) -> Message:
    """Parse a message. Arrays are read-only views into ``buffer`` (no copy).

    Raises WireError naming what is wrong: magic, version, truncation, trailing bytes,
    dtype, dimensions, duplicate names, metadata.
    """
    view = memoryview(buffer).cast("B")
    total = len(view)
    if total < _HEADER.size:
        raise WireError(f"message is {total} bytes; a header alone is {_HEADER.size}")
    magic, version, count, meta_len, reserved = _HEADER.unpack_from(view, 0)
    _check_header(magic, version, count, meta_len, reserved)
    pos = _HEADER.size
    if pos + meta_len > total:
        raise WireError("message truncated inside the metadata")
    meta = _parse_meta(bytes(view[pos : pos + meta_len]))
    pos += meta_len
    pos += _pad(pos)
    tensors: dict[str, np.ndarray] = {}
    for index in range(count):
        if pos + _TENSOR_HEADER.size > total:
            raise WireError(f"message truncated in the header of tensor {index}")
        name_len, code, ndim = _TENSOR_HEADER.unpack_from(view, pos)
        pos += _TENSOR_HEADER.size
        _check_tensor_header(index, name_len, code, ndim)
        end_of_header = pos + name_len + 4 * ndim
        if end_of_header > total:
            raise WireError(f"message truncated in the header of tensor {index}")
        name = _tensor_name(index, bytes(view[pos : pos + name_len]))
        if name in tensors:
            raise WireError(f"tensor {name!r} appears twice")
        dims = struct.unpack_from(f"<{ndim}I", view, pos + name_len)
        pos = end_of_header + _pad(end_of_header)
        dtype = DTYPE_CODES[code]
        nbytes = math.prod(dims) * dtype.itemsize
        if pos + nbytes > total:
            raise WireError(f"message truncated in the data of tensor {name!r} ({nbytes} bytes announced)")
        try:
            tensors[name] = np.frombuffer(view[pos : pos + nbytes], dtype=dtype).reshape(dims)
        except ValueError:  # a zero dimension beside dimensions whose product overflows
            raise WireError(f"tensor {name!r}: dimensions {list(dims)} are too large") from None
        pos += nbytes
        pos += _pad(pos)
    if pos != total:
        raise WireError(f"{total - pos} unexpected bytes after the last tensor")
    return Message(tensors=tensors, meta=meta)
