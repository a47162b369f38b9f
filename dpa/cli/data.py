"""``dpa data synth``: write the built-in synthetic faces in LFW layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress

from dpa.cli.errors import console, user_errors

data_app = typer.Typer(no_args_is_help=True, help="Data sets for training and tests.")


@data_app.command("synth")
def synth_command(
    out: Annotated[Path, typer.Option(help="Folder to create (LFW layout: one subfolder per identity).")],
    identities: Annotated[int, typer.Option(help="Number of identities.")] = 10,
    per_identity: Annotated[int, typer.Option(help="Images per identity.")] = 40,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes the same bytes.")] = 0,
) -> None:
    """Procedurally drawn faces: identity geometry/colouring, per-image pose, light, expression, occlusion."""
    from dpa.faces.synth import SynthConfig, write_synthetic_faces

    with user_errors():
        cfg = SynthConfig(identities=identities, per_identity=per_identity, size=size, seed=seed)
        with Progress(console=console) as progress:
            task = progress.add_task("drawing faces", total=identities * per_identity)
            write_synthetic_faces(out, cfg, progress=lambda done, total: progress.update(task, completed=done))
    console.print(f"wrote {identities * per_identity} faces of {identities} identities to {out}/")
