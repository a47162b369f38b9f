"""DP-A release/backward: noise statistics, clipping, gradients, config checks."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from randomgen import AESCounter

from dpa.privacy.calibration import gaussian_sigma, laplace_scale
from dpa.privacy.mechanism import NOISE_STREAMS, DPActivations, DPConfig, Mechanism, ReleaseContext

N_NOISE = (16, 4, 128, 128)  # 1,048,576 noise samples per release


def _activation(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Examples with norms spread from well under to well over C = 1 (L2 and L1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    per_example = int(np.prod(shape[1:]))
    scales = np.geomspace(0.01, 30.0, shape[0]) / np.sqrt(per_example)
    return (x * scales.reshape((-1,) + (1,) * (len(shape) - 1))).astype(np.float32)


# --------------------------------------------------------------------------- Mechanism / DPConfig


def test_parse_mechanism() -> None:
    assert Mechanism.parse("gaussian") is Mechanism.GAUSSIAN
    assert Mechanism.parse(" Laplace ") is Mechanism.LAPLACE
    assert Mechanism.parse(Mechanism.LAPLACE) is Mechanism.LAPLACE
    with pytest.raises(ValueError, match="unknown mechanism 'exponential'; valid: gaussian, laplace"):
        Mechanism.parse("exponential")


def test_config_defaults_and_derived_numbers() -> None:
    cfg = DPConfig()
    assert cfg.mechanism is Mechanism.GAUSSIAN
    assert (cfg.clip, cfg.epsilon, cfg.delta) == (1.0, 1.0, 1e-5)
    assert cfg.sensitivity == 2.0
    assert cfg.noise_scale == gaussian_sigma(epsilon=1.0, delta=1e-5, sensitivity=2.0)
    # sigma / 2C: the unit-sensitivity analytic sigma (3.7306... for eps 1, delta 1e-5).
    assert cfg.noise_multiplier == pytest.approx(3.7306316348, rel=1e-9)

    lap = DPConfig(mechanism="laplace", clip=0.5, epsilon=2.0)
    assert lap.mechanism is Mechanism.LAPLACE
    assert lap.sensitivity == 1.0
    assert lap.noise_scale == laplace_scale(epsilon=2.0, sensitivity=1.0) == 0.5
    assert lap.noise_std == pytest.approx(math.sqrt(2) * 0.5)
    assert lap.noise_multiplier == pytest.approx(math.sqrt(2) * 0.5 / 1.0)

    free = DPConfig(epsilon=math.inf)
    assert free.noise_scale == 0.0 and free.noise_multiplier == 0.0


NAN = float("nan")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"mechanism": "uniform"}, ValueError, "unknown mechanism 'uniform'; valid: gaussian, laplace"),
        ({"clip": 0.0}, ValueError, r"clip must be > 0, got 0\.0"),
        ({"clip": -1.0}, ValueError, r"clip must be > 0, got -1\.0"),
        ({"clip": math.inf}, ValueError, "clip must be finite"),
        ({"clip": NAN}, ValueError, "clip must not be NaN"),
        ({"epsilon": 0.0}, ValueError, r"epsilon must be > 0, got 0\.0 \(inf for no noise\)"),
        ({"epsilon": NAN}, ValueError, "epsilon must not be NaN"),
        ({"delta": 0.0}, ValueError, r"delta must be in \(0, 1\) for the gaussian mechanism, got 0\.0"),
        ({"delta": 1.0}, ValueError, r"delta must be in \(0, 1\) for the gaussian mechanism"),
        ({"delta": NAN}, ValueError, "delta must not be NaN"),
        (
            {"mechanism": "laplace", "delta": -0.1},
            ValueError,
            r"delta must be in \[0, 1\) for the laplace mechanism \(laplace ignores it\)",
        ),
        ({"epsilon": "1"}, TypeError, "epsilon must be a real number"),
        ({"clip": True}, TypeError, "clip must be a real number"),
    ],
)
def test_config_validation(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        DPConfig(**kwargs)


def test_laplace_accepts_zero_delta() -> None:
    assert DPConfig(mechanism=Mechanism.LAPLACE, delta=0.0).delta == 0.0


def test_dpactivations_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        DPActivations(DPConfig(), np.random.RandomState(0))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config must be a DPConfig"):
        DPActivations({"epsilon": 1.0}, np.random.default_rng(0))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- noise statistics


@pytest.mark.parametrize(
    ("mechanism", "epsilon", "expected_std"),
    [
        ("gaussian", 1.0, gaussian_sigma(epsilon=1.0, delta=1e-5, sensitivity=2.0)),
        ("laplace", 1.0, math.sqrt(2) * 2.0),  # b = 2C/eps = 2, std = sqrt(2) b
    ],
)
def test_noise_std_and_mean(mechanism, epsilon, expected_std) -> None:
    dp = DPActivations(DPConfig(mechanism=mechanism, epsilon=epsilon, normalize=False), np.random.default_rng(1234))
    noisy, _ = dp.release(np.zeros(N_NOISE, dtype=np.float32))
    assert noisy.dtype == np.float32 and noisy.shape == N_NOISE
    z = noisy.astype(np.float64).ravel()
    # 2^20 samples: std's standard error is ~0.07% (gaussian) / ~0.16% (laplace,
    # kurtosis 6); 1% is > 6 standard errors. Mean's standard error is std/1024.
    assert z.std() == pytest.approx(expected_std, rel=0.01)
    assert abs(z.mean()) < 5 * expected_std / math.sqrt(z.size)
    if mechanism == "laplace":
        # Laplace: E|z| = b and P(|z| > b) = 1/e, which a Gaussian would not give.
        b = expected_std / math.sqrt(2)
        assert np.abs(z).mean() == pytest.approx(b, rel=0.01)
        assert (np.abs(z) > b).mean() == pytest.approx(math.exp(-1), abs=0.003)
    else:
        assert (np.abs(z) > expected_std).mean() == pytest.approx(0.3173, abs=0.003)


@pytest.mark.parametrize("shape", [(8, 3, 16, 16), (4, 4, 256, 256)])  # streams in turn / on threads
def test_released_minus_clipped_is_the_gaussian_noise(shape) -> None:
    x = _activation(shape)
    cfg = DPConfig(clip=1.0, epsilon=2.0, normalize=False)
    noisy, ctx = DPActivations(cfg, np.random.default_rng(7)).release(x)
    # Independent reference: clip with torch, draw the documented noise stream.
    xt = torch.tensor(x, dtype=torch.float64)
    clipped = xt * torch.clamp(1.0 / xt.flatten(1).norm(dim=1), max=1.0).reshape(-1, 1, 1, 1)
    seeds = np.random.default_rng(7).integers(0, 2**63, size=NOISE_STREAMS)
    edges = np.linspace(0, x.size, NOISE_STREAMS + 1).astype(int)  # equal parts, as documented
    streams = [  # each stream is AES-128 counter mode (randomgen), seeded through numpy's SeedSequence
        np.random.Generator(AESCounter(seed=np.random.SeedSequence(int(seed)))).standard_normal(
            int(hi - lo), dtype=np.float32
        )
        for seed, lo, hi in zip(seeds, edges[:-1], edges[1:], strict=True)
    ]
    noise = np.float32(cfg.noise_scale) * np.concatenate(streams).reshape(x.shape)
    step = 2.0 ** (math.floor(math.log2(cfg.noise_scale)) - 12)  # the snapping grid, as documented
    np.testing.assert_allclose(noisy - clipped.numpy(), noise, rtol=0, atol=1e-5 * cfg.noise_scale + step / 2)
    multiples = noisy.astype(np.float64) / step  # every released value lies on the grid
    np.testing.assert_array_equal(multiples, np.round(multiples))
    assert 0 < ctx.fraction_clipped < 1


def test_laplace_noise_is_independent_of_the_signal() -> None:
    x = _activation((16, 4, 64, 64), seed=2) * np.float32(100.0)
    cfg = DPConfig(mechanism="laplace", clip=1.0, epsilon=4.0, normalize=False)
    noisy, ctx = DPActivations(cfg, np.random.default_rng(3)).release(x)
    xt = torch.tensor(x, dtype=torch.float64)
    clipped = xt * torch.clamp(1.0 / xt.flatten(1).norm(p=1, dim=1), max=1.0).reshape(-1, 1, 1, 1)
    z = noisy.astype(np.float64) - clipped.numpy()
    assert z.std() == pytest.approx(cfg.noise_std, rel=0.01)
    assert np.abs(z).mean() == pytest.approx(cfg.noise_scale, rel=0.01)
    assert ctx.fraction_clipped == 1.0


def test_seeds() -> None:
    x = _activation((4, 2, 8, 8))
    cfg = DPConfig()
    a, _ = DPActivations(cfg, np.random.default_rng(5)).release(x)
    b, _ = DPActivations(cfg, np.random.default_rng(5)).release(x)
    c, _ = DPActivations(cfg, np.random.default_rng(6)).release(x)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # Successive releases from one generator draw fresh noise.
    dp = DPActivations(cfg, np.random.default_rng(5))
    first, _ = dp.release(x)
    second, _ = dp.release(x)
    np.testing.assert_array_equal(first, a)
    assert not np.allclose(first, second)


# --------------------------------------------------------------------------- epsilon = inf


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_infinite_epsilon_warns_and_only_clips(mechanism) -> None:
    with pytest.warns(UserWarning, match="WITHOUT noise"):
        dp = DPActivations(
            DPConfig(mechanism=mechanism, clip=2.0, epsilon=math.inf, normalize=False), np.random.default_rng(0)
        )
    x = _activation((12, 3, 5, 5)) * np.float32(2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, at construction, not per release
        noisy, ctx = dp.release(x)
    ord_ = 2 if mechanism == "gaussian" else 1
    norms = np.linalg.norm(noisy.reshape(12, -1).astype(np.float64), ord=ord_, axis=1)
    assert np.all(norms <= 2.0 * (1 + 1e-6))
    unclipped = ctx.factors == 1.0
    assert unclipped.any() and (~unclipped).any()
    np.testing.assert_array_equal(noisy[unclipped], x[unclipped])  # no noise at all
    np.testing.assert_allclose(norms[~unclipped], 2.0, rtol=1e-6)


@pytest.mark.parametrize("epsilon", [0.5, 8.0, 1000.0, math.inf])
def test_normalized_release_has_unit_scale_at_every_epsilon(epsilon) -> None:
    """The public rescaling keeps the release's RMS per element <= 1 whatever the noise."""
    x = _activation((16, 4, 32, 32), seed=5) * np.float32(50.0)  # all clipped: RMS = C / sqrt(d) before noise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = DPActivations(DPConfig(clip=1.0, epsilon=epsilon), np.random.default_rng(0))
    noisy, ctx = dp.release(x)
    rms = float(np.sqrt(np.mean(noisy.astype(np.float64) ** 2)))
    assert 0.9 < rms <= 1.0 + 1e-2
    assert ctx.scale == pytest.approx(1.0 / math.sqrt(dp.config.noise_std**2 + 1.0 / x[0].size))


