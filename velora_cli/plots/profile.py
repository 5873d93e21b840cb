"""The pictures of a profile document: the memory timelines of the compared rows side by side,
above one stacked bar per row of what fills memory at its peak."""

from __future__ import annotations

from typing import Any

from velora_cli.plots import PlotError
from velora_cli.plots.categories import draw_categories
from velora_cli.plots.style import new_figure
from velora_cli.plots.timeline import default_rows, draw_timelines, timelines_note


class RowSelectionError(PlotError):
    """``--rows`` names a row the document does not have, or one without a timeline."""


def select_rows(document: dict[str, Any], rows: list[str] | None) -> list[dict[str, Any]]:
    """The rows whose timelines are drawn.

    Args:
        document: a profile document.
        rows: row labels, ``["all"]`` for every row with a timeline, or None for
            `default_rows` (baseline, gc, the lowest-peak VeLoRA row with and without gc).

    Returns:
        The rows, in the order asked.

    Raises:
        RowSelectionError: a label that is not a row, or a row without a timeline.
    """
    with_timeline = [r for r in document["rows"] if r.get("status") == "ok" and r.get("timeline")]
    if rows is None:
        return default_rows(document["rows"])
    if rows == ["all"]:
        return with_timeline
    by_label = {r["label"]: r for r in document["rows"]}
    chosen = []
    for label in rows:
        row = by_label.get(label)
        if row is None:
            raise RowSelectionError(
                f"--rows: no row {label!r}; rows: {', '.join(repr(k) for k in by_label)}"
            )
        if not row.get("timeline"):
            why = row.get("error") or f"backend {row.get('backend')} records no allocation trace"
            raise RowSelectionError(f"--rows: row {label!r} has no timeline ({why})")
        chosen.append(row)
    return chosen


def title(document: dict[str, Any]) -> str:
    """The profile table's title line (report.profile_table)."""
    return (
        f"{document['model']} · {document['mode']} · batch {document['batch_size']} × seq "
        f"{document['seq_len']} · {document['precision']} · backend {document['backend']}"
    )


def timeline_figure(document: dict[str, Any], rows: list[dict[str, Any]]):
    """The timelines of ``rows`` side by side (at most 4 per line of panels), untitled (the
    HTML page gives the heading and the caption)."""
    fig = new_figure(max(7.0, 3.1 * min(len(rows), 4) + 1.4), 3.5 * _lines(rows))
    base = _baseline_peak(document)
    subfigs = fig.subfigures(_lines(rows), 1, squeeze=False)[:, 0]
    for k, sub in enumerate(subfigs):
        draw_timelines(sub, rows[4 * k : 4 * k + 4], baseline=base)
    return fig


def categories_figure(document: dict[str, Any]):
    """One stacked bar per ok row."""
    ok = [r for r in document["rows"] if r.get("status") == "ok" and r.get("peak_bytes")]
    fig = new_figure(9.5, 1.2 + 0.3 * len(ok))
    draw_categories(fig.subplots(), document["rows"], legend=True)
    return fig


def combined_figure(document: dict[str, Any], rows: list[dict[str, Any]]):
    """Both pictures in one figure (what a .png or .svg holds)."""
    ok = [r for r in document["rows"] if r.get("status") == "ok" and r.get("peak_bytes")]
    top = 3.7 * _lines(rows) if rows else 0.0
    bottom = 1.2 + 0.3 * len(ok)
    fig = new_figure(max(9.5, 3.1 * min(len(rows), 4) + 1.4), top + bottom + 0.4)
    fig.suptitle(title(document), x=0.01, ha="left", fontweight="bold")
    if not rows:
        draw_categories(fig.subplots(), document["rows"], legend=True)
        fig.supxlabel(no_timeline(document), fontsize=7, color="#555555", x=0.01, ha="left")
        return fig
    upper, lower = fig.subfigures(2, 1, height_ratios=[top, bottom])
    base = _baseline_peak(document)
    lines = upper.subfigures(_lines(rows), 1, squeeze=False)[:, 0]
    for k, sub in enumerate(lines):
        draw_timelines(sub, rows[4 * k : 4 * k + 4], baseline=base)
    note = timelines_note(rows)
    if note:
        upper.supxlabel(note, fontsize=7, color="#555555", x=0.01, ha="left")
    draw_categories(lower.subplots(), document["rows"], legend=False)  # the timelines' legend
    return fig


def no_timeline(document: dict[str, Any]) -> str:
    """Why a profile has no timeline to draw, and what to run instead."""
    if document.get("backend") == "cuda":
        return (
            "no timeline: the cuda backend reads the allocator's counters, not a trace; "
            "velora profile --backend cuda --memory-snapshot DIR records CUDA snapshots for "
            "PyTorch's memory_viz, --backend estimate draws this timeline"
        )
    return "no timeline in this document (written by an older velora: profile again to get one)"


def _lines(rows: list[dict[str, Any]]) -> int:
    return max(1, -(-len(rows) // 4))


def _baseline_peak(document: dict[str, Any]) -> int | None:
    base = next(
        (r for r in document["rows"] if r.get("strategy") == "baseline" and r["status"] == "ok"),
        None,
    )
    return base and base.get("peak_bytes")
