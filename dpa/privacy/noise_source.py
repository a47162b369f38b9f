"""Where DP noise comes from: AES-128 in counter mode, a cryptographically secure generator, as numpy Generators.

numpy's default PCG64 is fast but not cryptographic: whoever learns enough of its output can
predict the rest, and noise the server can predict is no noise. Every noise draw here therefore
comes from randomgen's ``AESCounter`` (AES-128 in counter mode, the construction of NIST's
CTR_DRBG), a maintained bit generator for numpy, seeded from the operating system's entropy, as
Opacus' ``secure_mode`` uses a CSPRNG. With AES-NI it draws as fast as PCG64 (randomgen's ChaCha20
costs about twice as much per normal; BENCHMARKS.md). A fixed seed (``--seed``, experiments only)
still reproduces a run exactly, on any machine: the output is the cipher's, whether the CPU has
AES instructions or randomgen's portable AES runs instead (slower; not measured on a phone).

Floating-point attacks (Mironov, CCS 2012) read the low bits of a noisy float. ``DPActivations``
samples the Gaussian in float32 and rounds each noisy value to a grid (``snap_step``): a sub-ulp
signature of the sample cannot survive the rounding. See ``mechanism.py`` and docs/privacy.md's threat model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
from randomgen import AESCounter

from dpa.contract.errors import UserError

__all__ = ["secure_generator", "generator_state_json", "restore_generator_state"]


def secure_generator(seed: int | Sequence[int] | None = None) -> np.random.Generator:
    """A numpy Generator over AES-128 counter mode: seeded from OS entropy when ``seed`` is None
    (deployments), else reproducibly from ``seed`` (an int or ints, through numpy's SeedSequence)."""
    entropy = np.random.SeedSequence(seed if seed is None or isinstance(seed, int) else list(seed))
    return np.random.Generator(AESCounter(seed=entropy))


def _plain(value: object) -> object:
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.integer):
        return int(value)
    return value


def _arrays(value: object) -> object:
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.array(value["__ndarray__"], dtype=value["dtype"])
        return {k: _arrays(v) for k, v in value.items()}
    return value


def generator_state_json(generator: np.random.Generator) -> str:
    """The generator's full state as JSON (AESCounter's holds arrays), for the device's checkpoint."""
    return json.dumps(_plain(generator.bit_generator.state))


def restore_generator_state(generator: np.random.Generator, text: str) -> None:
    """Put back a state written by ``generator_state_json``; a state of another kind of generator (a
    checkpoint from before the noise came from AESCounter) is refused: resuming on it would repeat noise."""
    try:
        generator.bit_generator.state = _arrays(json.loads(text))
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(
            f"the saved noise generator state is not an AESCounter state ({exc}); this run cannot be resumed, "
            "start a new one (a new --state-dir)"
        ) from None
