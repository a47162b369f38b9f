"""The privacy of an example whose activation AND label are released: both mechanisms, composed.

Each release of an example sends its noisy activation (Gaussian or Laplace, noise multiplier z,
see ``accountant``) and its randomised label (``label_randomizer``: eps_L-label-DP whatever the
prior). Two neighbouring data sets differ in one example, image and label together, so one
release is the composition of the two mechanisms, and a run of N releases is its N-fold
composition. Both are composed with dp-accounting's privacy loss distributions:

* the activation: ``from_gaussian_mechanism(standard_deviation=z, sensitivity=1)`` (or
  ``from_laplace_mechanism(parameter=z / sqrt(2))``), the same PLDs the accountant's
  ``GaussianDpEvent`` and ``LaplaceDpEvent`` build;
* the label: ``from_randomized_response(noise_parameter=2 / (e^eps_L + 1), num_buckets=2)``,
  binary randomised response at eps_L. Every eps_L-DP mechanism's privacy loss is dominated by
  it (it is the worst case of pure eps_L-DP), so this is exact for RRWithPrior when it keeps two
  classes and an upper bound otherwise: the combined epsilon is never under-reported.

Pessimistic discretisation throughout, as in ``accountant``.
"""

from __future__ import annotations

import functools
import math

from dpa.privacy import checks
from dpa.privacy.mechanism import Mechanism

__all__ = ["combined_epsilon", "label_epsilon_spent", "label_guess_bound"]

#: Grid step: this fraction of a closed-form estimate of the combined epsilon (as the accountant).
_REL_ACCURACY = 1e-3
_MIN_INTERVAL = 1e-5
_MAX_INTERVAL = 1.0
_MAX_EPSILON = 1e5


def _rr_pld(eps_label: float, interval: float):  # type: ignore[no-untyped-def]
    from dp_accounting.pld import privacy_loss_distribution as pld

    return pld.from_randomized_response(
        noise_parameter=2.0 / (math.exp(eps_label) + 1.0), num_buckets=2, value_discretization_interval=interval
    )


def _activation_pld(mechanism: Mechanism, nm: float, interval: float):  # type: ignore[no-untyped-def]
    from dp_accounting.pld import privacy_loss_distribution as pld

    if mechanism is Mechanism.GAUSSIAN:
        return pld.from_gaussian_mechanism(
            standard_deviation=nm, sensitivity=1.0, value_discretization_interval=interval
        )
    return pld.from_laplace_mechanism(
        parameter=nm / math.sqrt(2.0), sensitivity=1.0, value_discretization_interval=interval
    )


@functools.lru_cache(maxsize=1024)
def _combined(mechanism: Mechanism, nm: float, eps_label: float, releases: int, delta: float) -> float:
    if releases == 0:
        return 0.0
    if nm == 0.0 or math.isinf(eps_label):
        return math.inf
    mu = math.sqrt(releases) / nm if mechanism is Mechanism.GAUSSIAN else releases * math.sqrt(2.0) / nm
    estimate = mu * mu / 2.0 + mu * max(1.0, math.sqrt(2.0 * math.log(1.0 / max(delta, 1e-300))))
    estimate = min(estimate, releases * math.sqrt(2.0) / nm) if mechanism is Mechanism.LAPLACE else estimate
    estimate += releases * eps_label
    if estimate > _MAX_EPSILON:
        return math.inf
    interval = min(max(_REL_ACCURACY * estimate / math.sqrt(releases), _MIN_INTERVAL), _MAX_INTERVAL)
    one = _activation_pld(mechanism, nm, interval).compose(_rr_pld(eps_label, interval))
    return float(one.self_compose(releases).get_epsilon_for_delta(delta))


def combined_epsilon(
    *, mechanism: Mechanism | str, noise_multiplier: float, label_epsilon: float, releases: int, delta: float
) -> float:
    """Epsilon at ``delta`` of ``releases`` releases of one example's activation and label together.

    inf when the activation has no noise or the label travels in clear (``label_epsilon = inf``)."""
    mech = Mechanism.parse(mechanism)
    nm = checks.noise_multiplier(noise_multiplier)
    eps_l = checks.epsilon(label_epsilon, allow_inf=True, name="label epsilon")
    n = checks.count("releases", releases)
    d = checks.delta(delta, allow_zero=mech is Mechanism.LAPLACE, mechanism=mech.value)
    return _combined(mech, nm, eps_l, n, d)


def label_epsilon_spent(*, label_epsilon: float, releases: int, delta: float = 0.0) -> float:
    """Epsilon at ``delta`` of ``releases`` releases of one label alone (pure: N eps_L at delta 0)."""
    eps_l = checks.epsilon(label_epsilon, allow_inf=True, name="label epsilon")
    n = checks.count("releases", releases)
    if n == 0:
        return 0.0
    if math.isinf(eps_l):
        return math.inf
    if delta == 0.0:
        return n * eps_l
    interval = min(max(_REL_ACCURACY * eps_l / math.sqrt(n), _MIN_INTERVAL), _MAX_INTERVAL)
    return min(n * eps_l, float(_rr_pld(eps_l, interval).self_compose(n).get_epsilon_for_delta(delta)))


def label_guess_bound(*, epsilon: float, delta: float, classes: int) -> float:
    """The best accuracy any guess of a uniformly drawn label among ``classes`` can reach from an
    (epsilon, delta)-DP release of it: (e^eps + (k - 1) delta) / (e^eps + k - 1), at most 1.

    (For every pair y, y' and guess g: P_y[g = y] <= e^eps P_y'[g = y] + delta; summing over the
    k - 1 other labels and over y gives the bound; delta = 0 is e^eps / (e^eps + k - 1).)"""
    if classes < 2:
        return 1.0
    if math.isinf(epsilon):
        return 1.0
    k = classes
    return min(1.0, (1.0 + (k - 1) * delta * math.exp(-epsilon)) / (1.0 + (k - 1) * math.exp(-epsilon)))
