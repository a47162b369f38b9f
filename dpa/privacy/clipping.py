"""Per-example norm clipping of activations, and its vector-Jacobian products.

Pure math, no I/O, no torch. Axis 0 is the batch; each example's whole tensor
(all remaining axes) is one vector. Clipping bounds every example's norm by C,
so any two clipped activations differ by at most 2C: the sensitivity that the
noise of DP-A is calibrated to (Abadi et al., "Deep Learning with Differential
Privacy", CCS 2016, use the same per-example L2 clipping on gradients).

    L2:  y_i = x_i * min(1, C / ||x_i||_2)
    L1:  y_i = x_i * min(1, C / ||x_i||_1)

The backward pass of split training needs d loss / d x from d loss / d y; the
``*_vjp`` functions give it exactly (the Jacobian of the clipped branch is not
the identity times the factor).

Norms and dot products are accumulated in float64 (a conv1_1 activation at
224x224 is 3.2M floats per example) through small buffers or chunks, so no
float64 copy of the batch is ever made. Outputs keep the input's floating dtype (float32 in,
float32 out; non-float inputs become float64). An example whose norm is not
finite (NaN or inf anywhere in it) raises ValueError: passing it on would
release a data-dependent NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dpa.privacy import checks

__all__ = [
    "l2_norms",
    "l1_norms",
    "clip_factors",
    "scale_examples",
    "clip_l2",
    "clip_l2_vjp",
    "clip_l1",
    "clip_l1_vjp",
    "check_out",
    "row_dots",
]

#: Elements per chunk of |x| when summing L1 norms (4 MiB of float32).
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- helpers


def _clip_value(clip: object) -> float:
    return checks.positive_finite("clip", clip)


def _rows(x: np.ndarray, name: str = "x") -> np.ndarray:
    """(B, N) view (a copy only if ``x`` is not contiguous)."""
    if x.ndim < 1:
        raise ValueError(f"{name} needs a batch axis (ndim >= 1), got a scalar")
    return x.reshape(x.shape[0], -1)


def check_out(out: np.ndarray, size: int, dtype: np.dtype | type) -> None:
    """An ``out`` array must take the result as it is: a reshape of anything else would be a copy."""
    if out.size != size or out.dtype != dtype or not out.flags.c_contiguous:
        got = f"{out.dtype} {out.shape}{'' if out.flags.c_contiguous else ' (not C-contiguous)'}"
        raise ValueError(f"out must be a C-contiguous {np.dtype(dtype)} array of {size} elements, got {got}")


def _out_dtype(*arrays: np.ndarray) -> np.dtype:
    return np.result_type(*(a.dtype for a in arrays), np.float32)


def row_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row dot products of two (B, N) arrays, accumulated in float64.

    ``einsum`` with ``dtype=float64`` casts through small buffers: no float64
    copy of the inputs is made.
    """
    return np.einsum("ij,ij->i", a, b, dtype=np.float64)


