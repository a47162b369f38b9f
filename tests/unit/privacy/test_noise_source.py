"""The DP noise's source: AES-128 counter mode from OS entropy, reproducible under a seed, Gaussian."""

from __future__ import annotations

import math

import numpy as np
import pytest
from randomgen import AESCounter
from scipy import stats

from dpa.contract.errors import UserError
from dpa.privacy.mechanism import DPActivations, DPConfig, snap_step
from dpa.privacy.noise_source import generator_state_json, restore_generator_state, secure_generator


def test_the_generator_is_aes_counter_seeded_from_os_entropy():
    a, b = secure_generator(), secure_generator()
    assert isinstance(a.bit_generator, AESCounter)
    assert a.integers(0, 2**63) != b.integers(0, 2**63)  # fresh entropy each time


def test_a_seed_reproduces_the_stream_and_a_saved_state_continues_it():
    a, b = secure_generator([7, 1]), secure_generator([7, 1])
    np.testing.assert_array_equal(a.standard_normal(1000), b.standard_normal(1000))
    saved = generator_state_json(a)
    expected = a.standard_normal(1000)
    c = secure_generator(0)
    restore_generator_state(c, saved)
    np.testing.assert_array_equal(c.standard_normal(1000), expected)


def test_a_state_of_another_generator_is_refused():
    pcg = np.random.default_rng(0)
    with pytest.raises(UserError, match="not an AESCounter state"):
        restore_generator_state(secure_generator(0), '{"bit_generator": "PCG64", "state": {"state": 1, "inc": 3}}')
    assert isinstance(pcg.bit_generator, np.random.PCG64)


def test_released_noise_is_gaussian_with_the_calibrated_std():
    """Zero signal, fixed seed: mean, variance, tails and the whole distribution against N(0, sigma^2)."""
    cfg = DPConfig(clip=1.0, epsilon=1.0, normalize=False)
    noisy, _ = DPActivations(cfg, secure_generator(11)).release(np.zeros((64, 1 << 14), np.float32))
    z = noisy.astype(np.float64).ravel() / cfg.noise_scale
    n = z.size
    assert abs(z.mean()) < 4 / math.sqrt(n)  # 4 standard errors
    assert z.var() == pytest.approx(1.0, abs=4 * math.sqrt(2 / n))
    assert (np.abs(z) > 1).mean() == pytest.approx(0.3173, abs=0.002)
    assert (np.abs(z) > 3).mean() == pytest.approx(0.0027, abs=0.0003)
    assert stats.kstest(z[:200_000], "norm").pvalue > 1e-3


def test_snapping_costs_nothing_the_learner_can_see():
    """The grid is ~2^-12 of the noise scale: the rounding error's std is ~7e-5 of the noise's."""
    for scale in (1e-3, 0.7, 1.0, 3.0, 250.0):
        step = snap_step(scale)
        assert scale / 2**13 < step <= scale / 2**12
        assert math.log2(step).is_integer()
