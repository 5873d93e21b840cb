"""Pictures of velora's documents: ``velora plot FILE -o OUT`` and ``--plot OUT``.

matplotlib is an optional extra (``pip install 'velora-cli[plot]'``), imported only when a
picture is drawn; this package's ``__init__`` imports nothing heavy, so commands can check the
output path and the extra before a long run starts.

OUT's suffix picks the format: ``.png`` or ``.svg`` (one picture) or ``.html`` (one
self-contained page: inline SVG, the terminal's tables, settings and environment). What is drawn
depends on the document's ``kind`` (`kinds.KINDS`): a profile (``velora-profile``, also older
profile documents without a kind) gives the memory timelines and the peak by category; a tune
(``velora-tune``) gives memory against speed with the Pareto front.
"""

from __future__ import annotations

from pathlib import Path

FORMATS = (".png", ".svg", ".html")
INSTALL_HINT = "pictures need matplotlib: pip install 'velora-cli[plot]'"


class PlotError(ValueError):
    """A picture that cannot be drawn as asked; the message says what to do."""


def check_output(path: str | Path) -> Path:
    """Check that OUT can be written before any work is done: a format we write, in a folder
    that exists and that we may write into (a missing folder is not created unasked: a
    mistyped one would otherwise appear silently).

    Args:
        path: the output file.

    Returns:
        The path.

    Raises:
        PlotError: an unknown suffix (the message lists the formats), a missing or unwritable
            folder, or OUT is a folder or a file we may not replace.
    """
    import os

    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise PlotError(
            f"cannot write {path}: the suffix picks the format, choose {', '.join(FORMATS)}"
        )
    where = f"cannot write the plot to {path}"
    parent = path.parent
    if not parent.exists():
        raise PlotError(
            f"{where}: the folder {parent} does not exist (velora does not create it: make it "
            "first, or check its spelling)"
        )
    if not parent.is_dir():
        raise PlotError(f"{where}: {parent} is not a folder")
    if path.is_dir():
        raise PlotError(f"{where}: it is a folder; give a file name ending in .png, .svg or .html")
    # the picture is written as a temporary file beside OUT and renamed over it (style.write_bytes)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PlotError(f"{where}: the folder {parent} is not writable; choose another place")
    return path


def require_matplotlib() -> None:
    """Raise `PlotError` with the install line when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError(INSTALL_HINT) from None


def render(document: dict, out: str | Path, *, rows: list[str] | None = None) -> Path:
    """Draw a document into OUT (format by suffix); the same document gives the same file.

    Args:
        document: a profile or tune document (see `document_kind`).
        out: the file to write (.png, .svg or .html).
        rows: for a profile, the labels of the rows whose timelines are compared (``["all"]``:
            every row); None: baseline, gc and the lowest-peak VeLoRA rows.

    Returns:
        The path written.

    Raises:
        PlotError: unknown format or kind, matplotlib missing, or rows not in the document.
    """
    from velora_cli.plots.kinds import render_document

    path = check_output(out)
    require_matplotlib()
    return render_document(document, path, rows=rows)


__all__ = ["FORMATS", "INSTALL_HINT", "PlotError", "check_output", "render", "require_matplotlib"]
