"""The tune as a picture: peak memory against speed for every candidate the tune estimated or
measured, the budget and its margin as lines, the Pareto front joined, rejected candidates marked
by why, the recommendation highlighted and the probe's loss change as colour.

Speed is what the document knows: measured tokens/s for measured candidates, the estimate's
``estimate_tokens_per_second`` for the others where the estimate predicts the same kind of time
(on the estimate and cuda backends; a cpu tune's measured CPU times are not comparable with a GPU
prediction). Candidates with no speed go on an ordinal axis from the tuner's ``cost_rank`` (its
speed proxy), labelled as such, beside the tokens/s axis or instead of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from velora_cli.plots.style import byte_unit, new_figure
from velora_cli.report.units import format_bytes

# status -> (marker, legend text, red edge: rejected); statuses of tuner.TuneResult.
MARKERS = {
    "chosen": ("*", "recommended", False),
    "feasible": ("o", "fits, accepted", False),
    "over-budget": ("s", "over budget − margin", True),
    "rejected-accuracy": ("D", "probe loss over tolerance", True),
    "verification-failed": ("v", "failed its verification run", True),
    "oom": ("X", "out of memory when run (at its estimate)", True),
    "error": ("X", "failed to run (at its estimate)", True),
    "infeasible-estimate": ("x", "estimated over budget, not run", False),
    "not-measured-dominated": ("o", "not run: an accepted one is smaller and faster", False),
    "not-measured-presumed-over": ("s", "not run: presumed over budget", False),
    "not-measured-limit": ("p", "not run: --max-measured reached", False),
}
LOWER_BOUND = ("^", "estimated floor (params + grads + optimizer state) over budget", False)
REJECTED_EDGE = "#C00000"


@dataclass
class Point:
    """One candidate on the picture."""

    row: dict[str, Any]
    peak: int
    measured: bool  # run on the tune's backend (for --backend estimate: stepped on meta)
    lower_bound: bool
    speed: float | None  # tokens/s, measured or predicted
    predicted: bool  # speed from the estimate


def points(document: dict[str, Any]) -> list[Point]:
    """Every candidate with a known peak (measured, else estimated), with its speed if known.

    Args:
        document: a tune document.

    Returns:
        One Point per candidate that has a peak; candidates with neither (a failed estimate)
        are left out.
    """
    comparable = document.get("backend") in ("estimate", "cuda")
    out = []
    for row in document["candidates"]:
        measured = row.get("measure_status") == "ok" and row.get("peak_bytes") is not None
        peak = row["peak_bytes"] if measured else row.get("estimate_peak_bytes")
        if peak is None:
            continue
        speed, predicted = (row.get("tokens_per_second"), False) if measured else (None, False)
        if speed is None and comparable and row.get("estimate_tokens_per_second"):
            speed, predicted = row["estimate_tokens_per_second"], True
        lower = bool(row.get("estimate_lower_bound")) and not measured
        out.append(Point(row, peak, measured, lower, speed, predicted))
    return out


def front(pts: list[Point], speed_of) -> list[Point]:
    """The (peak ↓, speed ↑) Pareto front of the measured points, ordered by speed (the tune
    table's ★; on the estimate backend "measured" means stepped on meta). A candidate the probe
    rejected for accuracy is on no front: it is not a choice (`report.tune.pareto_keys`)."""
    pool = [p for p in pts if p.measured and p.row["status"] not in NOT_A_CHOICE]
    best = [
        p
        for p in pool
        if not any(
            q.peak <= p.peak and speed_of(q) >= speed_of(p)
            and (q.peak < p.peak or speed_of(q) > speed_of(p))
            for q in pool
        )
    ]  # fmt: skip
    return sorted(best, key=lambda p: (speed_of(p), -p.peak))


def tune_figure(document: dict[str, Any]):
    """The tune's picture: one tokens/s panel, one speed-rank panel, or both side by side."""
    pts = points(document)
    timed = [p for p in pts if p.speed is not None]
    ranked = [p for p in pts if p.speed is None]
    panels = [k for k, part in (("speed", timed), ("rank", ranked)) if part]
    widths = [3 if k == "speed" else (2 if timed else 3) for k in panels]
    heading = _wrapped(title(document))
    fig = new_figure(10.5, 5.6 + 0.17 * heading.count("\n"))
    if not pts:
        fig.text(0.5, 0.5, "no candidate has a peak to draw", ha="center")
        return fig
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False, width_ratios=widths)[0]
    largest = max([p.peak for p in pts] + [document["budget_bytes"]])
    unit_name, unit = byte_unit(largest)
    norm, cmap = _loss_colours(document, pts)
    for ax, kind in zip(axes, panels, strict=True):
        part = timed if kind == "speed" else ranked
        speed_of = (lambda p: p.speed) if kind == "speed" else _ranker(part)
        _draw_points(ax, part, speed_of, unit, norm, cmap)
        _budget_lines(ax, document, unit)
        line = front(part, speed_of)
        if len(line) > 1:
            ax.plot([speed_of(p) for p in line], [p.peak / unit for p in line], color="#333333",
                    lw=1, ls="-", zorder=2, label="Pareto front")  # fmt: skip
        _recommended(ax, document, part, speed_of, unit)
        ax.set_xlabel(_speed_label(document, part) if kind == "speed" else _rank_label(timed))
        if kind == "rank":
            _rank_ticks(ax, part)
    axes[0].set_ylabel(f"peak memory ({unit_name})")
    axes[0].set_ylim(0, largest / unit * 1.08)
    _legend(fig, axes, pts, document)
    if norm is not None:
        _colourbar(fig, axes, norm, cmap, document)
    fig.suptitle(heading, x=0.01, ha="left", fontsize=10)
    return fig


