"""``dpa client`` and ``dpa eval``: the device side of split training."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from dpa.cli.device_options import DeviceOptions, client_config, device_options
from dpa.cli.errors import console, option_check, user_errors
from dpa.contract.errors import UserError
from dpa.privacy import checks
from dpa.privacy.class_sums import Adjacency
from dpa.privacy.mechanism import Mechanism
from runtime_client.config import RECOMMENDED_TOTAL_EPSILON, ReleaseKind
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


def _epsilon_option(name: str, help: str) -> Any:
    """An epsilon option ('inf' allowed), checked by the privacy floor's own check under ``name``."""
    return typer.Option(help=help, callback=option_check(partial(checks.epsilon, allow_inf=True, name=name)))


# client_command's longer options, named here so that the command reads as its signature and its body.
_TotalEpsilon = Annotated[float, _epsilon_option("total epsilon", (
    "Budget for the whole run, activations and labels together: calibrates the noise for every release of an "
    "example (overrides --epsilon); 'inf': no budget, --epsilon is per release."))]  # fmt: skip
_LabelEpsilon = Annotated[float, _epsilon_option("label epsilon", (
    "Label privacy of ONE release: labels are randomised on the device (RRWithPrior); 'inf' sends them in "
    "clear."))]  # fmt: skip
_FrozenHead = Annotated[
    bool,
    typer.Option(
        "--frozen-head/--train-head",
        help="Keep the exported (public) head: no head update, each example released K times (the default); "
        "or train it, releasing every example every epoch.",
    ),
]
_OnDeviceTemplates = Annotated[
    bool,
    typer.Option(
        help="Afterwards classify held-out images on the device with the server's class templates (skipped, "
        "with a warning, when the server keeps none)."
    ),
]
_Release = Annotated[
    ReleaseKind | None,
    typer.Option(
        help="What leaves the device: 'class-sums' (each class's sum of clipped activations and its count, "
        "released ONCE with one draw of noise, labels inside the same guarantee; the server keeps them as "
        "templates) or 'examples' (DP-A: every example's activation with its own noise, step by step, so the "
        "server trains its tail). Default: class-sums with a frozen head and the Gaussian mechanism, else "
        "examples.",
        case_sensitive=False,
    ),
]
_GalleryRows = Annotated[
    str | None,
    typer.Option(help="Class sums in a federation: the enrolment id (gallery row) of each class, '0,7,9,...'."),
]


def _rows(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(
            f"expected comma-separated integers, got {text!r}", param_hint="--gallery-rows"
        ) from None


_Adjacency = Annotated[
    Adjacency,
    typer.Option(
        help="Class sums: the neighbours the budget is stated for. 'replace-one' (one example changed; counts "
        "released, sensitivity 2C) or 'add-remove' (one example added or removed, as Opacus; no counts, "
        "sensitivity C). The report gives the epsilon under both.",
        case_sensitive=False,
    ),
]
_RecordView = Annotated[
    Path | None,
    typer.Option(help="Record what the server receives here (docs/server_view.md); `dpa attack view` reads it."),
]
_LabelPrior = Annotated[
    str,
    typer.Option(help="RRWithPrior's prior: 'logits' (the server's, for the example's last release) or 'uniform'."),
]


@device_options
def client_command(
    opts: DeviceOptions,
    epochs: Annotated[int, typer.Option(help="Passes over the training images.")] = 5,
    lr: Annotated[float | None, typer.Option(help="Head learning rate (default: the manifest's).")] = None,
    total_epsilon: _TotalEpsilon = RECOMMENDED_TOTAL_EPSILON,
    format: Annotated[
        ModelFormat, typer.Option("--format", help="Head model format: auto, onnx or ort.", case_sensitive=False)
    ] = ModelFormat.AUTO,
    resume: Annotated[bool, typer.Option(help="Continue from the head checkpoint in --state-dir.")] = False,
    report: Annotated[Path | None, typer.Option(help="Write a JSON report here.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Cap on steps per epoch (quick runs).")] = None,
    micro_batch: Annotated[
        int | None, typer.Option(help="Examples per head call (1: least memory, same update); default the batch.")
    ] = None,
    label_epsilon: _LabelEpsilon = 4.0,
    label_prior: _LabelPrior = "logits",
    frozen_head: _FrozenHead = True,
    releases_per_example: Annotated[
        int | None, typer.Option(help="With --frozen-head: releases of each example (default 1); later epochs re-send.")
    ] = None,
    on_device_templates: _OnDeviceTemplates = True,
    record_view: _RecordView = None,
    record_view_limit: Annotated[
        int | None, typer.Option(help="Record at most this many training releases (default: all).")
    ] = None,
    release: _Release = None,
    adjacency: _Adjacency = Adjacency.REPLACE_ONE,
    gallery_rows: _GalleryRows = None,
) -> None:
    """Train privately: head on this device, DP-A releases to the edge server."""
    from runtime_client.trainer import run_training

    if release is None:  # the recommended recipe where it applies; a trained head needs per-example steps
        gaussian = Mechanism.parse(opts.mechanism) is Mechanism.GAUSSIAN
        release = ReleaseKind.CLASS_SUMS if frozen_head and gaussian else ReleaseKind.EXAMPLES
    result = _run(
        run_training, opts, epochs=epochs, lr=lr, total_epsilon=None if math.isinf(total_epsilon) else total_epsilon,
        model_format=format, resume=resume,
        report=report, max_steps_per_epoch=max_steps, micro_batch=micro_batch, record_view=record_view,
        record_view_limit=record_view_limit, label_epsilon=label_epsilon, label_prior=label_prior,
        frozen_head=frozen_head, releases_per_example=releases_per_example, on_device_templates=on_device_templates,
        release=release, adjacency=adjacency, gallery_rows=_rows(gallery_rows),
    )  # fmt: skip
    p = result["privacy"]
    if release is ReleaseKind.CLASS_SUMS:
        on_device = result["on_device"]
        acc = "not measured" if on_device is None else f"{on_device['test_accuracy']:.3f}"
        console.print(
            f"[green]done[/]: one class-sum release of {result['data']['train_images']} images; clean test accuracy "
            f"on the device {acc} on {result['data']['test_images']} held-out images; whole-run epsilon "
            f"{p['total']['epsilon']:.3g} (delta {p['delta_per_release']:g}, noise {p['noise_scale']:.4g}, clip "
            f"{p['clip']:g}; {p['total']['covers']})"
        )
        if report is not None:
            console.print(f"report: {report}")
        return
    console.print(
        f"[green]done[/]: test accuracy {result['final_test_accuracy']:.3f} on {result['data']['test_images']} "
        f"held-out images; {p['mechanism']} epsilon {p['epsilon_per_release']:.3g} per release "
        f"(delta {p['delta_per_release']:g}, noise {p['noise_scale']:.4g}, clip {p['clip']:g}); "
        f"total epsilon {p['total']['epsilon']:.3g} over {p['total']['releases']} releases per example "
        f"(PLD accountant, {p['total']['covers']})"
        + (
            ""
            if p["total"]["label_epsilon"] is None
            else f"; labels randomised at epsilon {label_epsilon:g} per release"
        )
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
