"""The memory timeline of one training step per row: live bytes stacked by category over the
step's allocation events, its phases shaded and labelled, the peak marked with its value and
phase. Rows are drawn side by side on one shared y axis, so what a strategy saves is visible at a
glance.

The data is each row's saved ``timeline`` (velora_cli/measure/timeline.py), made from the tracker's
allocation trace by the cpu and estimate backends.
"""

from __future__ import annotations

from typing import Any

from velora_cli.plots.style import CATEGORY_COLOURS, CATEGORY_LABELS, byte_unit
from velora_cli.report.units import fmt_delta, format_bytes

# Background of each kind of phase; the label drawn in it.
PHASE_SHADES = {
    "forward": "#EEF3F8",
    "backward": "#F8F1EA",
    "optimizer": "#F3ECF5",
    "zero_grad": "#F2F2F2",
}
PHASE_SHORT = {"forward": "fwd", "backward": "bwd", "optimizer": "opt", "zero_grad": "zero"}
# States drawn per panel: more than the pixels of a panel a few inches wide, and an SVG of
# a few dozen kilobytes per panel.
DRAWN_POINTS = 600


def default_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows a timeline compares by default: baseline, gc (every layer), the VeLoRA row with
    the lowest peak and the VeLoRA + checkpointing row with the lowest peak (ties: the fewest
    saved activations), of the first optimizer; only rows that carry a timeline.

    Args:
        rows: a profile document's rows.

    Returns:
        Up to four rows, in that order.
    """
    ok = [r for r in rows if r.get("status") == "ok" and r.get("timeline")]
    if not ok:
        return []
    first = ok[0].get("optimizer")
    ok = [r for r in ok if r.get("optimizer") == first]
    chosen = [
        next((r for r in ok if r.get("strategy") == "baseline"), None),
        next((r for r in ok if r.get("strategy") == "gc" and r.get("gc") is True), None),
    ]
    for with_gc in (False, True):
        velora = [r for r in ok if r.get("strategy") == "velora" and bool(r.get("gc")) == with_gc]
        chosen.append(min(velora, key=_leanest) if velora else None)
    return [r for r in chosen if r is not None]


def _leanest(row: dict[str, Any]) -> tuple[int, int]:
    # equal peaks (all in the optimizer step, say): the one that saves the most activations
    return (row["peak_bytes"], row.get("activation_bytes") or 0)


def draw_timelines(fig, rows: list[dict[str, Any]], *, baseline: int | None = None) -> None:
    """Draw one timeline panel per row into ``fig`` (a Figure or SubFigure), sharing y.

    Args:
        fig: where the panels go (side by side).
        rows: rows with a ``timeline``.
        baseline: the baseline row's peak, for each panel's change in the title.
    """
    from velora_cli.measure.timeline import STACK, decode

    decoded = [decode(r["timeline"]) for r in rows]
    largest = max(max(d["totals"]) for d in decoded)
    unit_name, unit = byte_unit(largest)
    axes = fig.subplots(1, len(rows), sharey=True, squeeze=False)[0]
    present = [c for c in STACK if any(any(d["series"][c]) for d in decoded)]
    for ax, row, data in zip(axes, rows, decoded, strict=True):
        _panel(ax, row, data, unit, present, baseline)
    axes[0].set_ylabel(f"live memory ({unit_name})")
    axes[0].set_ylim(0, largest / unit * 1.22)  # headroom for the phase labels and the peak
    handles = [
        _patch(CATEGORY_COLOURS[c], CATEGORY_LABELS[c]) for c in reversed(present)
    ]  # legend top-down as the stack
    fig.legend(handles=handles, loc="outside right upper", frameon=False)


def _panel(ax, row, data, unit: int, present: list[str], baseline: int | None) -> None:
    for name, start, end in data["phases"]:
        kind = name.split(" ")[0]
        ax.axvspan(start, end, color=PHASE_SHADES.get(kind, "#F5F5F5"), lw=0, zorder=0)
        ax.axvline(start, color="#C8C8C8", lw=0.5, zorder=0.5)
    end = max(data["events"], 1)
    quantum = max(1, max(data["totals"]) // 4000)  # a fraction of a pixel: smaller SVGs
    for category, xs, ys in stacked_bands(data, present, DRAWN_POINTS, quantum):
        ax.fill(*_step_polygon(xs, [y / unit for y in ys], end),
                color=CATEGORY_COLOURS[category], lw=0, zorder=2)  # fmt: skip
    ax.set_xlim(0, end)
    _phase_labels(ax, data["phases"], data["events"])
    _peak(ax, data, unit)
    peak = row["peak_bytes"]
    change = ""
    if baseline and row.get("strategy") != "baseline":
        change = f" ({fmt_delta(100 * (peak - baseline) / baseline)} vs baseline)"
    ax.set_title(f"{row['label']}\npeak {format_bytes(peak)}{change}", loc="left")
    ax.set_xlabel(_x_label(data))


def stacked_bands(
    data: dict[str, Any], present: list[str], points: int, quantum: int = 1
) -> list[tuple[str, list[int], list[int]]]:
    """What is painted: for each category, from the top of the stack down, the step curve of
    the stack's height up to and including it, each painted from 0 over the ones above it.

    The decoded timeline is first thinned to at most ``points`` states by the same rule that
    made it (per bucket the lowest and highest total; the peak kept), then each curve keeps only
    the states where it changes by at least ``quantum`` (lossless for a step curve at 1): a
    constant category is one point.

    Args:
        data: a decoded timeline (velora_cli.measure.timeline.decode).
        present: the categories to paint, bottom of the stack first.
        points: the most states a curve may have.
        quantum: heights are rounded to multiples of this many bytes before comparing.

    Returns:
        [(category, event positions, cumulative bytes)], top category first.
    """
    from velora_cli.measure.timeline import thin

    keep = thin(data["totals"], points)
    x = [data["x"][i] for i in keep]
    height = [0] * len(keep)
    bands = []
    for category in present:
        values = data["series"][category]
        height = [h + values[i] for h, i in zip(height, keep, strict=True)]
        xs, ys = [], []
        for xi, yi in zip(x, height, strict=True):
            yi = round(yi / quantum) * quantum
            if not ys or yi != ys[-1]:
                xs.append(xi)
                ys.append(yi)
        bands.append((category, xs, ys))
    return bands[::-1]


def _step_polygon(xs: list[int], ys: list[float], end: int) -> tuple[list[float], list[float]]:
    """The outline of a step curve (each value held until the next x, the last until ``end``)
    closed along y = 0."""
    px, py = [xs[0]], [0.0]
    for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
        nxt = xs[k + 1] if k + 1 < len(xs) else end
        px += [x, nxt]
        py += [y, y]
    px.append(end)
    py.append(0.0)
    return px, py


def _phase_labels(ax, phases: list[list], events: int) -> None:
    """Each phase's name at the top of its band; narrow bands get the short name, upright."""
    from matplotlib.transforms import blended_transform_factory

    transform = blended_transform_factory(ax.transData, ax.transAxes)
    for name, start, end in phases:
        kind, _, number = name.partition(" ")
        share = (end - start) / max(events, 1)
        if share >= 0.18:
            text, rotation = name, 0
        else:
            text, rotation = PHASE_SHORT.get(kind, kind) + (f" {number}" if number else ""), 90
        ax.text(
            (start + end) / 2 if rotation == 0 else start + 0.004 * events,
            0.985,
            text,
            transform=transform,
            ha="center" if rotation == 0 else "left",
            va="top",
            rotation=rotation,
            fontsize=7,
            color="#555555",
            zorder=4,
        )


