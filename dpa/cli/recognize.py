"""``dpa recognize`` and ``dpa verify``: recognition on the device with the templates it kept after enrolling."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dpa.cli.errors import console, user_errors

_ARTIFACTS = Annotated[Path, typer.Option(help="The export the device enrolled with (its head).")]
_STATE = Annotated[Path, typer.Option(help="The device's state dir, which holds gallery.npz after enrolling.")]
_THRESHOLD = Annotated[
    float | None, typer.Option(help="Cosine threshold (default: the one the gallery keeps, chosen on public faces).")
]


def recognize_command(
    images: Annotated[list[Path], typer.Argument(help="Image files to recognise.")],
    artifacts: _ARTIFACTS = Path("artifacts"),
    state_dir: _STATE = Path("runs/client"),
    threshold: _THRESHOLD = None,
) -> None:
    """Who is in each image: an enrolled identity and its score, or "unknown" below the threshold."""
    from runtime_client.recognize import recognize

    with user_errors():
        results = recognize(artifacts, state_dir, images, threshold=threshold)
    table = Table(title="recognised on this device (its images never leave it)")
    for col in ("image", "identity", "cosine", "best match"):
        table.add_column(col)
    for r in results:
        table.add_row(str(r.path), r.identity, f"{r.score:.3f}", r.best_match)
    console.print(table)


def verify_command(
    first: Annotated[Path, typer.Argument(help="An image file.")],
    second: Annotated[Path, typer.Argument(help="Another image file.")],
    artifacts: _ARTIFACTS = Path("artifacts"),
    state_dir: _STATE = Path("runs/client"),
    threshold: _THRESHOLD = None,
) -> None:
    """Are the two images the same person? (exit 0 yes, 1 no)"""
    from runtime_client.recognize import verify

    with user_errors():
        same, score, used = verify(artifacts, state_dir, first, second, threshold=threshold)
    console.print(f"{'same person' if same else 'different people'}: cosine {score:.3f} (threshold {used:.3f})")
    raise typer.Exit(code=0 if same else 1)
