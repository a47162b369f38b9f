"""Shared CLI plumbing: turning library ValueErrors into clean one-line errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console

__all__ = ["console", "err_console", "user_errors", "parse_epsilons"]

console = Console()
err_console = Console(stderr=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """A ValueError from the library is the user's mistake: print it, exit 2, no traceback."""
    try:
        yield
    except ValueError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None


def parse_epsilons(text: str) -> tuple[float, ...]:
    """'0.5,1,inf' -> (0.5, 1.0, inf); each must be > 0 (inf: no noise)."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"epsilon {part!r} is not a number (use e.g. 0.5,1,8,inf)") from None
        if not value > 0:
            raise ValueError(f"epsilon must be > 0 (or inf for no noise), got {part}")
        values.append(value)
    if not values:
        raise ValueError("give at least one epsilon")
    return tuple(values)
