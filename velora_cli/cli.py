"""The ``velora`` command line: parse, call the core, render. No torch import at module level.

Errors a user can fix (unknown model, bad sub-token size, nonsense budget, no CUDA, ...) end as one
line on stderr and exit code 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import sys
from typing import Annotated

import typer

from velora_cli import __version__

app = typer.Typer(
    name="velora",
    help="Measure and tune the training memory of Hugging Face models with VeLoRA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"debug": False}


class UserError(Exception):
    """An error whose message tells the user what to do; shown as one line, exit code 1."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that carry a one-line, actionable message (imported only when raised)."""
    types: list[type[BaseException]] = [UserError, ValueError, FileNotFoundError, PermissionError]
    for module, name in (
        ("velora_cli.models", "ModelError"),
        ("velora_cli.budget", "BudgetError"),
    ):
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, name):
            types.append(getattr(mod, name))
    return tuple(types)


def _fail(message: str) -> None:
    first_line = " ".join(str(message).split()) or "unknown error"
    typer.echo(f"error: {first_line}", err=True)
    raise typer.Exit(code=1)


def guarded(command):
    """Turn exceptions into one line + exit 1 (a traceback only with --debug)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted: results measured so far were saved as they arrived", err=True)
            raise typer.Exit(code=130) from None
        except Exception as exc:  # noqa: BLE001 - the boundary: everything becomes one line
            if _state["debug"]:
                raise
            if _is_oom(exc):
                _fail(
                    "out of memory: lower --batch-size/--seq-len, use checkpointing or VeLoRA, "
                    "or run with --backend estimate"
                )
            if isinstance(exc, _user_error_types()):
                _fail(str(exc))
            _fail(f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)")

    return wrapper


def _is_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch else None
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"velora {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Show the version."
        ),
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """velora: will VeLoRA, checkpointing or both make your training run fit, and how fast?"""
    _state["debug"] = debug


def _not_yet(command: str) -> None:
    _fail(f"`velora {command}` is not available yet in this version ({__version__})")


@app.command()
@guarded
def profile() -> None:
    """Measure peak memory and step time of VeLoRA placements vs baseline and checkpointing."""
    _not_yet("profile")


@app.command()
@guarded
def tune() -> None:
    """Find the fastest configuration that fits a memory budget, verified by a real run."""
    _not_yet("tune")


@app.command("export-config")
@guarded
def export_config() -> None:
    """Write the tuned configuration for training code (velora, peft or trainer format)."""
    _not_yet("export-config")


def main() -> None:
    """Console-script entry point."""
    app()
