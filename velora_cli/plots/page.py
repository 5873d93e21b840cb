"""One self-contained HTML page: the pictures as inline SVG, the tables the terminal shows (built
by the same report functions, so the figures are the same), the notes under them, and the run's
settings and environment. No script, stylesheet or font is fetched from anywhere: the page opens
offline.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from typing import Any

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
       margin: 2em auto; max-width: 1400px; padding: 0 1.5em; color: #222; }
h1 { font-size: 1.45em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 2em; }
.sub { color: #555; margin-top: 0; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; }
figcaption, .note { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
caption { text-align: left; font-weight: 600; padding-bottom: 0.3em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.7em; vertical-align: top; }
th { background: #f4f4f4; text-align: left; } td.num, th.num { text-align: right; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
table.kv td:first-child { color: #555; white-space: nowrap; }
ul.lines { padding-left: 1.2em; color: #333; } details summary { cursor: pointer; }
"""


@dataclass
class Section:
    """One part of the page: a heading, then figures (inline SVG), tables and lines."""

    title: str
    svgs: list[str] = field(default_factory=list)
    tables: list[Any] = field(default_factory=list)  # rich Tables
    lines: list[str] = field(default_factory=list)
    caption: str | None = None
    collapsed: bool = False  # inside <details>, for the long parts


def page(title: str, subtitle: str, sections: list[Section], document: dict[str, Any]) -> str:
    """The HTML text of the page.

    Args:
        title: the page's heading (and <title>).
        subtitle: a line under it (the table title: model, shapes, precision, backend).
        sections: the pictures and tables, in order.
        document: the profile or tune document, for the settings and environment tables.

    Returns:
        A complete HTML5 document.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">{_e(subtitle)}</p>',
        f'<p class="sub">{_e(_provenance(document))}</p>',
    ]
    for section in sections:
        parts.append(_section(section))
    parts.append(_section(Section("Settings", tables=[_settings(document)])))
    parts.append(_section(Section("Environment", tables=[_environment(document)])))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _section(section: Section) -> str:
    body = []
    for svg in section.svgs:
        caption = f"<figcaption>{_e(section.caption)}</figcaption>" if section.caption else ""
        body.append(f"<figure>{svg}{caption}</figure>")
    for table in section.tables:
        body.append(table if isinstance(table, str) else rich_table_html(table))
    if section.lines:
        body.append('<ul class="lines">' + "".join(f"<li>{_e(x)}</li>" for x in section.lines))
        body[-1] += "</ul>"
    inner = "\n".join(body)
    if section.collapsed:
        return f"<section><details><summary><h2 style='display:inline'>{_e(section.title)}</h2>" \
            f"</summary>\n{inner}\n</details></section>"  # fmt: skip
    return f"<section><h2>{_e(section.title)}</h2>\n{inner}\n</section>"


def rich_table_html(table) -> str:
    """A rich Table as an HTML <table>: the same title, headers and cells (markup dropped).

    Args:
        table: a `rich.table.Table` built by velora_cli.report.

    Returns:
        The <table> element.
    """
    from rich.text import Text

    def plain(cell) -> str:
        if isinstance(cell, Text):
            return cell.plain
        return Text.from_markup(str(cell)).plain if isinstance(cell, str) else str(cell)

    columns = table.columns
    classes = [' class="num"' if c.justify == "right" else "" for c in columns]
    out = ["<table>"]
    if table.title:
        out.append(f"<caption>{_e(plain(table.title))}</caption>")
    out.append(
        "<thead><tr>"
        + "".join(
            f"<th{k}>{_e(plain(c.header))}</th>" for c, k in zip(columns, classes, strict=True)
        )
        + "</tr></thead><tbody>"
    )
    cells = [list(c.cells) for c in columns]
    for i in range(table.row_count):
        out.append(
            "<tr>"
            + "".join(
                f"<td{k}>{_e(plain(col[i]))}</td>" for col, k in zip(cells, classes, strict=True)
            )
            + "</tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


def _kv_table(caption: str, items: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(_value(v))}</td></tr>" for k, v in items.items())
    return f'<table class="kv"><caption>{_e(caption)}</caption><tbody>{rows}</tbody></table>'


def _settings(document: dict[str, Any]) -> str:
    top = ("kind", "model", "mode", "batch_size", "seq_len", "dtype", "amp", "precision",
           "optimizer", "backend", "gpu", "budget_bytes", "budget_source", "limit_bytes",
           "margin", "objective", "max_loss_increase")  # fmt: skip
    items = {k: document[k] for k in top if k in document}
    items.update({f"settings.{k}": v for k, v in (document.get("settings") or {}).items()})
    return _kv_table("the run's settings, as recorded in its document", items)


def _environment(document: dict[str, Any]) -> str:
    return _kv_table("where it ran", dict(document.get("environment") or {}))


def _provenance(document: dict[str, Any]) -> str:
    bits = [f"created {document['created']}" if document.get("created") else None]
    if document.get("velora_version"):
        bits.append(f"velora {document['velora_version']}")
    if document.get("path"):
        bits.append(f"document {document['path']}")
    return " · ".join(b for b in bits if b)


def _value(value: Any) -> str:
    if value is None:
        return "—"
    return value if isinstance(value, str) else json.dumps(value)


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)