# -- drawing -------------------------------------------------------------------------------------


def _draw_points(ax, pts: list[Point], speed_of, unit: int, norm, cmap) -> None:
    for p in pts:
        status = p.row["status"]
        marker, _, rejected = _marker(p)
        li = p.row.get("loss_increase")
        face = "white" if li is None or norm is None else cmap(norm(li))
        edge = REJECTED_EDGE if rejected else ("#222222" if p.measured else "#888888")
        xy = ([speed_of(p)], [p.peak / unit])
        if status == "chosen":  # a halo behind the star
            ax.scatter(*xy, marker="o", s=520, c=["#FFD54F"], alpha=0.6, lw=0, zorder=3.5)
        colours = {"c": [edge]} if marker == "x" else {"c": [face], "edgecolors": [edge]}
        ax.scatter(
            *xy, marker=marker, s=190 if status == "chosen" else 34, **colours,
            linewidths=1.2 if (p.measured or rejected) else 0.7,
            alpha=1.0 if p.measured or status == "chosen" else 0.7, zorder=4 if p.measured else 3,
        )  # fmt: skip


def _marker(p: Point) -> tuple[str, str, bool]:
    """(marker, legend text, rejected) of a point: by its status, a floor by its own."""
    if p.lower_bound:
        return LOWER_BOUND
    return MARKERS.get(p.row["status"], ("o", p.row["status"], False))


def _budget_lines(ax, document: dict[str, Any], unit: int) -> None:
    budget, limit = document["budget_bytes"], document["limit_bytes"]
    ax.axhline(budget / unit, color=REJECTED_EDGE, lw=1, zorder=1)
    ax.axhline(limit / unit, color=REJECTED_EDGE, lw=1, ls="--", zorder=1)