def test_finite_epsilon_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DPActivations(DPConfig(epsilon=100.0), np.random.default_rng(0))


# --------------------------------------------------------------------------- backward


@pytest.mark.parametrize(
    ("mechanism", "ord_", "shape", "clip"),
    [
        ("gaussian", 2, (10, 3, 6, 6), 1.0),
        ("laplace", 1, (10, 3, 6, 6), 1.0),
        ("gaussian", 2, (4, 4, 256, 256), 1.0),  # large enough for the threaded VJP (groups of examples)
        # One example, its elements split across the threads (the streamed device): clipped and not.
        ("gaussian", 2, (1, 8, 256, 256), 1e-3),  # its L2 norm is 0.01; big enough to be split
        ("laplace", 1, (1, 8, 256, 256), 1e-3),
        ("gaussian", 2, (1, 8, 256, 256), 1.0),
    ],
)
def test_backward_matches_torch_autograd(mechanism, ord_, shape, clip) -> None:
    x = _activation(shape, seed=4)
    dp = DPActivations(DPConfig(mechanism=mechanism, clip=clip, epsilon=1.0), np.random.default_rng(0))
    noisy, ctx = dp.release(x)
    g = np.random.default_rng(9).standard_normal(x.shape).astype(np.float32)
    # A component of g along each example's x as large as the rest: the clipped VJP's x (x . g)
    # term is then as large as its g term, so an error in x . g cannot hide under the tolerance.
    rows = x.reshape(len(x), -1)
    along = rows * (np.sqrt(rows.shape[1]) / np.linalg.norm(rows, axis=1, keepdims=True))
    g = (g + along.reshape(x.shape)).astype(np.float32)

    # Reference: noisy = s * (clip(x) + z) with z a constant and s the public scale, by formula.
    scale = 1.0 / math.sqrt(dp.config.noise_std**2 + dp.config.clip**2 / x[0].size)
    assert ctx.scale == pytest.approx(scale)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    z = torch.tensor(noisy, dtype=torch.float64) / scale - _clip_torch(xt, ord_, clip).detach()
    released = scale * (_clip_torch(xt, ord_, clip) + z)
    (released * torch.tensor(g, dtype=torch.float64)).sum().backward()

    grad = dp.backward(ctx, g)
    assert grad.dtype == np.float32 and grad.shape == x.shape
    ref = xt.grad.numpy()
    # The along-x parts cancel (the L2 VJP removes g's component along x), so elementwise the
    # float32 result is compared at the scale of the whole gradient, and in norm.
    np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    assert np.linalg.norm(grad - ref) <= 1e-5 * np.linalg.norm(ref)
    if shape[0] > 1:
        assert 0 < ctx.fraction_clipped < 1
    else:
        assert ctx.fraction_clipped == (clip < 0.01)


