"""``dpa client`` and ``dpa eval``: the device side of split training."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from dpa.cli.device_options import DeviceOptions, client_config, device_options
from dpa.cli.errors import console, user_errors
from dpa.contract.errors import UserError
from runtime_client.head import ModelFormat


def _run(run: Callable[[Any], Awaitable[dict[str, Any]]], opts: DeviceOptions, **fields: Any) -> dict[str, Any]:
    """Build the ClientConfig and run ``run`` on it; user errors (and a refusing server) exit cleanly."""
    from runtime_client.edge import EdgeError

    with user_errors():
        cfg = client_config(opts, **fields)
        try:
            return asyncio.run(run(cfg))
        except EdgeError as exc:
            raise UserError(str(exc)) from None


@device_options
def client_command(
    opts: DeviceOptions,
    epochs: Annotated[int, typer.Option(help="Passes over the training images.")] = 5,
    lr: Annotated[float | None, typer.Option(help="Head learning rate (default: the manifest's).")] = None,
    total_epsilon: Annotated[
        float | None,
        typer.Option(
            help="Budget for the whole run: calibrates the noise for --epochs releases (overrides --epsilon)."
        ),
    ] = None,
    format: Annotated[
        ModelFormat, typer.Option("--format", help="Head model format: auto, onnx or ort.", case_sensitive=False)
    ] = ModelFormat.AUTO,
    resume: Annotated[bool, typer.Option(help="Continue from the head checkpoint in --state-dir.")] = False,
    report: Annotated[Path | None, typer.Option(help="Write a JSON report here.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Cap on steps per epoch (quick runs).")] = None,
    micro_batch: Annotated[
        int | None, typer.Option(help="Examples per head call (1: least memory, same update); default the batch.")
    ] = None,
) -> None:
    """Train privately: head on this device, DP-A activations to the edge server."""
    from runtime_client.trainer import run_training

    result = _run(
        run_training, opts, epochs=epochs, lr=lr, total_epsilon=total_epsilon, model_format=format, resume=resume,
        report=report, max_steps_per_epoch=max_steps, micro_batch=micro_batch,
    )  # fmt: skip
    p = result["privacy"]
    console.print(
        f"[green]done[/]: test accuracy {result['final_test_accuracy']:.3f} on {result['data']['test_images']} "
        f"held-out images; {p['mechanism']} epsilon {p['epsilon_per_release']:.3g} per release "
        f"(delta {p['delta_per_release']:g}, noise {p['noise_scale']:.4g}, clip {p['clip']:g}); "
        f"total epsilon {p['total']['epsilon']:.3g} over {p['total']['releases']} releases per example "
        f"(PLD accountant); labels sent in clear"
    )
    if report is not None:
        console.print(f"report: {report}")


@device_options
def eval_command(
    opts: DeviceOptions,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Held-out accuracy through this device's head and the server's tail (test activations get DP-A too)."""
    from runtime_client.trainer import run_evaluation

    result = _run(run_evaluation, opts, progress=False)
    if json_out:
        print(json.dumps(result))
    else:
        console.print(f"test accuracy {result['test_accuracy']:.3f} on {result['test_images']} images")
