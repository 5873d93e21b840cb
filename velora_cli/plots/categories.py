"""What fills memory at each row's peak: one horizontal bar per row, stacked by category (the
row's ``peak_breakdown``), the baseline's peak as a reference line."""

from __future__ import annotations

from typing import Any

from velora_cli.plots.style import CATEGORY_COLOURS, CATEGORY_LABELS, UNKNOWN_COLOUR, byte_unit
from velora_cli.report.units import format_bytes


def draw_categories(ax, rows: list[dict[str, Any]], *, legend: bool = True) -> None:
    """Stacked bars of the ok rows' peaks by category into ``ax``, first row on top.

    Rows without a breakdown (the cuda backend reads the allocator's peak counter, which has no
    categories) get one grey bar of their peak.

    Args:
        ax: a matplotlib Axes.
        rows: a profile document's rows (not-ok rows are left out).
        legend: draw the categories' legend (off when the timelines above have one).
    """
    from velora_cli.measure.timeline import STACK

    ok = [r for r in rows if r.get("status") == "ok" and r.get("peak_bytes") is not None]
    largest = max(r["peak_bytes"] for r in ok)
    unit_name, unit = byte_unit(largest)
    present = [c for c in STACK if any((r.get("peak_breakdown") or {}).get(c) for r in ok)]
    y = list(range(len(ok)))
    unknown = False
    for category in present:
        left = [_below(r, category, STACK) / unit for r in ok]
        width = [(r.get("peak_breakdown") or {}).get(category, 0) / unit for r in ok]
        ax.barh(y, width, left=left, height=0.7, color=CATEGORY_COLOURS[category],
                label=CATEGORY_LABELS[category], lw=0)  # fmt: skip
    bare = [i for i, r in enumerate(ok) if not r.get("peak_breakdown")]
    if bare:
        unknown = True
        ax.barh([y[i] for i in bare], [ok[i]["peak_bytes"] / unit for i in bare], height=0.7,
                color=UNKNOWN_COLOUR, label="no categories (allocator peak)", lw=0)  # fmt: skip
    for i, r in enumerate(ok):
        where = (r.get("timeline") or {}).get("peak", {}).get("phase") or _phase(r)
        label = format_bytes(r["peak_bytes"]) + (f" · {where}" if where else "")
        ax.annotate(label, (r["peak_bytes"] / unit, i), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=7.5, bbox={"boxstyle": "square,pad=0.1", "fc": "white",
                    "ec": "none"})  # fmt: skip
    base = next((r for r in ok if r.get("strategy") == "baseline"), None)
    if base is not None:
        ax.axvline(base["peak_bytes"] / unit, color="#333333", lw=0.8, ls="--", zorder=0)
    ax.set_yticks(y, [r["label"] for r in ok])
    ax.invert_yaxis()
    ax.set_xlim(0, largest / unit * 1.32)  # room for the value labels
    ax.set_xlabel(f"memory at the row's peak ({unit_name})" + ("" if base is None else
                  "; dashed: baseline's peak"))  # fmt: skip
    ax.set_title("what fills memory at each row's peak", loc="left")
    handles, labels = ax.get_legend_handles_labels()
    order = [labels.index(CATEGORY_LABELS[c]) for c in reversed(present)]
    if unknown:
        order.append(len(labels) - 1)
    elif not legend:
        return
    ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="lower right",
              frameon=False)  # fmt: skip


def _below(row: dict[str, Any], category: str, stack: tuple[str, ...]) -> int:
    breakdown = row.get("peak_breakdown") or {}
    return sum(breakdown.get(c, 0) for c in stack[: stack.index(category)])


def _phase(row: dict[str, Any]) -> str | None:
    return {"forward_backward": "fwd+bwd", "optimizer": "optimizer"}.get(row.get("peak_phase"))