def _clip_torch(x: torch.Tensor, ord_: int, clip: float = 1.0) -> torch.Tensor:
    factor = torch.clamp(clip / x.flatten(1).norm(p=ord_, dim=1), max=1.0)
    return x * factor.reshape((-1,) + (1,) * (x.dim() - 1))


def test_backward_rejects_mismatches() -> None:
    dp = DPActivations(DPConfig(), np.random.default_rng(0))
    x = _activation((3, 4))
    _, ctx = dp.release(x)
    with pytest.raises(ValueError, match="grad_noisy shape"):
        dp.backward(ctx, np.ones((3, 5), np.float32))
    other = DPActivations(DPConfig(mechanism="laplace"), np.random.default_rng(0))
    with pytest.raises(ValueError, match="different mechanism or clip"):
        other.backward(ctx, np.ones((3, 4), np.float32))
    with pytest.raises(TypeError, match="ReleaseContext"):
        dp.backward("ctx", np.ones((3, 4), np.float32))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- stats and inputs


def test_stats() -> None:
    x = np.zeros((4, 3), np.float32)
    x[0, 0] = 3.0  # norm 3, clipped at C = 1
    x[1, :] = 0.5  # L2 norm ~0.866, kept
    dp = DPActivations(DPConfig(clip=1.0), np.random.default_rng(0))
    _, ctx = dp.release(x)
    assert isinstance(ctx, ReleaseContext)
    assert ctx.activation is x  # a reference, not a copy
    np.testing.assert_allclose(ctx.norms, [3.0, math.sqrt(0.75), 0.0, 0.0])
    stats = dp.stats(ctx)
    assert stats.batch_size == 4
    assert stats.fraction_clipped == 0.25
    assert stats.max_norm == pytest.approx(3.0)
    assert stats.mean_norm == pytest.approx((3.0 + math.sqrt(0.75)) / 4)


