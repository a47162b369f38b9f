"""``dpa pretrain``: train VGG-Face on public faces (identities disjoint from every device's)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dpa.cli.errors import console, user_errors


def pretrain_command(
    out: Annotated[Path, typer.Option(help="Weights file to write (a layer-named state dict).")] = Path(
        "runs/pretrained/weights.pt"
    ),
    data: Annotated[str, typer.Option(help="'synthetic' (public identities, seed 1) or a folder of PUBLIC faces.")] = (
        "synthetic"
    ),
    identities: Annotated[int, typer.Option(help="Synthetic public identities.")] = 40,
    per_identity: Annotated[int, typer.Option(help="Synthetic images per public identity.")] = 40,
    image_size: Annotated[int, typer.Option(help="Input side in pixels.")] = 64,
    width: Annotated[float, typer.Option(help="Channel multiplier.")] = 0.25,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 10,
    threads: Annotated[int, typer.Option(help="torch threads: part of the result (reductions split by thread).")] = 2,
    mixed_precision: Annotated[
        bool,
        typer.Option(
            "--mixed-precision",
            help="bfloat16 autocast (CPUs with native bf16 only): faster, "
            "but the weights then depend on the CPU; the sidecar says so.",
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Initialisation and shuffling.")] = 0,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (1e-3 often never takes off).")] = 3e-4,
) -> None:
    """Pretrain the whole network on public faces; then `dpa export --weights OUT --pixel-std 64`."""
    from rich.progress import Progress

    from exporter.pretrain import PretrainConfig, pretrain

    with user_errors():
        cfg = PretrainConfig(out=out, data=data, identities=identities, per_identity=per_identity,
                             image_size=image_size, width=width, epochs=epochs, threads=threads,
                             mixed_precision=mixed_precision, seed=seed, lr=lr)  # fmt: skip
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("pretraining", total=epochs)
            info = pretrain(cfg, progress=lambda e, loss, acc: bar.update(
                task, completed=e, description=f"epoch {e}: loss {loss:.3f}, train acc {acc:.2f}"))  # fmt: skip
    last = info["history"][-1]
    console.print(
        f"[green]pretrained[/] on {info['images']} public images of {len(info['identities'])} identities in "
        f"{info['seconds']:.0f} s in {info['precision']} (train acc {last['train_accuracy']:.2f}); "
        f"wrote {out} and {out}.json. "
        f"Export with: dpa export --weights {out} --pixel-std 64 --width {width:g} --image-size {image_size}"
    )
