"""Shared CLI plumbing: turning library ValueErrors into clean one-line errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console

__all__ = ["console", "err_console", "user_errors"]

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
