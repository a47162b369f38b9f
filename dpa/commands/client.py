"""``dpa client`` and ``dpa eval``: the device side of split training."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from dpa.cli_util import console, user_errors
from dpa.devices import DeviceProfile

ServerOpt = Annotated[str, typer.Option(help="Edge server URL.")]
ArtifactsOpt = Annotated[Path, typer.Option(help="Export folder (manifest.json + head/).")]
DataOpt = Annotated[str, typer.Option(help="'synthetic' or a folder in LFW layout (one subfolder per identity).")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, arm64, cuda or auto: see README's --device table.")]
MechanismOpt = Annotated[str, typer.Option(help="gaussian (L2 clip) or laplace (L1 clip).")]
EpsilonOpt = Annotated[float, typer.Option(help="Privacy budget of ONE release of one example; 'inf' = no noise.")]
DeltaOpt = Annotated[float, typer.Option(help="delta of one release (gaussian).")]
ClipOpt = Annotated[float, typer.Option(help="Per-example activation norm bound C (sensitivity 2C).")]
SeedOpt = Annotated[int | None, typer.Option(help="Reproducible noise and shuffling (experiments only).")]
StateOpt = Annotated[Path, typer.Option(help="Head checkpoint and data cache folder.")]
TokenFileOpt = Annotated[
    Path | None,
    typer.Option(help="File with this device's token (`dpa token add --out`); or set DPA_TOKEN."),
]
CaOpt = Annotated[Path | None, typer.Option(help="CA certificate (PEM) that signed an https server's certificate.")]
WireDtypeOpt = Annotated[
    str, typer.Option(help="float32, or float16: half the upload (rounded after the noise; no privacy cost).")
]
RetryOpt = Annotated[
    float, typer.Option(help="Keep retrying through network errors and server restarts this many seconds.")
]


def _epsilon(value: float) -> float:
    if math.isnan(value) or value <= 0:
        raise typer.BadParameter("epsilon must be > 0 (or inf for no noise)")
    return value


def _run_client(
    run: Callable[[Any], Awaitable[dict[str, Any]]],
    *,
    device: str,
    mechanism: str,
    epsilon: float,
    delta: float,
    clip: float,
    identities: int,
    per_identity: int,
    token_file: Path | None,
    **fields: Any,
) -> dict[str, Any]:
    """Build the ClientConfig from CLI values and run ``run`` on it; user errors exit cleanly."""
    import os

    from runtime_client.edge import EdgeError, read_token_file
    from runtime_client.mechanism import DPConfig, Mechanism
    from runtime_client.synth import SynthConfig
    from runtime_client.trainer import ClientConfig

    with user_errors():
        token = read_token_file(token_file) if token_file is not None else os.environ.get("DPA_TOKEN") or None
        cfg = ClientConfig(
            token=token,
            device=DeviceProfile.parse(device),
            dp=DPConfig(mechanism=Mechanism.parse(mechanism), clip=clip, epsilon=epsilon, delta=delta),
            synth=SynthConfig(identities=identities, per_identity=per_identity),
            **fields,
        )
        try:
            return asyncio.run(run(cfg))
        except EdgeError as exc:
            raise ValueError(str(exc)) from None


def client_command(
    server: ServerOpt = "http://127.0.0.1:8080",
    artifacts: ArtifactsOpt = Path("artifacts"),
    data: DataOpt = "synthetic",
    device: DeviceOpt = "cpu",
    epochs: Annotated[int, typer.Option(help="Passes over the training images.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 8,
    lr: Annotated[float | None, typer.Option(help="Head learning rate (default: the manifest's).")] = None,
    mechanism: MechanismOpt = "gaussian",
    epsilon: Annotated[float, typer.Option(callback=_epsilon, help=EpsilonOpt.__metadata__[0].help)] = 8.0,
    delta: DeltaOpt = 1e-5,
    clip: ClipOpt = 10.0,
    seed: SeedOpt = None,
    total_epsilon: Annotated[
        float | None,
        typer.Option(
            help="Budget for the whole run: calibrates the noise for --epochs releases (overrides --epsilon)."
        ),
    ] = None,
    min_faces_per_person: Annotated[int, typer.Option(help="Skip identities with fewer images.")] = 2,
    identities: Annotated[int, typer.Option(help="Synthetic identities (with --data synthetic).")] = 10,
    per_identity: Annotated[int, typer.Option(help="Synthetic images per identity.")] = 40,
    format: Annotated[str, typer.Option("--format", help="Head model format: auto, onnx or ort.")] = "auto",
    state_dir: StateOpt = Path("runs/client"),
    resume: Annotated[bool, typer.Option(help="Continue from the head checkpoint in --state-dir.")] = False,
    report: Annotated[Path | None, typer.Option(help="Write a JSON report here.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Cap on steps per epoch (quick runs).")] = None,
    micro_batch: Annotated[
        int | None, typer.Option(help="Examples per head call (1: least memory, same update); default the batch.")
    ] = None,
    wire_dtype: WireDtypeOpt = "float32",
    token_file: TokenFileOpt = None,
    ca: CaOpt = None,
    retry_s: RetryOpt = 600.0,
) -> None:
    """Train privately: head on this device, DP-A activations to the edge server."""
    from dpa.wire import ReleaseDtype
    from runtime_client.head import ModelFormat
    from runtime_client.trainer import run_training

    with user_errors():
        model_format = ModelFormat.parse(format)
        release_dtype = ReleaseDtype.parse(wire_dtype)
    result = _run_client(
        run_training,
        device=device, mechanism=mechanism, epsilon=epsilon, delta=delta, clip=clip,
        identities=identities, per_identity=per_identity,
        server=server, artifacts=artifacts, data=data, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
        min_faces_per_person=min_faces_per_person, state_dir=state_dir, resume=resume, report=report,
        model_format=model_format, max_steps_per_epoch=max_steps, total_epsilon=total_epsilon,
        micro_batch=micro_batch, release_dtype=release_dtype, token_file=token_file, ca=ca, retry_s=retry_s,
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


def eval_command(
    server: ServerOpt = "http://127.0.0.1:8080",
    artifacts: ArtifactsOpt = Path("artifacts"),
    data: DataOpt = "synthetic",
    device: DeviceOpt = "cpu",
    batch_size: Annotated[int, typer.Option(help="Examples per request.")] = 8,
    mechanism: MechanismOpt = "gaussian",
    epsilon: Annotated[float, typer.Option(callback=_epsilon, help=EpsilonOpt.__metadata__[0].help)] = 8.0,
    delta: DeltaOpt = 1e-5,
    clip: ClipOpt = 10.0,
    seed: SeedOpt = None,
    min_faces_per_person: Annotated[int, typer.Option(help="Skip identities with fewer images.")] = 2,
    identities: Annotated[int, typer.Option(help="Synthetic identities (with --data synthetic).")] = 10,
    per_identity: Annotated[int, typer.Option(help="Synthetic images per identity.")] = 40,
    state_dir: StateOpt = Path("runs/client"),
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    wire_dtype: WireDtypeOpt = "float32",
    token_file: TokenFileOpt = None,
    ca: CaOpt = None,
    retry_s: RetryOpt = 600.0,
) -> None:
    """Held-out accuracy through this device's head and the server's tail (test activations get DP-A too)."""
    from dpa.wire import ReleaseDtype
    from runtime_client.trainer import run_evaluation

    with user_errors():
        release_dtype = ReleaseDtype.parse(wire_dtype)

    result = _run_client(
        run_evaluation,
        device=device, mechanism=mechanism, epsilon=epsilon, delta=delta, clip=clip,
        identities=identities, per_identity=per_identity,
        server=server, artifacts=artifacts, data=data, batch_size=batch_size, seed=seed,
        min_faces_per_person=min_faces_per_person, state_dir=state_dir, progress=False,
        release_dtype=release_dtype, token_file=token_file, ca=ca, retry_s=retry_s,
    )  # fmt: skip
    if json_out:
        print(json.dumps(result))
    else:
        console.print(f"test accuracy {result['test_accuracy']:.3f} on {result['test_images']} images")
