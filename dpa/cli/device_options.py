"""The options every device command shares (``dpa client``, ``dpa eval``), declared once.

``@device_options`` adds them to a command's signature (typer reads ``__signature__``) and hands
the command one frozen ``DeviceOptions`` in their place, which ``client_config`` turns into the
runtime's ``ClientConfig``. A new device option is one line here, not one per command.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from dpa.cli.errors import option_check
from dpa.contract.devices import DeviceProfile
from dpa.contract.wire import ReleaseDtype
from dpa.faces.synth import SynthConfig
from dpa.privacy import checks
from dpa.privacy.mechanism import DPConfig, Mechanism

__all__ = ["DeviceOptions", "device_options", "client_config"]


def _opt(help: str, **kwargs: Any) -> typer.models.OptionInfo:
    return typer.Option(help=help, **kwargs)


@dataclass(frozen=True)
class DeviceOptions:
    """What a device command was told on its command line (validated by the configs it builds)."""

    server: Annotated[str, _opt("Edge server URL.")] = "http://127.0.0.1:8080"
    artifacts: Annotated[Path, _opt("Export folder (manifest.json + head/).")] = Path("artifacts")
    data: Annotated[str, _opt("'synthetic' or a folder in LFW layout (one subfolder per identity).")] = "synthetic"
    device: Annotated[DeviceProfile, _opt("cpu, arm64, cuda or auto: see docs/commands.md.", case_sensitive=False)] = (
        DeviceProfile.CPU
    )
    batch_size: Annotated[int, _opt("Examples per step (client) or per request (eval).")] = 8
    mechanism: Annotated[Mechanism, _opt("gaussian (L2 clip) or laplace (L1 clip).", case_sensitive=False)] = (
        Mechanism.GAUSSIAN
    )
    epsilon: Annotated[
        float,
        _opt(
            "Privacy budget of ONE release of one example; 'inf' = no noise.",
            callback=option_check(partial(checks.epsilon, allow_inf=True)),
        ),
    ] = 8.0
    delta: Annotated[float, _opt("delta of one release (gaussian).")] = 1e-5
    clip: Annotated[
        float | None,
        _opt("Per-example activation norm bound C (sensitivity 2C); default the export's public clip."),
    ] = None
    seed: Annotated[int | None, _opt("Reproducible noise and shuffling (experiments only).")] = None
    min_faces_per_person: Annotated[int, _opt("Skip identities with fewer images.")] = 2
    identities: Annotated[int, _opt("Synthetic identities (with --data synthetic).")] = 10
    per_identity: Annotated[int, _opt("Synthetic images per identity.")] = 40
    state_dir: Annotated[Path, _opt("Head checkpoint and data cache folder.")] = Path("runs/client")
    wire_dtype: Annotated[
        ReleaseDtype,
        _opt("float32, or float16: half the upload (rounded after the noise; no privacy cost).", case_sensitive=False),
    ] = ReleaseDtype.FLOAT32
    token_file: Annotated[
        Path | None, _opt("File with this device's token (`dpa token add --out`); or set DPA_TOKEN.")
    ] = None
    ca: Annotated[Path | None, _opt("CA certificate (PEM) that signed an https server's certificate.")] = None
    retry_s: Annotated[float, _opt("Keep retrying through network errors and server restarts this many seconds.")] = (
        600.0
    )


_SHARED = tuple(f.name for f in fields(DeviceOptions))


def device_options(command: Callable[..., None]) -> Callable[..., None]:
    """``command(opts: DeviceOptions, **own)`` -> a typer command taking the shared options and its own."""
    hints = inspect.get_annotations(DeviceOptions, eval_str=True)
    shared = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
        for f in fields(DeviceOptions)
    ]
    own = [p for name, p in inspect.signature(command, eval_str=True).parameters.items() if name != "opts"]

    def run(**values: Any) -> None:
        opts = DeviceOptions(**{name: values.pop(name) for name in _SHARED})
        command(opts, **values)

    run.__signature__ = inspect.Signature(shared + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own])  # type: ignore[attr-defined]
    run.__name__, run.__doc__ = command.__name__, command.__doc__
    return run


def _clip(opts: DeviceOptions) -> float:
    """--clip, or the export's public clip: ``dpa.privacy.release_clip``'s policy (refused when neither)."""
    from dpa.contract.manifest import load_manifest
    from dpa.privacy.release_clip import release_clip

    if opts.clip is not None:
        return release_clip(None, opts.clip)
    return release_clip(load_manifest(opts.artifacts), source=opts.artifacts)


def _per_release(opts: DeviceOptions, fields: dict[str, Any]) -> float | None:
    """--epsilon, unless a whole-run budget (--total-epsilon) plans each release instead."""
    return None if fields.get("total_epsilon") is not None else opts.epsilon


def client_config(opts: DeviceOptions, **fields: Any) -> Any:
    """The runtime's ``ClientConfig`` for these options (each field validated there, once).

    The runtime is imported here, not at the top: ``dpa --help`` and every other command then
    start without loading onnxruntime."""
    from runtime_client.config import ClientConfig
    from runtime_client.edge import read_token_file

    token = read_token_file(opts.token_file) if opts.token_file is not None else os.environ.get("DPA_TOKEN") or None
    return ClientConfig(
        token=token,
        server=opts.server,
        artifacts=opts.artifacts,
        data=opts.data,
        device=opts.device,
        batch_size=opts.batch_size,
        dp=DPConfig(mechanism=opts.mechanism, clip=_clip(opts), epsilon=_per_release(opts, fields), delta=opts.delta),
        seed=opts.seed,
        min_faces_per_person=opts.min_faces_per_person,
        synth=SynthConfig(identities=opts.identities, per_identity=opts.per_identity),
        state_dir=opts.state_dir,
        release_dtype=opts.wire_dtype,
        ca=opts.ca,
        retry_s=opts.retry_s,
        **fields,
    )
