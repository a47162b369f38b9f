"""Tables that read at any width: one table where it fits, else a block per row.

A rich table squeezed into 80 columns (piped output, CI logs, a narrow terminal) cuts its cells to an
ellipsis, figures included. So a table is printed whole only where its widest rendering fits the console;
otherwise each row becomes a block, its first cell as the heading and every other cell on its own line
beside its column's name. Nothing is ever cut: a figure is always shown whole.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

__all__ = ["print_records"]


def print_records(
    console: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], *,
    left: Sequence[str] = (),
) -> None:  # fmt: skip
    """``rows`` under ``columns`` (``left``: the columns aligned left; the others are figures, right)."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in left or col == columns[0] else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    if Measurement.get(console, console.options.update_width(10_000), table).maximum <= console.width:
        console.print(table)
        return
    console.print(f"[bold]{title}[/]", soft_wrap=True)
    width = max(len(c) for c in columns[1:])
    for row in rows:
        console.print(f"[bold]{row[0]}[/]", highlight=False, soft_wrap=True)
        for name, cell in zip(columns[1:], row[1:], strict=True):
            console.print(f"  {name:<{width}}  {cell}", highlight=False, soft_wrap=True)
