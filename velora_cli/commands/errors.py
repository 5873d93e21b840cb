"""Errors at the command-line boundary: one line on stderr and exit code 1, a traceback only with
``--debug`` (the root option sets ``state["debug"]``)."""

from __future__ import annotations

import functools
import sys

import typer

state = {"debug": False}


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


def fail(message: str) -> None:
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
            if state["debug"]:
                raise
            if _is_oom(exc):
                fail(
                    "out of memory: lower --batch-size/--seq-len, use checkpointing or VeLoRA, "
                    "or run with --backend estimate"
                )
            if isinstance(exc, _user_error_types()):
                fail(str(exc))
            fail(f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)")

    return wrapper


def _is_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch else None
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()
