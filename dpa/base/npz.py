"""Arrays in a zip of ``.npy`` members, as ``numpy.savez`` writes them, but the same arrays always make the
same bytes (fixed member dates, the given order): an export's ``parameters.npz`` is hashed in its manifest,
and a device's checkpoint is compared byte for byte between runs. ``numpy.load`` reads them back."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping

import numpy as np

__all__ = ["npz_bytes"]

_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip's earliest date: no clock in the bytes


def npz_bytes(arrays: Mapping[str, np.ndarray], files: Mapping[str, bytes] | None = None) -> bytes:
    """``arrays`` as ``<name>.npy`` members, then ``files`` as they are, in the order given, uncompressed."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as z:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.require(array, requirements="C"), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH), buf.getvalue())
        for name, data in (files or {}).items():
            z.writestr(zipfile.ZipInfo(name, date_time=_EPOCH), data)
    return out.getvalue()
