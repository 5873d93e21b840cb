"""``velora plot``: pictures of a saved profile or tune document."""

from __future__ import annotations

from typing import Annotated

import typer

from velora_cli.commands.errors import UserError, guarded
from velora_cli.commands.output import err


@guarded
def plot(
    file: Annotated[
        str | None,
        typer.Argument(
            help="A profile or tune document (default: the latest one under profiles/)."
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="The picture: .png, .svg or .html (one offline page with the tables, "
            "settings and environment). Default: FILE with .html.",
        ),
    ] = None,
    rows: Annotated[
        str | None,
        typer.Option(
            "--rows",
            help="Profile rows whose timelines are compared: labels, comma-separated, or "
            "'all'. Default: baseline, gc and the lowest-peak VeLoRA rows.",
        ),
    ] = None,
) -> None:
    """Draw a profile (memory timelines, peak by category) or a tune (memory vs speed)."""
    import json
    from pathlib import Path

    from velora_cli import plots

    if output is not None:
        plots.check_output(output)
    plots.require_matplotlib()
    path = Path(file) if file else latest_document()
    if not path.is_file():
        raise UserError(f"no document at {path}: give a file written by velora profile or tune")
    try:
        text = path.read_text()
        document = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        if _is_journal(text if not isinstance(exc, UnicodeDecodeError) else ""):
            raise UserError(
                f"{path} is a tune journal (JSON lines, what velora tune --resume reads), not a "
                "document: plot the tune document that names it (tune-*.json, its 'journal' "
                "field), e.g. velora plot with no FILE for the latest"
            ) from None
        raise UserError(f"{path} is not a JSON document ({exc})") from None
    out = Path(output) if output else path.with_suffix(".html")
    chosen = [r.strip() for r in rows.split(",") if r.strip()] if rows else None
    plots.render(document, out, rows=chosen)
    err(f"wrote {out}")


def _is_journal(text: str) -> bool:
    """Whether ``text`` reads as a tune journal: JSON lines, the first a journal header."""
    import json

    first = text.split("\n", 1)[0]
    try:
        head = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(head, dict) and head.get("stage") == "header"


def latest_document():
    """The most recently written profile or tune document under the profiles directory."""
    from velora_cli.search.autotune import latest, profiles_dir

    found = [p for p in (latest("profile-*.json"), latest("tune-*.json")) if p is not None]
    if not found:
        raise UserError(
            f"no profile or tune document under {profiles_dir()}/: run velora profile or "
            "tune first, or give FILE"
        )
    return max(found, key=lambda p: p.stat().st_mtime)
