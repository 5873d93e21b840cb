"""The verdict of a profile as one or two lines a person can act on (data: `profiling.verdict`).

Example line: ``best trade: velora all-linear g16 + gc + offload inputs: −41% memory at +6%
predicted time (1.2 GB on the device, 0.3 GB pinned host)``.
"""

from __future__ import annotations

from typing import Any

from velora_cli.report.units import fmt_bytes, fmt_delta, fmt_seconds


def _change(pick: dict[str, Any], time_word: str) -> str:
    parts = []
    if pick.get("memory_ratio") is not None:
        parts.append(f"{fmt_delta(100 * (pick['memory_ratio'] - 1))} memory")
    if pick.get("time_ratio") is not None:
        parts.append(f"{fmt_delta(100 * (pick['time_ratio'] - 1))} {time_word}")
    return " at ".join(parts)


def _figures(pick: dict[str, Any]) -> str:
    text = f"{fmt_bytes(pick['memory_bytes'])}"
    if pick.get("seconds") is not None:
        text += f", {fmt_seconds(pick['seconds'])}"
    if pick.get("host_bytes"):
        text += f", {fmt_bytes(pick['host_bytes'])} pinned host"
    return text


def _describe(name: str, pick: dict[str, Any], time_word: str) -> str:
    change = _change(pick, time_word)
    return f"{name}: {pick['label']}" + (f": {change}" if change else "") + f" ({_figures(pick)})"


def verdict_lines(verdict: dict[str, Any]) -> list[str]:
    """One or two lines: lowest memory and fastest, then the best trade and the budget.

    Args:
        verdict: a `profiling.verdict.Verdict` as a dict (``document["verdict"]``).
    """
    lowest = verdict.get("lowest_memory")
    if lowest is None:
        return ["verdict: no row could be estimated (see the errors above)"]
    time_word = "predicted time" if verdict.get("time_source") == "predicted" else "time"
    first = [_describe("lowest memory", lowest, time_word)]
    if verdict.get("fastest") is not None:
        first.append(_describe("fastest", verdict["fastest"], time_word))
    lines = ["verdict: " + "; ".join(first)]
    second = []
    trade, base = verdict.get("best_trade"), verdict.get("baseline")
    if trade is not None:
        if base is not None and trade["label"] == base["label"]:
            second.append("best trade: baseline (no row saves memory worth its time)")
        else:
            second.append(_describe("best trade", trade, time_word))
    if verdict.get("budget") is not None:
        budget = fmt_bytes(verdict["budget"])
        if verdict.get("fitting"):
            fit, measured = len(verdict["fitting"]), verdict["measured"]
            second.append(f"budget {budget}: {fit} of {measured} rows fit")
        else:
            over = lowest["memory_bytes"] - verdict["budget"]
            second.append(
                f"budget {budget}: nothing fits (the lowest row needs {fmt_bytes(over)} more)"
            )
    if second:
        lines.append("         " + "; ".join(second))
    return lines


def offload_lines(document: dict[str, Any]) -> list[str]:
    """One line per row with activation offload: its pinned host memory (checked against this
    machine's where the step ran here), the bytes copied and what the copies cost."""
    lines = []
    for row in document["rows"]:
        if row.get("status") != "ok" or row.get("host_bytes") is None:
            continue
        text = (
            f"{row['label']}: {fmt_bytes(row['host_bytes'])} pinned host memory (host, not "
            f"device; {fmt_bytes(row.get('offloaded_bytes'))} copied each way per micro-batch)"
        )
        if row.get("host_fits") is False:
            text += f", more than this machine's {fmt_bytes(row['host_memory_bytes'])}"
        if row.get("predicted_offload_seconds") is not None:
            hidden = "would" if row.get("offload_hidden_with_streams") else "would not"
            text += (
                f"; copies +{fmt_seconds(row['predicted_offload_seconds'])} predicted at "
                f"{row.get('offload_link')} on the compute stream (save_on_cpu); a side-stream "
                f"offloader {hidden} hide them behind compute"
            )
        elif row.get("offload_note"):
            text += f"; {row['offload_note']}"
        lines.append(text)
    return lines
