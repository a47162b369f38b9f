"""Per-example clipping and its VJPs, checked against torch autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpa.privacy.clipping import (
    clip_factors,
    clip_l1,
    clip_l1_vjp,
    clip_l2,
    clip_l2_vjp,
    l1_norms,
    l2_norms,
)

C = 3.0


def _mixed_batch(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A batch whose examples have norms well below, around and above C (both norms)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    per_example = int(np.prod(shape[1:]))
    # Spread L2 norms over ~[0.03, 30] x C, so L1 norms spread too.
    scales = np.geomspace(0.01, 10.0, shape[0]) * C / np.sqrt(per_example)
    return (x * scales.reshape((-1,) + (1,) * (len(shape) - 1))).astype(np.float32)


def _torch_clip(x: torch.Tensor, ord_: int) -> torch.Tensor:
    norms = x.flatten(1).norm(p=ord_, dim=1)
    factor = torch.clamp(C / norms, max=1.0)
    return x * factor.reshape((-1,) + (1,) * (x.dim() - 1))


SHAPES = [(6, 10), (7, 3, 5, 4), (5, 2, 3, 3, 2)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("ord_", "clip", "vjp"), [(2, clip_l2, clip_l2_vjp), (1, clip_l1, clip_l1_vjp)])
def test_forward_and_vjp_match_torch_autograd(shape, ord_, clip, vjp) -> None:
    x = _mixed_batch(shape)
    g = np.random.default_rng(1).standard_normal(shape).astype(np.float32)

    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = _torch_clip(xt, ord_)
    (yt * torch.tensor(g, dtype=torch.float64)).sum().backward()

    y, factors = clip(x, clip=C)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert factors.shape == (shape[0],)
    torch_factors = torch.clamp(C / xt.detach().flatten(1).norm(p=ord_, dim=1), max=1.0).numpy()
    np.testing.assert_allclose(factors, torch_factors, rtol=1e-6)
    # The batch really mixes clipped and unclipped examples.
    assert 0 < (factors < 1).sum() < shape[0]
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5, atol=1e-7)

    grad = vjp(x, g, clip=C)
    assert grad.dtype == np.float32 and grad.shape == x.shape
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-4, atol=1e-6)
    # Unclipped examples pass the gradient through unchanged.
    np.testing.assert_array_equal(grad[factors == 1], g[factors == 1])


@pytest.mark.parametrize(("ord_", "clip"), [(2, clip_l2), (1, clip_l1)])
def test_norms_after_clipping_are_at_most_c(ord_, clip) -> None:
    x = _mixed_batch((16, 4, 8, 8), seed=3) * np.float32(50.0)
    y, _ = clip(x, clip=C)
    norms = np.linalg.norm(y.reshape(16, -1).astype(np.float64), ord=ord_, axis=1)
    assert np.all(norms <= C * (1 + 1e-6))
    # Clipped ones sit on the sphere; unclipped ones are unchanged.
    x_norms = np.linalg.norm(x.reshape(16, -1).astype(np.float64), ord=ord_, axis=1)
    np.testing.assert_allclose(norms[x_norms > C], C, rtol=1e-6)
    np.testing.assert_array_equal(y[x_norms <= C], x[x_norms <= C])


@pytest.mark.parametrize(("clip", "vjp"), [(clip_l2, clip_l2_vjp), (clip_l1, clip_l1_vjp)])
def test_zero_example_stays_zero(clip, vjp) -> None:
    x = np.zeros((3, 2, 4), dtype=np.float32)
    x[1] = 100.0  # one clipped example beside the zeros
    with np.errstate(all="raise"):
        y, factors = clip(x, clip=C)
        g = np.ones_like(x)
        grad = vjp(x, g, clip=C)
    assert np.all(y[0] == 0) and np.all(y[2] == 0)
    assert factors[0] == 1.0 and factors[2] == 1.0 and factors[1] < 1
    np.testing.assert_array_equal(grad[0], g[0])


def test_norms_accumulate_in_float64() -> None:
    # 2**22 copies of 0.1f: float32 accumulation would be off by ~1e-3 relative.
    x = np.full((2, 1 << 22), 0.1, dtype=np.float32)
    v = float(np.float32(0.1))
    np.testing.assert_allclose(l2_norms(x), np.sqrt((1 << 22) * v * v), rtol=1e-12)
    np.testing.assert_allclose(l1_norms(x), (1 << 22) * v, rtol=1e-12)


def test_float64_input_stays_float64() -> None:
    x = _mixed_batch((4, 5)).astype(np.float64)
    y, _ = clip_l2(x, clip=C)
    assert y.dtype == np.float64


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_clip_rejected(bad) -> None:
    with pytest.raises(ValueError, match="clip must"):
        clip_l2(np.ones((2, 3), np.float32), clip=bad)


def test_non_finite_activation_rejected() -> None:
    x = np.ones((3, 4), np.float32)
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"not finite .* example\(s\) \[2\]"):
        clip_l2(x, clip=C)
    x[2, 1] = np.inf
    with pytest.raises(ValueError, match="not finite"):
        clip_l1(x, clip=C)
    with pytest.raises(ValueError, match="not finite"):
        clip_factors(np.array([1.0, np.nan]), clip=C)


def test_vjp_shape_mismatch_rejected() -> None:
    with pytest.raises(ValueError, match="grad shape"):
        clip_l2_vjp(np.ones((2, 3), np.float32), np.ones((2, 4), np.float32), clip=C)


def test_vjp_accepts_precomputed_norms() -> None:
    x = _mixed_batch((6, 10))
    g = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    np.testing.assert_array_equal(clip_l2_vjp(x, g, clip=C, norms=l2_norms(x)), clip_l2_vjp(x, g, clip=C))
    np.testing.assert_array_equal(clip_l1_vjp(x, g, clip=C, norms=l1_norms(x)), clip_l1_vjp(x, g, clip=C))
