"""Shared CLI plumbing: a ``UserError`` from the library becomes one clean line and exit 2."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import typer
import typer.core
from rich.console import Console

from dpa.contract.errors import UserError
from dpa.privacy import checks

__all__ = ["console", "err_console", "user_errors", "option_check", "parse_epsilons"]

T = TypeVar("T")

console = Console()
err_console = Console(stderr=True)

# Help and usage errors in click's plain format: it wraps at the terminal's width with an option column of at
# most 30 characters, so every command's help reads at 80 columns (rich's panels sized that column to the
# longest flag pair, --on-device-templates/--no-on-device-templates, and left the help 12 characters wide).
# Every command module imports this one, so the choice holds for each of them; our own tables and progress
# bars still use rich.
typer.core.HAS_RICH = False


@contextmanager
def user_errors() -> Iterator[None]:
    """A ``UserError`` is the user's to fix: print it, exit 2, no traceback. Anything else (a bug)
    keeps its traceback, so it never looks like bad input."""
    try:
        yield
    except UserError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None


def option_check(check: Callable[[T], T]) -> Callable[[T | None], T | None]:
    """A typer callback that runs a library check (``dpa.privacy.checks``) on an option's value:
    the check's message becomes typer's BadParameter, and None (an option not given) passes."""

    def callback(value: T | None) -> T | None:
        if value is None:
            return None
        try:
            return check(value)
        except (TypeError, ValueError) as exc:
            raise typer.BadParameter(str(exc)) from None

    return callback


def _parse_numbers(text: str, name: str, example: str, check: Callable[[float], float]) -> tuple[float, ...]:
    """A comma-separated list of numbers, each passed through ``check``; at least one."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"{name} {part!r} is not a number (use e.g. {example})") from None
        values.append(check(value))
    if not values:
        raise UserError(f"give at least one {name}")
    return tuple(values)


def parse_positive_list(name: str, text: str) -> tuple[float, ...]:
    """'0.5,1,2' -> (0.5, 1.0, 2.0); each a finite number > 0, at least one."""
    return _parse_numbers(text, name, "0.5,1,2", lambda v: checks.positive_finite(name, v))


def parse_dims_list(text: str) -> tuple[int, ...]:
    """'0,16' -> (0, 16); each a whole number >= 0 (0: no projection), at least one."""

    def whole(v: float) -> float:
        if not (v >= 0 and float(v).is_integer()):
            raise UserError(f"release dims must be whole numbers >= 0 (0: no projection), got {v:g}")
        return v

    return tuple(int(v) for v in _parse_numbers(text, "release dims", "0,16", whole))


def parse_epsilons(text: str) -> tuple[float, ...]:
    """'0.5,1,inf' -> (0.5, 1.0, inf); each must be > 0 (inf: no noise)."""
    return _parse_numbers(text, "epsilon", "0.5,1,8,inf", lambda v: checks.epsilon(v, allow_inf=True))
