"""``dpa faces align``: aligned face chips for a folder of photographs (dlib's detectors and landmarks)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress

from dpa.cli.errors import console, err_console, user_errors

faces_app = typer.Typer(no_args_is_help=True, help="Face photographs: alignment.")


@faces_app.command("align")
def align_command(
    src: Annotated[Path, typer.Argument(help="Photographs in LFW layout: SRC/<identity>/<image>.jpg.")],
    dst: Annotated[Path, typer.Argument(help="A new folder for the chips (same layout, PNG).")],
    workers: Annotated[int, typer.Option(min=1, help="Alignment processes.")] = 2,
) -> None:
    """Detect the central face, find 5 landmarks and write dlib's 150x150 chip of each photo; a photo with no
    face is named and gets no chip. DST appears whole or not at all."""
    from dpa.faces.align import align_folder

    with user_errors():
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("aligning", total=None)
            report = align_folder(src, dst, workers=workers,
                                  progress=lambda i, n: bar.update(task, completed=i, total=n))  # fmt: skip
    for path in report.no_face:
        err_console.print(f"no face found in {path}: no chip written", highlight=False)
    console.print(f"{report.aligned} chips in {dst} ({len(report.cnn)} found by the CNN detector, "
                  f"{len(report.no_face)} photos without a face)", highlight=False)  # fmt: skip
