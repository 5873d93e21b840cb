"""A training run beside its plan: the run record of `velora_cli.VeloraCallback` as a picture.

Left: each measured memory figure per logging interval (peak allocated / reserved and NVML device
used on CUDA; the tracked tensor peak and the process's peak RSS on CPU), with the plan's
prediction of the same figure as a dashed line in the same colour. Right: tokens/s per interval
(the first, a warm-up, has none) and the predicted tokens/s. A figure the plan does not predict
like for like (peak RSS counts the whole process) is drawn without a prediction line.
"""

from __future__ import annotations

from typing import Any

from velora_cli.plots.style import byte_unit, new_figure

# measured figure -> (colour, label); the order they are drawn and listed in
FIGURES = {
    "allocated_bytes": ("#0072B2", "peak allocated (torch.cuda)"),
    "reserved_bytes": ("#E69F00", "peak reserved (torch.cuda)"),
    "device_used_bytes": ("#CC79A7", "device used (NVML)"),
    "tensor_peak_bytes": ("#009E73", "tracked tensor peak"),
    "rss_peak_bytes": ("#999999", "peak RSS, whole process"),
}


def series(record: dict[str, Any]) -> dict[str, list[tuple[int, int]]]:
    """Figure -> [(step, bytes)] over the record's intervals, for the figures in `FIGURES`."""
    out: dict[str, list[tuple[int, int]]] = {}
    for interval in record.get("intervals", []):
        for figure, value in (interval.get("memory") or {}).items():
            if figure in FIGURES and value is not None:
                out.setdefault(figure, []).append((interval["step"], value))
    return out


def predictions(record: dict[str, Any]) -> dict[str, int]:
    """Figure -> the plan's like-for-like prediction of it (from the record's summary)."""
    versus = (record.get("summary") or {}).get("versus") or {}
    return {
        figure: entry["predicted"]
        for figure, entry in versus.items()
        if figure in FIGURES and entry.get("like_for_like") and entry.get("predicted") is not None
    }


def run_figure(record: dict[str, Any]):
    """The two panels (module docstring).

    Raises:
        PlotError: the record has no interval yet (the run logged nothing).
    """
    from matplotlib.ticker import MaxNLocator

    from velora_cli.plots import PlotError

    measured = series(record)
    if not measured:
        raise PlotError(
            "the run record has no logged interval yet; plot it after the Trainer has logged"
        )
    predicted = predictions(record)
    # the whole process's RSS (CPU runs) dwarfs the tensors: its own axis, on the right
    rss = measured.pop("rss_peak_bytes", None) if len(measured) > 1 else None
    top = max([v for points in measured.values() for _, v in points] + list(predicted.values()))
    unit_name, unit = byte_unit(top)
    fig = new_figure(10.0, 3.6)
    memory, speed = fig.subplots(1, 2)
    handles = []
    for figure, points in measured.items():
        colour, label = FIGURES[figure]
        steps, values = zip(*points, strict=True)
        handles += memory.plot(steps, [v / unit for v in values], marker="o", ms=3, color=colour,
                               label=label)  # fmt: skip
        if figure in predicted:
            handles.append(memory.axhline(predicted[figure] / unit, color=colour, ls="--", lw=1,
                                          label=f"{label}: plan"))  # fmt: skip
    memory.set_xlabel("training step (end of logging interval)")
    memory.xaxis.set_major_locator(
        MaxNLocator(integer=True, min_n_ticks=1)
    )  # steps are whole: no 2.5
    memory.set_ylabel(f"memory ({unit_name})")
    memory.set_ylim(bottom=0)
    if rss is not None:
        colour, label = FIGURES["rss_peak_bytes"]
        rss_name, rss_unit = byte_unit(max(v for _, v in rss))
        right = memory.twinx()
        steps, values = zip(*rss, strict=True)
        handles += right.plot(steps, [v / rss_unit for v in values], marker=".", color=colour,
                              label=f"{label} (right axis)")  # fmt: skip
        right.set_ylabel(f"{label} ({rss_name})", color=colour)
        right.set_ylim(bottom=0)
    memory.legend(handles=handles, loc="lower right", frameon=False)
    memory.set_title("memory per logging interval (dashed: the plan's prediction)")
    timed = [(i["step"], i["tokens_per_second"]) for i in record["intervals"]
             if i.get("tokens_per_second")]  # fmt: skip
    if timed:
        steps, tps = zip(*timed, strict=True)
        speed.plot(steps, tps, marker="o", ms=3, color="#0072B2", label="run")
    plan = (record.get("prediction") or {}).get("tokens_per_second")
    if plan:
        speed.axhline(plan, color="#0072B2", ls="--", lw=1, label="plan")
    speed.set_xlabel("training step (end of logging interval)")
    speed.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    speed.set_ylabel("tokens/s")
    speed.set_ylim(bottom=0)
    if timed or plan:
        speed.legend(loc="lower right", frameon=False)
    speed.set_title("throughput per logging interval")
    fig.suptitle(title(record), fontsize=9)
    return fig


def title(record: dict[str, Any]) -> str:
    plan = record.get("plan") or {}
    micro, accum = plan.get("micro_batch_size"), plan.get("grad_accum_steps")
    return (
        f"run of {record.get('model')} on {record.get('device')} · planned on "
        f"{(record.get('prediction') or {}).get('backend')} · micro-batch {micro} × {accum} · "
        f"{record.get('status')}"
    )


def summary_lines(record: dict[str, Any]) -> list[str]:
    """The record's summary in words: each figure's highest value against the plan."""
    from velora_cli.report.units import format_bytes

    lines = []
    summary = record.get("summary") or {}
    for figure, entry in (summary.get("versus") or {}).items():
        measured = (summary.get("memory") or {}).get(figure, summary.get(figure))
        if figure == "tokens_per_second":
            measured = summary.get("tokens_per_second")
            what = f"{measured:,.0f} tokens/s vs plan {entry['predicted']:,.0f}"
        else:
            what = f"{format_bytes(measured)} vs plan {format_bytes(entry['predicted'])}"
        error = entry.get("relative_error")
        like = "" if entry.get("like_for_like") else " (not like for like)"
        error_text = "" if error is None else f", {error:+.1%}"
        lines.append(f"{FIGURES.get(figure, (None, figure))[1]}: {what}{error_text}{like}")
    for mismatch in record.get("mismatches") or []:
        lines.append(f"plan mismatch: {mismatch}")
    return lines
