"""DP-A on the device: clip each example's activation, add calibrated noise, and
pass the server's gradient back through the clipping.

Pure math, no I/O, no torch. One :class:`DPActivations` wraps one
:class:`DPConfig` and one injected ``numpy.random.Generator``:

    release:   a_i  ->  y_i = clip(a_i) + z_i,   z_i i.i.d. per element
    backward:  d loss / d y  ->  d loss / d a = VJP of clip at a  (dy/dclip = I)

Guarantee (per release of one batch): replacing one example changes its clipped
activation by at most 2C in the clipping norm and leaves the others unchanged,
so with sensitivity D = 2C

* Gaussian: clip in L2, z ~ N(0, sigma^2), sigma from the analytic Gaussian
  mechanism (Balle and Wang, ICML 2018), gives (epsilon, delta)-DP;
* Laplace: clip in L1, z ~ Laplace(0, b), b = D / epsilon (Dwork, McSherry,
  Nissim and Smith, TCC 2006), gives (epsilon, 0)-DP.

Each training step is one more release of each example in the batch: the
total privacy loss over training is a composition, which is not tracked here.
The noise comes from AES-128 in counter mode, a cryptographically secure
generator (``noise_source``), and is drawn in float32; each noisy value is then rounded
to a power-of-two grid far below the noise scale (``snap_step``), so the low
bits a floating-point attack on the sampler reads (Mironov, CCS 2012) are
gone. Rounding a DP output is post-processing: it costs no privacy.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

import numpy as np

from dpa.contract.choices import Choice
from dpa.contract.errors import UserError
from dpa.privacy import checks
from dpa.privacy.calibration import gaussian_sigma, laplace_scale
from dpa.privacy.clipping import (
    check_out,
    clip_factors,
    clip_l1_vjp,
    clip_l2_vjp,
    l1_norms,
    l2_norms,
    row_dots,
    scale_examples,
)
from dpa.privacy.noise_source import secure_generator

__all__ = [
    "Mechanism",
    "DPConfig",
    "ReleaseContext",
    "ReleaseStats",
    "DPActivations",
    "noise_scale_for",
    "snap_step",
    "NOISE_STREAMS",
    "noise_stream_bounds",
]

#: A release's noise comes from this many independent streams, each filling one contiguous
#: part of the flattened release. Fixed, so a seeded run draws the same noise on any machine;
#: the streams run on up to this many threads (numpy's generators release the GIL), so the
#: noise of a paper-size batch uses every core.
NOISE_STREAMS = 8
#: Noisy values are rounded to multiples of 2^(floor(log2(noise scale)) - this): a grid 2^12 to 2^13
#: times finer than the noise (its rounding error is ~1e-4 of the noise's std, nothing for learning),
#: and, for values within 2^10 noise scales of zero, coarser than float32's own spacing, so that no
#: sub-grid bit of the sampler's arithmetic survives in the release.
SNAP_BITS = 12
#: Each stream draws in blocks of this many elements (a small float32 scratch buffer per
#: stream, never a full-batch noise array).
_NOISE_BLOCK = 1 << 18
#: Releases and VJPs smaller than this (elements) run on the calling thread: handing them out costs more.
_PARALLEL_MIN = 2 * _NOISE_BLOCK
_POOL: ThreadPoolExecutor | None = None
T = TypeVar("T")
_WORKERS = min(NOISE_STREAMS, os.cpu_count() or 1)


def _pool() -> ThreadPoolExecutor | None:
    """Threads for the noise streams and the VJP; None on a single core (work then runs in turn)."""
    global _POOL
    if _WORKERS < 2:
        return None
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="dpa-noise")
    return _POOL


def _spans(size: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of ``parts`` near-equal consecutive parts of range(size)."""
    edges = [size * k // parts for k in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _on_threads(pool: ThreadPoolExecutor, fn: Callable[..., T], calls: Iterable[tuple[int, ...]]) -> list[T]:
    """fn(*args) for every args in ``calls``, in parallel; the results in call order."""
    return [future.result() for future in [pool.submit(fn, *args) for args in calls]]


def snap_step(noise_scale: float) -> float:
    """The grid a release is rounded to: the power of two 2^(floor(log2 noise_scale) - SNAP_BITS)."""
    return math.ldexp(1.0, math.frexp(noise_scale)[1] - 1 - SNAP_BITS)


def noise_stream_bounds(size: int) -> list[tuple[int, int]]:
    """[start, end) of each stream's part of a flattened release of ``size`` elements."""
    return _spans(size, NOISE_STREAMS)


class Mechanism(Choice):
    GAUSSIAN = "gaussian"  # L2 clipping + N(0, sigma^2) per element: (epsilon, delta)-DP
    LAPLACE = "laplace"  # L1 clipping + Laplace(0, b) per element: (epsilon, 0)-DP


def noise_scale_for(*, noise_multiplier: float, clip: float, mechanism: Mechanism | str) -> float:
    """The noise scale to put into the mechanism for noise multiplier z and clip C.

    gaussian: sigma = z * 2C (the standard deviation of the Gaussian noise);
    laplace:  b = z * 2C / sqrt(2) (the Laplace scale; its std is sqrt(2) b = z * 2C).
    """
    mech = Mechanism.parse(mechanism)
    std = checks.noise_multiplier(noise_multiplier) * 2.0 * checks.positive_finite("clip", clip)
    return std if mech is Mechanism.GAUSSIAN else std / math.sqrt(2.0)


@dataclass(frozen=True)
class DPConfig:
    """What the device's DP-A release is calibrated to. Validated on construction."""

    # Gaussian: the analytic Gaussian mechanism is exact for L2-clipped tensors and
    # adds far less noise per element than Laplace on high-dimensional activations.
    mechanism: Mechanism = Mechanism.GAUSSIAN
    # C, the per-example norm bound of the activation (L2 for gaussian, L1 for
    # laplace); 1.0 suits normalised activations, rescale to the cut's typical norm.
    clip: float = 1.0
    # Privacy loss of one release of one example; math.inf sends without noise
    # (clipping only, no privacy) and makes DPActivations warn. None: not chosen here but planned
    # from a whole-run budget (dpa.privacy.release_plan, which fills it in with the noise multiplier).
    epsilon: float | None = 1.0
    # Gaussian only (Laplace is pure epsilon-DP and ignores it); 1e-5 is the usual
    # choice for data sets of up to ~1e5 examples (delta should be << 1/n).
    delta: float = 1e-5
    # Multiply each release by the public constant 1 / sqrt(noise_std^2 + C^2 / d)
    # (d = elements per example), so the server's network sees unit-scale inputs at
    # every epsilon instead of inputs that grow with the noise and blow training up.
    # A data-independent rescaling is post-processing: it costs no privacy.
    normalize: bool = True
    # Set by `--total-epsilon`: the noise multiplier (noise std / 2C) that dp-accounting calibrated
    # for the whole run replaces the per-release calibration; `epsilon` then holds what one
    # release at that noise costs, for display.
    fixed_noise_multiplier: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mechanism", Mechanism.parse(self.mechanism))
        clip = checks.positive_finite("clip", self.clip)
        eps = None if self.epsilon is None else checks.epsilon(self.epsilon, allow_inf=True)
        laplace = self.mechanism is Mechanism.LAPLACE
        delta = checks.delta(self.delta, allow_zero=laplace, mechanism=self.mechanism.value)
        if self.fixed_noise_multiplier is not None:
            checks.positive_finite("fixed noise multiplier", self.fixed_noise_multiplier)
        object.__setattr__(self, "clip", clip)
        object.__setattr__(self, "epsilon", eps)
        object.__setattr__(self, "delta", delta)

    @property
    def sensitivity(self) -> float:
        """2C: two clipped activations differ by at most 2C in the clipping norm.

        (L2 sensitivity for gaussian, L1 sensitivity for laplace; as ||v||_2 <=
        ||v||_1 it is also an L2 bound for laplace.)
        """
        return 2.0 * self.clip

    @cached_property
    def noise_scale(self) -> float:
        """sigma (gaussian, via gaussian_sigma) or b (laplace, via laplace_scale); 0 if epsilon = inf.

        With ``fixed_noise_multiplier`` z: sigma = 2C z, or b = 2C z / sqrt(2) (Laplace's std is sqrt(2) b).
        """
        if self.epsilon is None and self.fixed_noise_multiplier is None:
            raise ValueError("this DPConfig has no noise yet: plan it from its budget (dpa.privacy.release_plan)")
        if self.fixed_noise_multiplier is not None:
            return noise_scale_for(
                noise_multiplier=self.fixed_noise_multiplier, clip=self.clip, mechanism=self.mechanism
            )
        if self.mechanism is Mechanism.GAUSSIAN:
            return gaussian_sigma(epsilon=self.epsilon, delta=self.delta, sensitivity=self.sensitivity)
        return laplace_scale(epsilon=self.epsilon, sensitivity=self.sensitivity)

    @property
    def noise_std(self) -> float:
        """Per-element noise standard deviation: sigma (gaussian) or sqrt(2) b (laplace)."""
        if self.mechanism is Mechanism.GAUSSIAN:
            return self.noise_scale
        return math.sqrt(2.0) * self.noise_scale

    def release_scale(self, elements: int) -> float:
        """The public factor a release is multiplied by (1.0 when ``normalize`` is off).

        s = 1 / sqrt(noise_std^2 + C^2 / d): the RMS per element of a clipped activation
        is at most C / sqrt(d) and the noise adds noise_std, so s * release has RMS <= 1.
        """
        if not self.normalize:
            return 1.0
        return 1.0 / math.sqrt(self.noise_std**2 + self.clip**2 / max(elements, 1))

    @property
    def noise_multiplier(self) -> float:
        """Noise std / (2C): sigma / 2C for gaussian, sqrt(2) b / 2C for laplace.

        Comparable across mechanisms as the per-element noise relative to the
        largest change one example can make (2C); 0 when epsilon = inf. With
        ``fixed_noise_multiplier`` (``--total-epsilon``) it is that number, not a round trip through sigma.
        """
        if self.fixed_noise_multiplier is not None:
            return self.fixed_noise_multiplier
        return self.noise_std / self.sensitivity


@dataclass(frozen=True, eq=False)
class ReleaseContext:
    """What :meth:`DPActivations.backward` needs from one release.

    Holds a *reference* to the pre-clip activation (not a copy): do not modify
    it between release and backward. ``norms`` are pre-clip and so are not
    private: use them on the device only (progress display), never send them.
    """

    activation: np.ndarray  # pre-clip activation, batch axis 0
    norms: np.ndarray  # (B,) float64 pre-clip norms in the clipping norm (L2 or L1)
    factors: np.ndarray  # (B,) float64 clip factors min(1, C / norm)
    clip: float  # C used
    mechanism: Mechanism  # which norm was clipped (gaussian: L2, laplace: L1)
    scale: float = 1.0  # public factor the release was multiplied by (DPConfig.release_scale)

    @property
    def clipped(self) -> np.ndarray:
        """(B,) bool: which examples were scaled down."""
        return self.factors < 1.0

    @property
    def fraction_clipped(self) -> float:
        """Fraction of the batch whose norm exceeded C (0.0 for an empty batch)."""
        return float(self.clipped.mean()) if self.factors.size else 0.0


@dataclass(frozen=True)
class ReleaseStats:
    """Scalars for a progress display (no tensors); device-local, not private."""

    batch_size: int
    fraction_clipped: float
    mean_norm: float  # mean pre-clip norm in the clipping norm
    max_norm: float


class DPActivations:
    """Clip + noise on release, clipping VJP on backward, for one DPConfig and rng."""

    def __init__(self, config: DPConfig, rng: np.random.Generator) -> None:
        if not isinstance(config, DPConfig):
            raise TypeError(f"config must be a DPConfig, got {type(config).__name__}")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(
                f"rng must be a numpy.random.Generator (never the global np.random), got {type(rng).__name__}"
            )
        self.config = config
        self._rng = rng
        self._scale = float(config.noise_scale)
        if config.epsilon is not None and math.isinf(config.epsilon):
            warnings.warn(
                "DP-A with epsilon = inf: activations are clipped but sent WITHOUT noise (no differential privacy)",
                UserWarning,
                stacklevel=2,
            )

    @property
    def rng_state(self) -> dict:
        """The noise generator's state: restoring it makes the next releases draw the same noise.

        A device that must send a release again (a retried upload it produces on the fly)
        restores it so that the bytes, and so the privacy cost, are those of the first try.
        """
        return self._rng.bit_generator.state

    @rng_state.setter
    def rng_state(self, state: dict) -> None:
        self._rng.bit_generator.state = state

    @property
    def noise_scale(self) -> float:
        """sigma (gaussian) or b (laplace) added to every element; 0 for epsilon = inf."""
        return self._scale

    def release(self, activation: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, ReleaseContext]:
        """Clip each example (axis 0) and add i.i.d. noise to every element.

        y_i = s * (a_i * min(1, C / ||a_i||) + z_i), with the L2 norm and
        z ~ N(0, sigma^2) (gaussian) or the L1 norm and z ~ Laplace(0, b)
        (laplace). Returns (y as a new float32 array, or written into ``out``, a
        C-contiguous float32 array of the activation's size; context for backward).

        Noise is drawn in float32. The injected generator draws one seed per
        stream, ``rng.integers(0, 2**63, size=NOISE_STREAMS)``; stream k is
        ``noise_source.secure_generator(seed_k)`` (AESCounter) and fills part k of the
        flattened release (``noise_stream_bounds``), in C order: for gaussian its part of
        z is ``sigma * standard_normal(part size, dtype=float32)`` drawn in one go; for
        laplace each block of ``_NOISE_BLOCK`` elements is b * (E1 - E2), with
        E1, E2 two successive float32 ``standard_exponential`` draws of the block's size.
        Then clip(a) + z is rounded to the nearest multiple of ``snap_step(noise_scale)``
        (ties to even), and multiplied by the public scale s.
        """
        ctx = self.context(activation)
        a = ctx.activation
        if out is None:
            noisy = scale_examples(a, ctx.factors)
            if noisy.dtype != np.float32:
                noisy = noisy.astype(np.float32)
        elif a.dtype == np.float32:
            noisy = scale_examples(a, ctx.factors, out=out)
        else:  # clipped in the activation's precision, rounded to float32 once
            check_out(out, a.size, np.float32)
            noisy = out.reshape(a.shape)
            np.copyto(noisy, scale_examples(a, ctx.factors), casting="same_kind")
        if self._scale > 0 and noisy.size:
            self._add_noise(noisy.reshape(-1), self.config.mechanism is Mechanism.GAUSSIAN, ctx.scale)
        elif ctx.scale != 1.0:
            noisy *= np.float32(ctx.scale)
        return noisy, ctx

    def context(self, activation: np.ndarray) -> ReleaseContext:
        """What ``backward`` needs for this activation (norms, clip factors, scale), without releasing it.

        A device short of memory releases examples one at a time and recomputes their
        activations for the backward pass instead of keeping them; this rebuilds the context.
        """
        a = np.asarray(activation)
        if a.ndim < 1:
            raise UserError("activation needs a batch axis (ndim >= 1), got a scalar")
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise TypeError(f"activation must be a real numeric array, got dtype {a.dtype}")
        cfg = self.config
        norms = l2_norms(a) if cfg.mechanism is Mechanism.GAUSSIAN else l1_norms(a)
        return ReleaseContext(
            activation=a,
            norms=norms,
            factors=clip_factors(norms, clip=cfg.clip),
            clip=cfg.clip,
            mechanism=cfg.mechanism,
            scale=cfg.release_scale(int(np.prod(a.shape[1:]))),
        )

    def _add_noise(self, flat: np.ndarray, gaussian: bool, rescale: float) -> None:
        """flat = (flat + noise) * rescale, in place, one stream per part, parts in parallel."""
        seeds = self._rng.integers(0, 2**63, size=NOISE_STREAMS)
        sigma, s = np.float32(self._scale), np.float32(rescale)
        step = snap_step(self._scale)
        grid, inv = np.float32(step), np.float32(1.0 / step)  # powers of two: the scalings are exact

        def fill(k: int, start: int, end: int) -> None:
            gen = secure_generator(int(seeds[k]))
            buf = np.empty(min(_NOISE_BLOCK, end - start), dtype=np.float32)
            buf2 = None if gaussian else np.empty_like(buf)
            for lo in range(start, end, _NOISE_BLOCK):
                hi = min(lo + _NOISE_BLOCK, end)
                z = buf[: hi - lo]
                if gaussian:
                    gen.standard_normal(dtype=np.float32, out=z)
                else:
                    e2 = buf2[: hi - lo]  # type: ignore[index]
                    gen.standard_exponential(dtype=np.float32, out=z)
                    gen.standard_exponential(dtype=np.float32, out=e2)
                    z -= e2
                z *= sigma
                part = flat[lo:hi]
                part += z
                part *= inv  # snap to the grid: no low bit of the sampler's arithmetic is released
                np.rint(part, out=part)
                part *= grid
                if rescale != 1.0:
                    part *= s

        calls = [(k, start, end) for k, (start, end) in enumerate(noise_stream_bounds(flat.size))]
        pool = _pool()
        if pool is None or flat.size < _PARALLEL_MIN:
            for call in calls:
                fill(*call)
        else:
            _on_threads(pool, fill, calls)

    def backward(self, ctx: ReleaseContext, grad_noisy: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """d loss / d pre-clip activation from d loss / d released activation.

        The noise is additive, so d y / d clip(a) = I and the result is the
        clipping VJP at a (see ``clip_l2_vjp`` / ``clip_l1_vjp``). ``out`` (a
        C-contiguous array of the result's dtype and size) is reused instead of a new array:
        at paper size a fresh one is 25,000 page faults per step.
        """
        if not isinstance(ctx, ReleaseContext):
            raise TypeError(f"ctx must be a ReleaseContext, got {type(ctx).__name__}")
        if ctx.mechanism is not self.config.mechanism or ctx.clip != self.config.clip:
            raise UserError("ctx comes from a release with a different mechanism or clip")
        g = np.asarray(grad_noisy)
        if g.shape != ctx.activation.shape:
            raise UserError(f"grad_noisy shape {g.shape} differs from the released activation's {ctx.activation.shape}")
        vjp = clip_l2_vjp if ctx.mechanism is Mechanism.GAUSSIAN else clip_l1_vjp
        # d (s * y) / d y = s: the public rescale is folded into the VJP's first pass.
        scale = float(np.float32(ctx.scale))
        a, batch, pool = ctx.activation, g.shape[0], _pool()
        if pool is None or g.size < _PARALLEL_MIN or batch == 0:
            return vjp(a, g, clip=ctx.clip, norms=ctx.norms, grad_scale=scale, out=out).reshape(g.shape)
        dtype = np.result_type(a.dtype, g.dtype, np.float32)
        if out is None:
            out = np.empty(g.shape, dtype=dtype)
        else:
            check_out(out, g.size, dtype)
        out = out.reshape(g.shape)
        if batch == 1:
            # One example (the streamed device's case): its elements split across the threads. The
            # clipped VJP needs the whole example's x . g first: partial dots in parallel, then the sum.
            xs, gs, outs = a.reshape(1, -1), g.reshape(1, -1), out.reshape(1, -1)
            spans = _spans(xs.shape[1], _WORKERS)
            dots = np.zeros(1)
            if ctx.norms[0] > ctx.clip:
                dots[0] = sum(_on_threads(pool, lambda lo, hi: float(row_dots(xs[:, lo:hi], gs[:, lo:hi])[0]), spans))

            def span(lo: int, hi: int) -> None:
                x_part, g_part, out_part = xs[:, lo:hi], gs[:, lo:hi], outs[:, lo:hi]
                vjp(x_part, g_part, clip=ctx.clip, norms=ctx.norms, grad_scale=scale, out=out_part, dots=dots)

            _on_threads(pool, span, spans)
            return out

        # Examples are independent: groups of them on the noise threads, each into its slice of one array.
        def part(lo: int, hi: int) -> None:
            vjp(a[lo:hi], g[lo:hi], clip=ctx.clip, norms=ctx.norms[lo:hi], grad_scale=scale, out=out[lo:hi])

        _on_threads(pool, part, _spans(batch, min(batch, _WORKERS)))
        return out

    @staticmethod
    def stats(ctx: ReleaseContext) -> ReleaseStats:
        """Batch size, fraction clipped and pre-clip norm summary of one release."""
        n = ctx.norms
        return ReleaseStats(
            batch_size=int(n.shape[0]),
            fraction_clipped=ctx.fraction_clipped,
            mean_norm=float(n.mean()) if n.size else 0.0,
            max_norm=float(n.max()) if n.size else 0.0,
        )
