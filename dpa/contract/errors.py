"""The one base for errors a user can fix: bad options, configs, files, budgets.

The CLI prints a ``UserError`` as one clean line and exits 2 (``dpa.cli.errors.user_errors``);
every other exception keeps its traceback, so a bug never looks like bad input. It derives from
``ValueError`` because every one of these is a value the user gave that cannot be used.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A value the user gave (an option, a config field, a file, a budget) cannot be used; the message says how."""
