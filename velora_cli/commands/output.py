"""Where command output goes: tables to stdout at full width, notes and progress to stderr."""

from __future__ import annotations

import typer


def wide_console():
    """A console for tables: the terminal's width, or 140 columns when piped (not 80)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=140)


def err(message: str) -> None:
    typer.echo(message, err=True)
