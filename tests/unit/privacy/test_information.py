"""The per-release information bound 1 / (8 z^2) nats, against the accountant's z on pinned cases."""

from __future__ import annotations

import math

import pytest

from dpa.privacy.accountant import calibrate_noise_multiplier
from dpa.privacy.information import fano_accuracy_bound, information_bound_nats


@pytest.mark.parametrize(("total", "releases", "z", "nats"), [(8.0, 1, 0.6002, 0.3470), (1.0, 1, 3.7307, 0.00898)])
def test_bound_at_the_accountants_noise(total, releases, z, nats):
    got = calibrate_noise_multiplier(mechanism="gaussian", total_epsilon=total, delta=1e-5, releases=releases)
    assert got == pytest.approx(z, rel=1e-3)
    assert information_bound_nats(got) == pytest.approx(nats, rel=2e-3)
    assert information_bound_nats(got) == pytest.approx(1 / (8 * got * got))  # C^2 / (2 sigma^2), sigma = 2 z C


def test_k_releases_at_z_sqrt_k_carry_what_one_at_z_carries():
    z1 = calibrate_noise_multiplier(mechanism="gaussian", total_epsilon=8.0, delta=1e-5, releases=1)
    z4 = calibrate_noise_multiplier(mechanism="gaussian", total_epsilon=8.0, delta=1e-5, releases=4)
    assert z4 == pytest.approx(2 * z1, rel=1e-4)  # Gaussian composition is exact: sqrt(K) more noise
    assert information_bound_nats(z4, 4) == pytest.approx(information_bound_nats(z1, 1), rel=1e-3)
    assert information_bound_nats(0.0) == math.inf


def test_fano_caps_a_noisy_query_among_ten_identities():
    z = calibrate_noise_multiplier(mechanism="gaussian", total_epsilon=8.0, delta=1e-5, releases=1)
    cap = fano_accuracy_bound(information_bound_nats(z), 10)
    assert cap == pytest.approx(0.419, abs=2e-3)  # the "about 0.42"
    assert fano_accuracy_bound(0.0, 10) == pytest.approx(0.1, abs=1e-6)  # no information: chance
    assert fano_accuracy_bound(math.log(10), 10) == 1.0
