"""``dpa pretrain``: train VGG-Face on public faces (identities disjoint from every device's)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dpa.cli.errors import console, user_errors

# pretrain_command's longer options, named here so that the command reads as its signature and its body.
_MixedPrecision = Annotated[
    bool,
    typer.Option(
        "--mixed-precision",
        help="bfloat16 autocast (CPUs with native bf16 only): faster, "
        "but the weights then depend on the CPU; the sidecar says so.",
    ),
]
_CosineSchedule = Annotated[bool, typer.Option("--cosine-schedule", help="Learning rate along a half cosine to 0.")]
_ValIdentities = Annotated[
    int, typer.Option(help="Held-out public identities (seed 2) for verification after each epoch; 0: none.")
]
_NoClassifier = Annotated[
    bool, typer.Option("--no-classifier", help="Leave the public fc8 out of the file (an embedding).")
]
_Init = Annotated[
    Path | None,
    typer.Option(help="Start from these weights (an earlier dpa pretrain's) instead of a fresh initialisation."),
]


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
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 32,
    threads: Annotated[int, typer.Option(help="torch threads: part of the result (reductions split by thread).")] = 2,
    mixed_precision: _MixedPrecision = False,
    seed: Annotated[int, typer.Option(help="Initialisation and shuffling.")] = 0,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (1e-3 often never takes off).")] = 3e-4,
    # A string, parsed by PretrainConfig: an Enum here would import torch into every `dpa` command.
    loss: Annotated[str, typer.Option(help="'softmax' over the public identities, or 'cosface' (a margin).")] = (
        "softmax"
    ),
    margin: Annotated[float, typer.Option(help="CosFace margin m (reached after --margin-ramp-epochs).")] = 0.35,
    scale: Annotated[float, typer.Option(help="CosFace scale s.")] = 30.0,
    margin_ramp_epochs: Annotated[float, typer.Option(help="Epochs over which the margin grows from 0.")] = 2.0,
    augment: Annotated[bool, typer.Option("--augment", help="Mirror and shift each training image.")] = False,
    cosine_schedule: _CosineSchedule = False,
    warmup_epochs: Annotated[float, typer.Option(help="Linear learning-rate warmup over these first epochs.")] = 0.0,
    val_identities: _ValIdentities = 0,
    val_per_identity: Annotated[int, typer.Option(help="Images per validation identity.")] = 8,
    no_classifier: _NoClassifier = False,
    init: _Init = None,
) -> None:
    """Pretrain the whole network on public faces; then `dpa export --weights OUT --pixel-std 64`."""
    from rich.progress import Progress

    from exporter.pretrain import PretrainConfig, pretrain

    with user_errors():
        cfg = PretrainConfig(out=out, data=data, identities=identities, per_identity=per_identity,
                             image_size=image_size, width=width, epochs=epochs, threads=threads, batch_size=batch_size,
                             mixed_precision=mixed_precision, seed=seed, lr=lr, loss=loss, margin=margin,
                             scale=scale, margin_ramp_epochs=margin_ramp_epochs, augment=augment,
                             cosine_schedule=cosine_schedule, warmup_epochs=warmup_epochs,
                             val_identities=val_identities, val_per_identity=val_per_identity,
                             keep_classifier=not no_classifier, init=init)  # fmt: skip
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("pretraining", total=epochs)

            def progress(row: dict[str, Any]) -> None:
                e, loss, acc = row["epoch"], row["loss"], row["train_accuracy"]
                # A line per epoch too: a run whose output goes to a file shows how it goes.
                val = f", val AUC {row['val_auc']:.3f}" if "val_auc" in row else ""
                bar.console.print(f"epoch {e}/{epochs}: loss {loss:.3f}, train acc {acc:.3f}{val}")
                bar.update(task, completed=e, description=f"epoch {e}: loss {loss:.3f}, train acc {acc:.2f}")
                if row["at_chance"] and e >= 2:
                    bar.console.print(
                        f"[yellow]warning:[/] after {e} epochs the loss is still that of guessing ({loss:.3f}) and "
                        "train accuracy at chance: this run has not taken off and may never (a plain VGG "
                        "without batch norm); stop it and try a lower --lr, --warmup-epochs or fewer identities"
                    )

            info = pretrain(cfg, progress=progress)
    last = info["history"][-1]
    if last["at_chance"]:
        console.print(f"[yellow]warning:[/] this pretraining never left chance (final loss {last['loss']:.3f}): "
                      "its weights are no better than random features")  # fmt: skip
    if "val_auc" in last:
        console.print(
            f"verification on held-out public pairs: ROC AUC {last['val_auc']:.4f}, TAR at FAR 1e-3 "
            f"{last['val_tar_at_far_1e-3']:.3f}, accuracy {last['val_accuracy']:.3f}"
        )
    console.print(
        f"[green]pretrained[/] on {info['images']} public images of {len(info['identities'])} identities in "
        f"{info['seconds']:.0f} s in {info['precision']} (train acc {last['train_accuracy']:.2f}); "
        f"wrote {out} and {out}.json. "
        f"Export with: dpa export --weights {out} --pixel-std 64 --width {width:g} --image-size {image_size}"
    )
