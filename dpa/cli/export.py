"""``dpa export``: split a network family (VGG-Face, dlib's face ResNet) at a cut and write ONNX Runtime
training artifacts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dpa.cli.errors import console, user_errors
from dpa.contract.architecture import ArchConfig, all_cuts, cut_names
from dpa.contract.choices import NetworkName
from dpa.contract.dlib_resnet import cut_names as dlib_cuts
from dpa.contract.dlib_resnet import stages as dlib_stages
from dpa.contract.manifest import OptimizerConfig, OptimizerName


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError


def _print_cuts(arch: ArchConfig) -> None:
    table = Table(title=f"VGG-Face cuts at {arch.image_size}x{arch.image_size}, width {arch.width}")
    for col in ("cut", "activation (C,H,W)", "bytes/example", "head FLOPs", "head params"):
        table.add_column(col, justify="right" if col != "cut" else "left")
    for info in all_cuts(arch):
        table.add_row(
            info.cut,
            "x".join(str(d) for d in info.activation_shape),
            _human_bytes(info.bytes_per_example),
            f"{100 * info.head_flops_share:.2f}%",
            f"{100 * info.head_params_share:.3f}%",
        )
    console.print(table)


def _print_dlib_cuts() -> None:
    table = Table(title="dlib-resnet cuts at 150x150 (dlib's aligned chip)")
    for col in ("cut", "activation", "bytes/example", "head FLOPs"):
        table.add_column(col, justify="right" if col != "cut" else "left")
    all_stages = dlib_stages()
    total = sum(s.flops for s in all_stages)
    done = 0
    for stage in all_stages:
        done += stage.flops
        table.add_row(stage.name, "x".join(map(str, stage.out_shape)),
                      _human_bytes(4 * math.prod(stage.out_shape)), f"{100 * done / total:.2f}%")  # fmt: skip
    console.print(table)


# export_command's longer options, named here so that the command reads as its signature and its body.
_Cut = Annotated[
    str,
    typer.Option(help=f"Where to cut. vggface: {', '.join(cut_names())}. dlib-resnet: {', '.join(dlib_cuts())}."),
]
_Network = Annotated[
    NetworkName,
    typer.Option(
        "--network",
        "--arch",
        help="Network family: vggface (the seed's) or dlib-resnet (dlib's "
        "public face ResNet, from face-recognition-models; --weights is its .dat file).",
        case_sensitive=False,
    ),
]
_Weights = Annotated[
    Path | None, typer.Option(help="PyTorch state dict with layer names (conv1_1.weight ...).", dir_okay=False)
]
_PixelStd = Annotated[
    float | None, typer.Option(help="Pixel scale; default 1 with --weights (published VGG-Face), 64 without.")
]
_CentreFrom = Annotated[
    Path | None,
    typer.Option(help="Centred releases: PUBLIC faces (LFW layout) whose mean head activation devices subtract."),
]
_ReleaseDims = Annotated[
    int | None,
    typer.Option(help="Project the release on this many principal directions of the --centre-from faces."),
]
_ReleaseWhitening = Annotated[
    float,
    typer.Option(help="With --release-dims: how far to whiten the public spectrum, 0 (plain) to 1 (whitened)."),
]
_FlipAverage = Annotated[
    bool,
    typer.Option(
        "--flip-average",
        help="dlib-resnet at its embedding: the head averages each image's descriptor with its mirror "
        "image's (the test-time flip; twice the device's forward).",
    ),
]
_ClipFrom = Annotated[
    Path | None,
    typer.Option(help="Without --centre-from: PUBLIC faces to measure only the release clip on."),
]


def export_command(
    cut: _Cut = "conv1_1",
    network: _Network = NetworkName.VGGFACE,
    image_size: Annotated[int, typer.Option(help="Input side in pixels, a multiple of 32.")] = 224,
    width: Annotated[float, typer.Option(help="Channel multiplier (0.25 for CPU experiments).")] = 1.0,
    classes: Annotated[int, typer.Option(help="Identities the classifier distinguishes.")] = 2622,
    dropout: Annotated[float, typer.Option(help="Dropout after fc6/fc7 (0 makes training deterministic).")] = 0.5,
    weights: _Weights = None,
    seed: Annotated[int, typer.Option(help="Initialisation seed when no --weights.")] = 0,
    optimizer: Annotated[OptimizerName, typer.Option(help="sgd or adamw.", case_sensitive=False)] = OptimizerName.SGD,
    lr: Annotated[float, typer.Option(help="Learning rate, both halves.")] = 0.01,
    weight_decay: Annotated[float, typer.Option(help="AdamW decoupled weight decay.")] = 0.0,
    out: Annotated[Path, typer.Option(help="Output folder (replaced atomically).")] = Path("artifacts"),
    verify: Annotated[bool, typer.Option(help="Check ORT against torch autograd before publishing.")] = True,
    ort_format: Annotated[bool, typer.Option(help="Also write the head in ORT format (ONNX Runtime Mobile).")] = False,
    list_cuts: Annotated[bool, typer.Option("--list-cuts", help="Print every cut's size and cost, then exit.")] = False,
    pixel_std: _PixelStd = None,
    centre_from: _CentreFrom = None,
    release_dims: _ReleaseDims = None,
    release_whitening: _ReleaseWhitening = 0.0,
    flip_average: _FlipAverage = False,
    clip_from: _ClipFrom = None,
) -> None:
    """Split a network at --cut and write head (device) and tail (edge) training artifacts."""
    with user_errors():
        arch_cfg = ArchConfig(image_size=image_size, width=width, num_classes=classes, dropout=dropout)
        if list_cuts:
            _print_cuts(arch_cfg) if network is NetworkName.VGGFACE else _print_dlib_cuts()
            return
        from exporter.export import ExportConfig, export

        cfg = ExportConfig(
            network=network,
            arch=arch_cfg,
            cut=cut,
            optimizer=OptimizerConfig(name=optimizer, lr=lr, weight_decay=weight_decay),
            out=out,
            weights=weights,
            seed=seed,
            verify=verify,
            ort_format=ort_format,
            pixel_std=pixel_std,
            centre_faces=centre_from,
            clip_faces=clip_from,
            release_dims=release_dims,
            release_whitening=release_whitening,
            flip_average=flip_average,
        )
        with console.status("exporting") as status:
            manifest, report = export(cfg, progress=lambda msg: status.update(msg))
    total = sum((out / rel).stat().st_size for rel in manifest.files)
    console.print(
        f"[green]exported[/] {manifest.arch} cut after [bold]{manifest.cut}[/] to {out}/ "
        f"(activation {'x'.join(map(str, manifest.activation_shape))}, {_human_bytes(total)} of artifacts)"
    )
    if report is not None:
        console.print(
            f"verified against torch autograd: max abs error {report.max_abs_error:.2e}, "
            f"max rel error {report.max_rel_error:.2e} (relative L2, worst: {report.worst}); "
            f"{len(report.errors)} tensors compared"
        )
        for note in report.notes:
            console.print(f"note: {note}")
