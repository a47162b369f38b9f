"""``dpa privacy``: the whole run's epsilon for a noise multiplier, or the noise multiplier for an epsilon.

Both directions use the PLD accountant of :mod:`runtime_client.accountant`: each
epoch releases each example once, and the run's guarantee is the composition of
--releases such releases (no subsampling amplification).
"""

from __future__ import annotations

import json
import math
from typing import Annotated

import typer

from dpa.cli_util import console, user_errors


def _optional_positive(name: str):  # type: ignore[no-untyped-def]
    def check(value: float | None) -> float | None:
        if value is not None and (math.isnan(value) or value <= 0 or math.isinf(value)):
            raise typer.BadParameter(f"{name} must be > 0 and finite, got {value}")
        return value

    return check


def _delta(value: float) -> float:
    if math.isnan(value) or not 0 <= value < 1:
        raise typer.BadParameter(f"delta must be in [0, 1) (in (0, 1) for gaussian), got {value}")
    return value


def _releases(value: int) -> int:
    if value < 0:
        raise typer.BadParameter(f"releases must be >= 0, got {value}")
    return value


def _clip(value: float) -> float:
    if math.isnan(value) or value <= 0 or math.isinf(value):
        raise typer.BadParameter(f"clip must be > 0 and finite, got {value}")
    return value


def privacy_command(
    releases: Annotated[
        int, typer.Option(callback=_releases, help="Releases of each example over the run (= epochs).")
    ],
    noise_multiplier: Annotated[
        float | None,
        typer.Option(
            callback=_optional_positive("noise multiplier"),
            help="Noise std / sensitivity 2C of one release: prints the run's epsilon.",
        ),
    ] = None,
    epsilon: Annotated[
        float | None,
        typer.Option(
            callback=_optional_positive("epsilon"),
            help="Budget for the whole run: prints the smallest noise multiplier that keeps within it.",
        ),
    ] = None,
    delta: Annotated[float, typer.Option(callback=_delta, help="delta of the whole run (laplace allows 0).")] = 1e-5,
    mechanism: Annotated[str, typer.Option(help="gaussian (L2 clip) or laplace (L1 clip).")] = "gaussian",
    clip: Annotated[
        float, typer.Option(callback=_clip, help="Per-example activation norm bound C, for the noise scale shown.")
    ] = 1.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Total epsilon per example for --noise-multiplier, or the noise multiplier for --epsilon."""
    from runtime_client.accountant import calibrate_noise_multiplier, epsilon_spent, sigma_for
    from runtime_client.mechanism import Mechanism

    with user_errors():
        if (noise_multiplier is None) == (epsilon is None):
            raise ValueError(
                "give exactly one of --noise-multiplier (to get the run's epsilon) "
                "or --epsilon (to get the noise multiplier)"
            )
        mech = Mechanism.parse(mechanism)
        if epsilon is None:
            nm = float(noise_multiplier)  # type: ignore[arg-type]  # exactly one is given
        else:
            nm = calibrate_noise_multiplier(mechanism=mech, total_epsilon=epsilon, delta=delta, releases=releases)
        eps = epsilon_spent(mechanism=mech, noise_multiplier=nm, releases=releases, delta=delta)
        scale = sigma_for(noise_multiplier=nm, clip=clip, mechanism=mech)
    if json_out:
        result = {
            "epsilon": eps if math.isfinite(eps) else None,  # strict JSON has no Infinity
            "delta": delta,
            "noise_multiplier": nm,
            "releases": releases,
            "mechanism": mech.value,
            "accountant": "pld",
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
    console.print(message, highlight=False, soft_wrap=True)