def _peak(ax, data: dict[str, Any], unit: int) -> None:
    peak = data["peak"]
    x, y = peak["event"], peak["bytes"] / unit
    ax.plot([x], [y], marker="v", color="black", ms=5, zorder=5, clip_on=False)
    right = x < 0.6 * max(data["events"], 1)
    ax.annotate(
        f"peak {format_bytes(peak['bytes'])}\nin {peak['phase'] or 'the step'}",
        (x, y),
        xytext=(6 if right else -6, 2),
        textcoords="offset points",
        ha="left" if right else "right",
        va="bottom",
        fontsize=7.5,
        zorder=6,
        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8},
    )


def _x_label(data: dict[str, Any]) -> str:
    label = f"allocation events ({data['events']:,}; {data['ops']:,} ops)"
    micro = data.get("micro_batches")
    if micro and micro["traced"] < micro["step"]:
        label += f"\n{micro['traced']} of {micro['step']} micro-batches (later ones repeat the 2nd)"
    return label


def _patch(colour: str, label: str):
    from matplotlib.patches import Patch

    return Patch(facecolor=colour, edgecolor="none", label=label)


def timelines_note(rows: list[dict[str, Any]]) -> str | None:
    """One line on how the timelines were thinned, or None when every point was kept."""
    widths = {r["timeline"].get("bucket_events") for r in rows if r.get("timeline")}
    widths.discard(None)
    if not widths:
        return None
    span = f"{min(widths)}" if len(widths) == 1 else f"{min(widths)}–{max(widths)}"
    saved = max(r["timeline"]["points"] for r in rows)
    return (
        f"timelines thinned to ≤ {saved} points: each run of {span} events keeps its lowest "
        "and highest total; the peak is exact"
        + (
            f" (drawn from ≤ {DRAWN_POINTS} of them, by the same rule)"
            if saved > DRAWN_POINTS
            else ""
        )
    )
