"""``dpa privacy``: the whole run's epsilon for a noise multiplier, or the noise multiplier for an epsilon.

Both directions use the PLD accountant of :mod:`dpa.privacy.accountant`: each
epoch releases each example once, and the run's guarantee is the composition of
--releases such releases (no subsampling amplification).
"""

from __future__ import annotations

import json
import math
from functools import partial
from typing import Annotated

import typer

from dpa.cli.errors import console, option_check, user_errors
from dpa.contract.errors import UserError
from dpa.privacy import checks
from dpa.privacy.mechanism import Mechanism

_positive = {name: option_check(partial(checks.positive_finite, name)) for name in ("noise multiplier", "clip")}


# privacy_command's longer options, named here so that the command reads as its signature and its body.
_NoiseMultiplier = Annotated[
    float | None,
    typer.Option(
        callback=_positive["noise multiplier"],
        help="Noise std / sensitivity 2C of one release: prints the run's epsilon.",
    ),
]
_Epsilon = Annotated[
    float | None,
    typer.Option(
        callback=option_check(partial(checks.epsilon, allow_inf=False)),
        help="Budget for the whole run: prints the smallest noise multiplier that keeps within it.",
    ),
]
_Delta = Annotated[
    float,
    typer.Option(
        callback=option_check(partial(checks.delta, allow_zero=True)),
        help="delta of the whole run (laplace allows 0).",
    ),
]
_Mechanism = Annotated[Mechanism, typer.Option(help="gaussian (L2 clip) or laplace (L1 clip).", case_sensitive=False)]
_Clip = Annotated[
    float,
    typer.Option(callback=_positive["clip"], help="Per-example activation norm bound C, for the noise scale shown."),
]


def privacy_command(
    releases: Annotated[
        int,
        typer.Option(
            callback=option_check(partial(checks.count, "releases")),
            help="Releases of each example over the run (= epochs).",
        ),
    ],
    noise_multiplier: _NoiseMultiplier = None,
    epsilon: _Epsilon = None,
    delta: _Delta = 1e-5,
    mechanism: _Mechanism = Mechanism.GAUSSIAN,
    clip: _Clip = 1.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Total epsilon per example for --noise-multiplier, or the noise multiplier for --epsilon."""
    from dpa.privacy.accountant import calibrate_noise_multiplier, epsilon_spent
    from dpa.privacy.information import information_bound_nats
    from dpa.privacy.mechanism import Mechanism, noise_scale_for

    with user_errors():
        if (noise_multiplier is None) == (epsilon is None):
            raise UserError(
                "give exactly one of --noise-multiplier (to get the run's epsilon) "
                "or --epsilon (to get the noise multiplier)"
            )
        mech = mechanism
        if epsilon is None:
            nm = float(noise_multiplier)  # type: ignore[arg-type]  # exactly one is given
        else:
            nm = calibrate_noise_multiplier(mechanism=mech, total_epsilon=epsilon, delta=delta, releases=releases)
        eps = epsilon_spent(mechanism=mech, noise_multiplier=nm, releases=releases, delta=delta)
        scale = noise_scale_for(noise_multiplier=nm, clip=clip, mechanism=mech)
        # The Gaussian channel's capacity: what the releases can tell about one example, at most.
        nats = information_bound_nats(nm, releases) if mech is Mechanism.GAUSSIAN else None
    if json_out:
        result = {
            "epsilon": eps if math.isfinite(eps) else None,  # strict JSON has no Infinity
            "delta": delta,
            "noise_multiplier": nm,
            "releases": releases,
            "mechanism": mech.value,
            "accountant": "pld",
            "information_bound_nats": None if nats is None or math.isinf(nats) else nats,
        }
        print(json.dumps(result))
        return
    noise = f"sigma = {scale:.6g}" if mech is Mechanism.GAUSSIAN else f"b = {scale:.6g}"
    if epsilon is None:
        message = (
            f"noise multiplier {nm:.6g} ({mech.value}, {noise} for clip C = {clip:g}): {releases} release(s) "
            f"of each example spend epsilon = {eps:.6g} at delta = {delta:g} (PLD accountant)"
        )
    else:
        message = (
            f"to keep {releases} release(s) of each example within epsilon = {epsilon:g} at delta = {delta:g}, "
            f"use noise multiplier >= {nm:.6g} ({mech.value}, {noise} for clip C = {clip:g}; "
            f"epsilon spent {eps:.6g}, PLD accountant)"
        )
    if nats is not None and math.isfinite(nats):
        message += f"; together they carry at most {nats:.3g} nats ({nats / math.log(2):.3g} bits) about an example"
    console.print(message, highlight=False, soft_wrap=True)
