"""Output that reads at 80 columns: every command's help, and tables that become a block per row rather
than cut a figure to an ellipsis."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from typer.testing import CliRunner

from dpa.cli.app import app
from dpa.cli.tables import print_records

COMMANDS = [
    ["client"], ["eval"], ["serve"], ["export"], ["demo"], ["sweep"], ["bench"], ["privacy"], ["pretrain"],
    ["federate"], ["recognize"], ["verify"], ["web-device"], ["attack", "inversion"], ["attack", "view"],
    ["attack", "labels"], ["attack", "membership"], ["evaluate", "lfw"], ["faces", "align"], ["token", "add"],
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_reads_at_80_columns(command):
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert not [line for line in lines if len(line) > 80], result.output
    assert "…" not in result.output and "\\[" not in result.output
    # Every option keeps a help column wider than a word or two (rich's panels left it 12 wide).
    helps = [line for line in lines if line.startswith("  --")]
    assert helps and all(len(line) <= 80 for line in helps)


def _render(width: int, rows: list[tuple[str, ...]], columns: tuple[str, ...]) -> str:
    out = Console(width=width, file=io.StringIO(), record=True)
    print_records(out, "a title", columns, rows)
    return out.export_text()


def test_a_table_too_wide_becomes_a_block_per_row_with_every_figure_whole():
    columns = ("run", *(f"figure number {i}" for i in range(9)))
    rows = [("private, per-example", *(f"0.{i}23456" for i in range(9))), ("non-private", *("-" * 9))]
    narrow = _render(80, rows, columns)
    assert "…" not in narrow and max(map(len, narrow.splitlines())) <= 80
    for row in rows:
        assert row[0] in narrow
    for i in range(9):
        assert f"  figure number {i}  0.{i}23456" in narrow
    wide = _render(400, rows, columns)
    assert "┃ run" in wide and "0.823456" in wide and len(wide.splitlines()) < len(narrow.splitlines())