def _recommended(ax, document: dict[str, Any], pts: list[Point], speed_of, unit: int) -> None:
    from velora_cli.report.tune import describe

    rec = document.get("recommendation")
    mine = next((p for p in pts if p.row["status"] == "chosen"), None)
    if rec is None or mine is None:
        return
    tps, search = rec.get("tokens_per_second"), rec.get("search_tokens_per_second")
    real = "estimated" if document.get("backend") == "estimate" else "verification run"
    text = f"recommended: {describe(rec)}\n{real}: peak {format_bytes(rec['peak_bytes'])}" + (
        "" if tps is None else f" · {tps:,.0f} tok/s"
    )
    if tps and search and abs(tps / search - 1) > 0.05:  # drawn at the search's run
        text += f"\n(drawn at the search's run: {search:,.0f} tok/s)"
    x0, x1 = ax.get_xlim()
    right = speed_of(mine) < (x0 + x1) / 2
    ax.annotate(text, (speed_of(mine), mine.peak / unit), xytext=(12 if right else -12, -30),
                textcoords="offset points", ha="left" if right else "right", va="top", fontsize=7.5,
                arrowprops={"arrowstyle": "-", "color": "#333333", "lw": 0.6}, zorder=6,
                bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": "#999999", "lw": 0.5})  # fmt: skip


def _legend(fig, axes, pts: list[Point], document: dict[str, Any]) -> None:
    from matplotlib.lines import Line2D

    seen: dict[str, Line2D] = {}
    order = [*MARKERS.values(), LOWER_BOUND]
    for marker, text, rejected in sorted({_marker(p) for p in pts}, key=order.index):
        run = not (text.startswith("not run") or text.startswith("estimated"))
        edge = REJECTED_EDGE if rejected else ("#222222" if run else "#888888")
        seen[text] = Line2D([], [], ls="none", marker=marker, mec=edge, mfc="white"
                            if marker != "x" else edge, ms=9 if marker == "*" else 6, label=text)  # fmt: skip
    margin = document.get("margin") or 0
    handles = list(seen.values()) + [
        Line2D([], [], color=REJECTED_EDGE, lw=1, label=f"budget {format_bytes(document['budget_bytes'])}"),
        Line2D([], [], color=REJECTED_EDGE, lw=1, ls="--",
               label=f"limit {format_bytes(document['limit_bytes'])} (− {margin:.0%} margin)"),
    ]  # fmt: skip
    if any(len(line.get_xdata()) > 1 for ax in axes for line in ax.get_lines()):
        handles.append(Line2D([], [], color="#333333", lw=1, label="Pareto front"))
    what = "estimated on meta" if document.get("backend") == "estimate" else "measured"
    handles.append(Line2D([], [], ls="none", marker="o", mec="#222222", mfc="white",
                          label=f"dark edge: {what}; grey: estimate only"))  # fmt: skip
    fig.legend(handles=handles, loc="outside right upper", frameon=False, fontsize=7.5)


LOWRANK = ("galore", "adarankgrad")  # probed against AdamW (search.probes)
NOT_A_CHOICE = ("rejected-accuracy",)  # measured, but not a configuration to choose


def _loss_colours(document: dict[str, Any], pts: list[Point]):
    """(norm, colormap) for the probe's loss change, or (None, None) when nothing was probed."""
    values = [p.row["loss_increase"] for p in pts if p.row.get("loss_increase") is not None]
    probed = [p for p in pts if p.row.get("loss") is not None]
    if not values or not probed:
        return None, None
    from matplotlib import colormaps
    from matplotlib.colors import TwoSlopeNorm

    tolerance = document.get("max_loss_increase") or 0.01
    low = min(min(values), -tolerance)
    high = max(max(values), 2 * tolerance)
    return TwoSlopeNorm(vmin=low, vcenter=0.0, vmax=high), colormaps["coolwarm"]


def _colourbar(fig, axes, norm, cmap, document: dict[str, Any]) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.ticker import PercentFormatter

    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), location="bottom",
                       shrink=0.5, aspect=40, pad=0.02)  # fmt: skip
    tolerance = document.get("max_loss_increase")
    bar.set_ticks(spread_ticks(norm, tolerance))
    bar.ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
    if tolerance is not None:
        bar.ax.axvline(tolerance, color="black", lw=1)
    bar.set_label(
        f"probe: held-out loss change vs {probe_reference(document)} (white: not probed; "
        f"black line: tolerance {tolerance:+.1%})",
        fontsize=7.5,
    )


