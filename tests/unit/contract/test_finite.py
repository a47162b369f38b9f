"""dpa.base.finite.all_finite: the float64-sum shortcut agrees with np.isfinite, at the float32 extremes too."""

from __future__ import annotations

import numpy as np
import pytest

from dpa.base.finite import all_finite

F32_MAX = np.finfo(np.float32).max


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize(
    "values",
    [[0.0, 1.0], [F32_MAX] * 1000, [-F32_MAX, -F32_MAX], [np.nan, 1.0], [np.inf, 1.0], [np.inf, -np.inf], [-np.inf]],
)
def test_agrees_with_isfinite(dtype, values):
    with np.errstate(over="ignore"):
        a = np.array(values, dtype=np.float64).astype(dtype)
    assert all_finite(a) == bool(np.isfinite(a).all())


def test_integers_are_finite():
    assert all_finite(np.array([2**62, -(2**62)], dtype=np.int64))