def _check_finite(norms: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(norms)
    if bad.any():
        raise ValueError(
            f"{what} is not finite (NaN or inf in the activation) for example(s) {np.flatnonzero(bad)[:8].tolist()}"
        )


# --------------------------------------------------------------------------- norms and scaling


def l2_norms(x: np.ndarray) -> np.ndarray:
    """Per-example L2 norms ||x_i||_2 = sqrt(sum_j x_ij^2), shape (B,), float64."""
    r = _rows(np.asarray(x))
    return np.sqrt(row_dots(r, r))


def l1_norms(x: np.ndarray) -> np.ndarray:
    """Per-example L1 norms ||x_i||_1 = sum_j |x_ij|, shape (B,), float64."""
    r = _rows(np.asarray(x))
    out = np.zeros(r.shape[0], dtype=np.float64)
    for i in range(r.shape[0]):
        acc = 0.0
        for start in range(0, r.shape[1], _CHUNK):
            acc += float(np.abs(r[i, start : start + _CHUNK]).sum(dtype=np.float64))
        out[i] = acc
    return out


def clip_factors(norms: np.ndarray, *, clip: float) -> np.ndarray:
    """Clipping factors min(1, C / n_i), shape (B,), float64.

    n_i <= C (including n_i = 0) gives exactly 1, so zero vectors stay zero and
    nothing is divided by zero. Non-finite norms raise ValueError.
    """
    c = _clip_value(clip)
    n = np.asarray(norms, dtype=np.float64)
    _check_finite(n, "the norm")
    factors = np.ones_like(n)
    over = n > c
    factors[over] = c / n[over]
    return factors


def scale_examples(x: np.ndarray, factors: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """y_i = x_i * f_i for each example i: a new array of ``x``'s shape and float dtype, or ``out``.

    Each factor is rounded toward zero when cast to the output dtype. ``out`` (same size
    and dtype, C-contiguous) lets the device write its release straight into the message.
    """
    x = np.asarray(x)
    r = _rows(x)
    f = np.asarray(factors, dtype=np.float64)
    if f.shape != (r.shape[0],):
        raise ValueError(f"factors must have shape ({r.shape[0]},), got {f.shape}")
    dt = _out_dtype(x)
    f_dt = f.astype(dt)
    # Round factors toward zero in the output dtype, so a clipped norm can only
    # exceed C by the rounding of the products themselves (~1 ulp of dt).
    up = f_dt.astype(np.float64) > f
    f_dt[up] = np.nextafter(f_dt[up], dt.type(0))
    if out is None:
        return np.multiply(r, f_dt[:, None], dtype=dt).reshape(x.shape)
    check_out(out, r.size, dt)
    np.multiply(r, f_dt[:, None], out=out.reshape(r.shape))
    return out.reshape(x.shape)


# --------------------------------------------------------------------------- L2


def clip_l2(x: np.ndarray, *, clip: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-example L2 clipping: y_i = x_i * min(1, C / ||x_i||_2).

    Abadi et al. (CCS 2016), per-example clipping, applied here to activations
    (DP-A). Returns (y, factors) with factors of shape (B,), float64.
    Afterwards ||y_i||_2 <= C up to float rounding of y's dtype.
    """
    return _clip(x, clip, l2_norms)


def _clip(x: np.ndarray, clip: float, norm_of: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Both clippings: x_i * min(1, C / norm(x_i)), and the factors."""
    c = _clip_value(clip)
    x = np.asarray(x)
    factors = clip_factors(norm_of(x), clip=c)
    return scale_examples(x, factors), factors


def clip_l2_vjp(
    x: np.ndarray,
    grad: np.ndarray,
    *,
    clip: float,
    norms: np.ndarray | None = None,
    grad_scale: float = 1.0,
    out: np.ndarray | None = None,
    dots: np.ndarray | None = None,
) -> np.ndarray:
    """Vector-Jacobian product g^T dy/dx of :func:`clip_l2` at ``x``, for g = grad_scale * grad.

    With n = ||x_i||_2 per example:
        n <= C:  g                                   (y = x)
        n >  C:  (C/n) * (g - x (x . g) / n^2)       (y = C x / n)
    ``norms`` may pass ``l2_norms(x)`` when already known (saves a pass); ``grad_scale``
    is folded into the first pass instead of costing one of its own; ``out`` (x's shape,
    the result dtype) receives the result, so threads can each fill a slice of one array.
    ``dots`` may pass the per-example x . grad (float64) when known: then ``x``, ``grad``
    and ``out`` can be a slice of one example's elements, and threads split one example.
    """
    return _clip_vjp(x, grad, clip, norms, grad_scale, out, dots, l2_norms, "L2", _l2_correction)


def _l2_correction(x_i: np.ndarray, coef: float, norm: float, dt: np.dtype, row: np.ndarray | None) -> np.ndarray:
    """x (x . g) C / n^3: the part of the L2 VJP along x (``coef`` = (C/n) (x . g))."""
    return np.multiply(x_i, dt.type(coef / norm**2), out=row, dtype=dt)  # one scratch row, reused


def _clip_vjp(
    x: np.ndarray,
    grad: np.ndarray,
    clip: float,
    norms: np.ndarray | None,
    grad_scale: float,
    out: np.ndarray | None,
    dots: np.ndarray | None,
    norm_of: Callable[[np.ndarray], np.ndarray],
    name: str,
    correction: Callable[[np.ndarray, float, float, np.dtype, np.ndarray | None], np.ndarray],
) -> np.ndarray:
    """Both clipping VJPs: g for an example within the clip; (C/n) g - correction for one clipped,
    where the correction is (C/n) (x . g) (d n / d x) / n for its norm n."""
    c = _clip_value(clip)
    xr, gr, n, dt, out = _vjp_start(x, grad, norms, norm_of, name, grad_scale, out)
    row = None
    for i in np.flatnonzero(n > c):
        xg = _scaled_dot(xr, gr, i, grad_scale, dots)
        ni = float(n[i])
        scale = c / ni
        out[i] *= dt.type(scale)
        row = correction(xr[i], scale * xg, ni, dt, row)
        out[i] -= row
    return out.reshape(np.shape(x))


def _vjp_start(
    x: np.ndarray,
    grad: np.ndarray,
    norms: np.ndarray | None,
    norm_of: Callable[[np.ndarray], np.ndarray],
    name: str,
    grad_scale: float,
    out: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.dtype, np.ndarray]:
    """What both clipping VJPs start with: the checked (B, N) rows of x and grad, the norms,
    the result dtype, and the result's first pass, grad_scale * grad (into ``out`` if given)."""
    x, grad = np.asarray(x), np.asarray(grad)
    if grad.shape != x.shape:
        raise ValueError(f"grad shape {grad.shape} differs from x shape {x.shape}")
    xr, gr = _rows(x), _rows(grad, "grad")
    n = norm_of(x) if norms is None else np.asarray(norms, dtype=np.float64)
    if n.shape != (xr.shape[0],):
        raise ValueError(f"norms must have shape ({xr.shape[0]},), got {n.shape}")
    _check_finite(n, f"the {name} norm")
    dt = _out_dtype(x, grad)
    return xr, gr, n, dt, _scaled_copy(gr, dt, grad_scale, out)


def _scaled_dot(xr: np.ndarray, gr: np.ndarray, i: int, grad_scale: float, dots: np.ndarray | None) -> float:
    """grad_scale * (x_i . grad_i), or from ``dots`` when the caller computed it (one example split in parts)."""
    return grad_scale * float(row_dots(xr[i : i + 1], gr[i : i + 1])[0] if dots is None else dots[i])


def _scaled_copy(rows: np.ndarray, dt: np.dtype, factor: float, out: np.ndarray | None = None) -> np.ndarray:
    """factor * rows as a new (B, N) array of dtype dt, or written into ``out``."""
    if out is not None:
        check_out(out, rows.size, dt)
        target = out.reshape(rows.shape)
        if factor == 1.0:
            np.copyto(target, rows)
        else:
            np.multiply(rows, dt.type(factor), out=target)
        return target
    if factor == 1.0:
        return np.array(rows, dtype=dt, copy=True)
    return np.multiply(rows, dt.type(factor), dtype=dt)


# --------------------------------------------------------------------------- L1


def clip_l1(x: np.ndarray, *, clip: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-example L1 clipping: y_i = x_i * min(1, C / ||x_i||_1).

    Bounds the L1 sensitivity of the release by 2C, as the Laplace mechanism
    (Dwork, McSherry, Nissim and Smith, TCC 2006) needs. Returns (y, factors)
    with factors of shape (B,), float64.
    """
    return _clip(x, clip, l1_norms)


def clip_l1_vjp(
    x: np.ndarray,
    grad: np.ndarray,
    *,
    clip: float,
    norms: np.ndarray | None = None,
    grad_scale: float = 1.0,
    out: np.ndarray | None = None,
    dots: np.ndarray | None = None,
) -> np.ndarray:
    """Vector-Jacobian product g^T dy/dx of :func:`clip_l1` at ``x``, for g = grad_scale * grad.

    With s = ||x_i||_1 per example:
        s <= C:  g                                        (y = x)
        s >  C:  (C/s) * (g - sign(x) (x . g) / s)        (y = C x / s)
    (d s / d x = sign(x), taking sign(0) = 0 as torch and numpy do).
    ``norms``, ``grad_scale``, ``out`` and ``dots`` as for :func:`clip_l2_vjp`.
    """
    return _clip_vjp(x, grad, clip, norms, grad_scale, out, dots, l1_norms, "L1", _l1_correction)


def _l1_correction(x_i: np.ndarray, coef: float, norm: float, dt: np.dtype, row: np.ndarray | None) -> np.ndarray:
    """sign(x) (x . g) C / s^2: the part of the L1 VJP along sign(x) (``coef`` = (C/s) (x . g))."""
    return np.sign(x_i).astype(dt, copy=False) * dt.type(coef / norm)
