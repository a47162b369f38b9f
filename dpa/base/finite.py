"""Whether an array holds only numbers: the check every tensor from the other side gets.

Both sides receive tensors they must not trust (the server the device's activations,
the device the server's gradients) and a single NaN would poison every weight it
reaches. For float32 the check is one float64 sum: no float32 values can make it
overflow (at most 2**128 each, and 2**128 times any count numpy can hold stays far
below float64's 2**1024), so it is finite exactly when every element is. One pass and
no boolean temporary of a 100 MB batch.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["all_finite"]


def all_finite(array: np.ndarray) -> bool:
    """True when no element is NaN or infinite."""
    a = np.asarray(array)
    if a.dtype in (np.float32, np.float16):
        with np.errstate(invalid="ignore"):  # inf + -inf is NaN: an answer here, not a warning
            return math.isfinite(float(np.sum(a, dtype=np.float64)))
    if not np.issubdtype(a.dtype, np.inexact):
        return True  # integers are always numbers
    return bool(np.isfinite(a).all())