def test_release_rejects_bad_activations() -> None:
    dp = DPActivations(DPConfig(), np.random.default_rng(0))
    with pytest.raises(ValueError, match="batch axis"):
        dp.release(np.float32(1.0))
    bad = np.ones((2, 3), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        dp.release(bad)


def test_float64_activation_released_as_float32() -> None:
    dp = DPActivations(DPConfig(), np.random.default_rng(0))
    noisy, _ = dp.release(_activation((3, 4)).astype(np.float64))
    assert noisy.dtype == np.float32


@pytest.mark.parametrize("mechanism", [Mechanism.GAUSSIAN, Mechanism.LAPLACE])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_release_and_backward_into_out_equal_new_arrays(mechanism, dtype) -> None:
    """The device writes its release into the message and the VJP into a reused buffer: same bits."""
    rng = np.random.default_rng(4)
    a = (rng.standard_normal((6, 3, 40, 40)) * 3).astype(dtype)  # big enough for the parallel VJP
    g = rng.standard_normal(a.shape).astype(np.float32)
    results = []
    for into in (False, True):
        dp = DPActivations(DPConfig(mechanism=mechanism, clip=50.0, epsilon=4.0), np.random.default_rng(9))
        out = np.full(a.shape, np.nan, np.float32) if into else None
        noisy, ctx = dp.release(a, out=out)
        assert np.shares_memory(noisy, out) if into else noisy.dtype == np.float32
        up_out = np.full(a.shape, np.nan, np.result_type(a.dtype, np.float32)) if into else None
        results.append((noisy.copy(), dp.backward(ctx, g, out=up_out).copy()))
        if into:
            np.testing.assert_array_equal(out, results[-1][0])
            np.testing.assert_array_equal(up_out, results[-1][1])
    for new, reused in zip(results[0], results[1], strict=True):
        np.testing.assert_array_equal(new, reused)


def test_out_arrays_that_cannot_take_the_result_are_refused() -> None:
    dp = DPActivations(DPConfig(clip=1.0, epsilon=4.0), np.random.default_rng(0))
    a = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="C-contiguous float32 array of 32 elements, got float64"):
        dp.release(a, out=np.empty((4, 8)))
    with pytest.raises(ValueError, match=r"not C-contiguous"):
        dp.release(a, out=np.empty((8, 4), np.float32).T)
    _, ctx = dp.release(a)
    with pytest.raises(ValueError, match="array of 32 elements, got float32 \\(4, 7\\)"):
        dp.backward(ctx, a, out=np.empty((4, 7), np.float32))


def test_device_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import dpa.privacy.calibration, dpa.privacy.clipping, dpa.privacy.mechanism\n"
        "assert 'torch' not in sys.modules, 'device code imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[3])