def probe_reference(document: dict[str, Any]) -> str:
    """What the probed candidates' loss change is measured against (`search.probes`): the same
    steps without VeLoRA, and with AdamW for a low-rank optimizer (galore, adarankgrad)."""
    probed = [r for r in document["candidates"] if r.get("loss") is not None]
    lowrank = any(r.get("optimizer") in LOWRANK for r in probed)
    velora = any(r.get("placement") for r in probed if r.get("optimizer") not in LOWRANK)
    if lowrank and velora:
        return "the same steps without VeLoRA, or with AdamW for galore/adarankgrad"
    if lowrank:
        return "the same steps with AdamW"
    return "the same steps without VeLoRA"


def spread_ticks(norm, tolerance: float | None, gap: float = 0.12) -> list[float]:
    """A few colour-bar ticks that do not crowd: 0, the tolerance, the ends, each kept only
    when it is at least ``gap`` of the bar's length from those kept before it (the two-slope
    scale squeezes one side, where default ticks overlap)."""
    kept: list[float] = []
    for value in (0.0, tolerance, norm.vmin, norm.vmax):
        if value is None or not norm.vmin <= value <= norm.vmax:
            continue
        if all(abs(float(norm(value)) - float(norm(k))) >= gap for k in kept):
            kept.append(value)
    return sorted(kept)


# -- axes ----------------------------------------------------------------------------------------


def _ranker(pts: list[Point]):
    """speed_of for the ordinal axis: the fastest expected cost_rank is at the right."""
    ranks = sorted({tuple(p.row.get("cost_rank") or ()) for p in pts})
    position = {rank: len(ranks) - i for i, rank in enumerate(ranks)}
    return lambda p: position[tuple(p.row.get("cost_rank") or ())]


def _rank_ticks(ax, pts: list[Point]) -> None:
    """Ticks at round ranks (1 = fastest, at the right)."""
    from matplotlib.ticker import MaxNLocator

    count = len({tuple(p.row.get("cost_rank") or ()) for p in pts})
    ranks = [int(r) for r in MaxNLocator(nbins=6, integer=True).tick_values(1, count)]
    ranks = sorted({1, *(r for r in ranks if 1 <= r <= count)})
    ax.set_xlim(0.5, count + 0.5)
    ax.set_xticks([count - r + 1 for r in ranks], [str(r) for r in ranks])


def _rank_label(timed: list[Point]) -> str:
    head = "no speed known: " if timed else ""
    return f"{head}expected speed rank, 1 = fastest\n(ordinal: the tuner's cost_rank, not a time)"


def _speed_label(document: dict[str, Any], pts: list[Point]) -> str:
    measured = any(p.measured and not p.predicted for p in pts)
    predicted = any(p.predicted for p in pts)
    backend = document.get("backend")
    gpu = (document.get("settings") or {}).get("gpu") or "the default GPU"
    parts = []
    if measured and backend != "estimate":
        parts.append("measured on this CPU" if backend == "cpu" else "measured (CUDA events)")
    if predicted or backend == "estimate":
        parts.append(f"predicted for {gpu} by the estimate")
    return "tokens/s (" + "; ".join(parts) + ")"


TITLE_WIDTH = 90  # characters per title line: the legend is beside the axes, not the title


def title(document: dict[str, Any]) -> str:
    """The tune table's title (report.tune_table): the run, then each mode's precision, one
    line each."""
    head = (
        f"{document['model']} · batch {document['batch_size']} × seq {document['seq_len']} · "
        f"backend {document['backend']} · budget {format_bytes(document['budget_bytes'])} "
        f"(limit {format_bytes(document['limit_bytes'])})"
    )
    return "\n".join([head, *str(document["precision"]).split(" | ")])


def _wrapped(text: str) -> str:
    """``text`` with every line wrapped at `TITLE_WIDTH` (a figure's title beside its legend)."""
    import textwrap

    lines = text.split("\n")
    return "\n".join(
        "\n".join(textwrap.wrap(line, TITLE_WIDTH, subsequent_indent="    ")) for line in lines
    )
