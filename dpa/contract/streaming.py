"""Reading an HTTP body into one buffer, without aiohttp's extra copy of it.

``read()`` on an aiohttp stream keeps every received chunk and joins them at the end:
a 100 MB activation batch then exists twice. With a Content-Length we allocate the
buffer once and copy each chunk into it as it arrives.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import StreamReader

from dpa.contract.buffers import BufferPool

__all__ = ["read_body", "write_chunks", "CHUNK"]

#: Bodies are written in slices of this size. Handing asyncio one 103 MB buffer makes its
#: transport copy what the socket does not take at once (most of it) into a buffer of its
#: own; slices written as the socket drains cost no copy (figures in BENCHMARKS.md).
CHUNK = 1 << 20


async def read_body(stream: StreamReader, length: int | None, pool: BufferPool | None = None) -> bytearray:
    """The whole body; ``length`` is the Content-Length (None: chunked, read the usual way).

    With ``pool`` the buffer may be a reused one (``dpa.contract.buffers``): every byte is written or this raises.
    """
    if length is None:
        return bytearray(await stream.read())
    buf = pool.take(length) if pool is not None else bytearray(length)
    view = memoryview(buf)
    pos = 0
    async for chunk in stream.iter_any():
        end = pos + len(chunk)
        if end > length:
            raise ValueError(f"body longer than its Content-Length ({length} bytes)")
        view[pos:end] = chunk
        pos = end
    if pos != length:
        raise ValueError(f"body ended after {pos} of {length} bytes")
    return buf


async def write_chunks(body: bytes | bytearray | memoryview) -> AsyncIterator[memoryview]:
    """The body as memoryview slices (no copies), for aiohttp to send one by one.

    Send with an explicit Content-Length, so the receiver can still read into one buffer.
    """
    view = memoryview(body).cast("B")
    for start in range(0, len(view), CHUNK):
        yield view[start : start + CHUNK]
