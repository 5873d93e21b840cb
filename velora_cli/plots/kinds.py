"""From a document to a file: which pictures and tables each kind of document gets, and the
format written (PNG or SVG: one figure; HTML: the page).

`KINDS` maps a document's ``kind`` to its two builders; a new kind of document (the Trainer
callback's ``velora-run`` record, issue 14) is connected by adding one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from velora_cli.plots import PlotError
from velora_cli.plots.page import Section, page
from velora_cli.plots.style import figure_bytes, inline_svg, style, write_bytes


def document_kind(document: Any) -> str:
    """The document's ``kind``; profile documents written before kinds existed have ``rows``.

    Raises:
        PlotError: not a velora document.
    """
    if not isinstance(document, dict):
        raise PlotError("not a velora document: expected a JSON object")
    kind = document.get("kind")
    if kind is None and isinstance(document.get("rows"), list):
        return "velora-profile"
    if kind is None:
        raise PlotError(
            "not a velora document (no 'kind'): plot a file written by velora profile or tune"
        )
    return kind


def render_document(document: dict[str, Any], path: Path, *, rows: list[str] | None) -> Path:
    """Write ``document``'s pictures to ``path`` (see velora_cli.plots.render)."""
    kind = document_kind(document)
    if kind not in KINDS:
        raise PlotError(
            f"cannot draw a {kind!r} document yet; velora plot draws {', '.join(sorted(KINDS))}"
        )
    figure, sections = KINDS[kind]
    fmt = path.suffix.lower().lstrip(".")
    with style():
        if fmt == "html":
            title, subtitle, parts = sections(document, rows)
            data = page(title, subtitle, parts, document).encode("utf-8")
        else:
            data = figure_bytes(figure(document, rows), fmt)
    write_bytes(path, data)
    return path


# -- profile -------------------------------------------------------------------------------------


def _profile_figure(document: dict[str, Any], rows: list[str] | None):
    from velora_cli.plots.profile import combined_figure, select_rows

    _check_profile(document)
    return combined_figure(document, select_rows(document, rows))


def _profile_sections(document: dict[str, Any], rows: list[str] | None):
    from velora_cli import report
    from velora_cli.plots.profile import (
        categories_figure,
        no_timeline,
        select_rows,
        timeline_figure,
        title,
    )
    from velora_cli.plots.timeline import timelines_note

    _check_profile(document)
    chosen = select_rows(document, rows)
    sections = []
    if chosen:
        note = timelines_note(chosen)
        sections.append(
            Section(
                "Memory over one training step",
                svgs=[inline_svg(timeline_figure(document, chosen))],
                caption="live bytes by category after each allocation and free of the tracked "
                "step, stacked, phases shaded; one y axis for every panel"
                + (f"; {note}" if note else ""),
            )
        )
    else:
        sections.append(Section("Memory over one training step", lines=[no_timeline(document)]))
    sections.append(
        Section(
            "What fills memory at each row's peak",
            svgs=[inline_svg(categories_figure(document))],
        )
    )
    tables = [report.profile_table(document), report.category_table(document, always=True)]
    tables += [report.breakdown_table(document)]
    sections.append(
        Section(
            "The profile",
            tables=[t for t in tables if t is not None],
            lines=report.profile_footer(document),
        )
    )
    others = [
        r for r in document["rows"] if r.get("timeline") and r not in chosen and r["status"] == "ok"
    ]
    if others:
        sections.append(
            Section(
                "Every other row's timeline",
                svgs=[inline_svg(timeline_figure(document, others))],
                collapsed=True,
            )
        )
    return f"velora profile: {document['model']}", title(document), sections


def _check_profile(document: dict[str, Any]) -> None:
    if not any(r.get("status") == "ok" and r.get("peak_bytes") for r in document["rows"]):
        raise PlotError("the profile has no measured row to draw (every row failed)")


# -- tune ----------------------------------------------------------------------------------------


def _tune_figure(document: dict[str, Any], rows: list[str] | None):
    from velora_cli.plots.pareto import tune_figure

    _no_rows(rows)
    return tune_figure(document)


def _tune_sections(document: dict[str, Any], rows: list[str] | None):
    from velora_cli import report
    from velora_cli.plots.pareto import title, tune_figure

    _no_rows(rows)
    lines = report.summary_lines(document)
    if document.get("recommendation") is None:
        lines += report.nothing_fits_lines(document)
    sections = [
        Section(
            "Memory against speed",
            svgs=[inline_svg(tune_figure(document))],
            caption="every candidate with a peak: measured where it was run, else estimated; "
            "marker shape says why a candidate was not taken, colour the probe's loss change",
        ),
        Section(
            "The tune",
            tables=[report.tune_table(document)],
            lines=lines + [f"note: {n}" for n in document.get("notices", [])],
        ),
    ]
    subtitle = title(document).replace("\n", " · ")
    return f"velora tune: {document['model']}", subtitle, sections


def _no_rows(rows: list[str] | None) -> None:
    if rows is not None:
        raise PlotError("--rows chooses profile rows; a tune document has candidates")


KINDS: dict[str, tuple[Callable, Callable]] = {
    "velora-profile": (_profile_figure, _profile_sections),
    "velora-tune": (_tune_figure, _tune_sections),
}
