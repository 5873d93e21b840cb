"""How every velora picture looks and is written: category colours, the byte axis, and a
deterministic save (the same document always gives the same file).

Determinism (matplotlib 3.7+): no dates in the metadata, a fixed ``svg.hashsalt`` (matplotlib
otherwise draws its SVG ids at random), a fixed ``Software`` in PNGs, and the bundled DejaVu Sans
font for every measurement of text. SVG text stays text (``svg.fonttype: none``: a third of the
size of glyph paths, and searchable in the HTML page); a viewer without DejaVu Sans draws it in
its own sans-serif.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Okabe & Ito's colour-blind-safe palette, one colour per tracker category.
CATEGORY_COLOURS = {
    "params": "#0072B2",
    "buffers": "#56B4E9",
    "optimizer": "#CC79A7",
    "grads": "#E69F00",
    "activations": "#009E73",
    "temporaries": "#D55E00",
}
CATEGORY_LABELS = {
    "params": "params",
    "buffers": "buffers",
    "optimizer": "optimizer state",
    "grads": "grads",
    "activations": "activations",
    "temporaries": "temporaries",
}
UNKNOWN_COLOUR = "#BBBBBB"  # a peak with no breakdown (the cuda allocator's counter)
SOFTWARE = "velora (matplotlib)"

_RC = {
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "svg.hashsalt": "velora",
    "svg.fonttype": "none",
    "savefig.dpi": 120,
}


@contextlib.contextmanager
def style() -> Iterator[None]:
    """matplotlib settings for velora's figures, restored on exit."""
    import matplotlib

    with matplotlib.rc_context(_RC):
        yield


def new_figure(width: float, height: float):
    """A figure outside pyplot (no GUI backend, no global figure list), in inches."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def byte_unit(largest: int) -> tuple[str, int]:
    """(name, bytes) of the unit a byte axis reaching ``largest`` is drawn in."""
    for name, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if largest >= size:
            return name, size
    return "B", 1


def figure_bytes(fig, fmt: str) -> bytes:
    """The figure as PNG or SVG bytes, deterministically.

    Args:
        fig: a matplotlib Figure.
        fmt: ``png`` or ``svg``.

    Returns:
        The encoded file.
    """
    metadata: dict[str, Any] = (
        {"Software": SOFTWARE} if fmt == "png" else {"Date": None, "Creator": SOFTWARE}
    )
    buffer = io.BytesIO()
    with style():
        fig.savefig(buffer, format=fmt, metadata=metadata)
    return buffer.getvalue()


def inline_svg(fig) -> str:
    """The figure as an ``<svg>`` element for an HTML page (no XML prolog or doctype)."""
    text = figure_bytes(fig, "svg").decode("utf-8")
    return text[text.index("<svg") :]


def write_bytes(path: Path, data: bytes) -> None:
    """Write a file in one piece: a reader (or a crash) never sees half of it."""
    import os
    import tempfile

    from velora_cli.plots import PlotError

    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:  # the folder went away or became read-only since check_output
        raise PlotError(f"cannot write the plot to {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a picture is for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
