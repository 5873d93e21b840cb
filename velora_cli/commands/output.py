"""Where command output goes: tables to stdout at full width, notes and progress to stderr."""

from __future__ import annotations

import typer

# Width when output is not a terminal (a pipe, a file): wide enough that no table is ever cut or
# wrapped, so names read whole (rich sizes a table to its content, not to the console).
UNLIMITED_WIDTH = 100_000


def wide_console(file=None):
    """A console for tables: the terminal's width on a terminal; unlimited width when stdout (or
    ``file``) is not one, so that names are never cut (a pipe has no width to fit)."""
    from rich.console import Console

    if file is not None:
        return Console(file=file, width=UNLIMITED_WIDTH)
    console = Console()
    return console if console.is_terminal else Console(width=UNLIMITED_WIDTH)


def err(message: str) -> None:
    typer.echo(message, err=True)
