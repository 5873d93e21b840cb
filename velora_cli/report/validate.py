"""`velora validate`'s document as text: the per-case table, the summary, what is not expressible.

Two formats from the same rows: ``table`` (aligned columns, for a terminal) and ``markdown``
(docs/validation.md is generated with it). Bytes are shown in MiB (the unit the sources used),
errors as signed percentages of the measurement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MIB = 1 << 20

TIER_LABELS = {
    "allocated_bytes": "allocated",
    "reserved_bytes": "reserved",
    "device_bytes": "device",
    "tokens_per_second": "tokens/s",
}


def _value(tier: str, value: float | None) -> str:
    if value is None:
        return "—"
    if tier == "tokens_per_second":
        return f"{value:,.0f}"
    return f"{value / MIB:,.0f} MiB"


def _pct(error: float | None) -> str:
    return "—" if error is None else f"{100 * error:+.2f}%"


def case_rows(document: Mapping[str, Any]) -> list[list[str]]:
    """One row per case and tier compared: case, GPU, tier, measured, predicted, error, bounds."""
    rows = []
    for case in document["cases"]:
        if not case["expressible"] or case["status"] != "ok":
            continue
        for tier in case["measured"]:
            error = case["error"].get(tier)
            failed = any(f.startswith(tier) for f in case["out_of_bounds"])
            rows.append([
                case["id"], case["gpu"], TIER_LABELS[tier],
                _value(tier, case["measured"][tier]), _value(tier, case["predicted"].get(tier)),
                _pct(error), "OUT" if failed else ("ok" if error is not None else "—"),
            ])  # fmt: skip
    return rows


def summary_rows(document: Mapping[str, Any]) -> list[list[str]]:
    """Per source, GPU and tier: cases, mean and max |error|, signed range, under-predicted."""
    rows = []
    for group in document["summary"].values():
        for tier, s in group["tiers"].items():
            rows.append([
                group["source"], group["gpu"], TIER_LABELS[tier], str(s["cases"]),
                _pct(s["mean_abs_error"]).lstrip("+"), _pct(s["max_abs_error"]).lstrip("+"),
                _pct(s["mean_error"]), f"{_pct(s['min_error'])} … {_pct(s['max_error'])}",
                f"{s['under_predicted']}/{s['cases']}",
            ])  # fmt: skip
    return rows


def coverage_rows(document: Mapping[str, Any]) -> list[list[str]]:
    """Per source and GPU: cases, expressible, compared within bounds, failed estimates."""
    return [
        [
            g["source"],
            g["gpu"],
            str(g["cases"]),
            str(g["expressible"]),
            str(g["expressible"] - g["out_of_bounds"] - g["failed"]),
            str(g["expressible"] - g.get("memory_out_of_bounds", 0) - g["failed"]),
            str(g["failed"]),
        ]  # fmt: skip
        for g in document["summary"].values()
    ]


def missing_rows(document: Mapping[str, Any]) -> list[list[str]]:
    """What keeps cases from being expressed: each missing feature, how many cases, and where."""
    counts: dict[str, dict[str, int]] = {}
    for case in document["cases"]:
        for item in case["missing"]:
            counts.setdefault(item, {}).setdefault(case["source"], 0)
            counts[item][case["source"]] += 1
    return [
        [item, str(sum(by.values())), ", ".join(f"{s} {n}" for s, n in by.items())]
        for item, by in sorted(counts.items(), key=lambda kv: -sum(kv[1].values()))
    ]


def timing_rows(document: Mapping[str, Any]) -> list[list[str]]:
    """Per case with a measured step time: measured and predicted seconds, the scale every
    assumed efficiency would need, and the large-GEMM efficiency that would match alone."""
    rows = []
    for case in document["cases"]:
        timing = case.get("timing")
        if not timing:
            continue
        implied = timing["implied"]
        gemm = implied.get("gemm_efficiency")
        rows.append([
            case["id"], case["gpu"], f"{timing['measured_step_seconds']:.3f}",
            f"{timing['predicted_step_seconds']:.3f}", f"{implied['scale']:.2f}",
            "—" if gemm is None else f"{gemm:.2f}",
        ])  # fmt: skip
    return rows


def repeat_rows(document: Mapping[str, Any]) -> list[list[str]]:
    """Per case whose setup the source ran more than once: the runs, their measured tokens/s
    range and spread, and the prediction's error against the range (information only)."""
    rows = []
    for case in document["cases"]:
        repeats = case.get("repeats")
        if not repeats:
            continue
        rows.append([
            case["id"], case["gpu"], str(len(repeats["runs"])),
            f"{repeats['min']:,.0f} … {repeats['max']:,.0f}", _pct(repeats["spread"]).lstrip("+"),
            _pct(case["error"].get("tokens_per_second")), _pct(repeats.get("error_vs_range")),
        ])  # fmt: skip
    return rows


REPEAT_HEADER = ["case", "gpu", "runs of its setup", "measured tokens/s", "spread", "error",
                 "error vs the runs' range"]  # fmt: skip
TIMING_HEADER = ["case", "gpu", "measured s/step", "predicted s/step", "efficiency scale",
                 "GEMM efficiency alone"]  # fmt: skip
CASE_HEADER = ["case", "gpu", "tier", "measured", "predicted", "error", "bounds"]
SUMMARY_HEADER = ["source", "gpu", "tier", "cases", "mean |err|", "max |err|", "mean err",
                  "signed range", "under"]  # fmt: skip
COVERAGE_HEADER = ["source", "gpu", "cases", "expressible", "within bounds (all tiers)",
                   "memory tiers within bounds", "failed"]  # fmt: skip
MISSING_HEADER = ["not expressible: missing", "cases", "sources"]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(cell: str) -> str:
        return str(cell).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |"]
    lines.append("|" + "|".join(":---" if i < 3 else "---:" for i in range(len(header))) + "|")
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render(document: Mapping[str, Any], fmt: str = "table") -> str:
    """The whole document as ``table`` or ``markdown`` text (summary first, then the cases)."""
    table = markdown_table if fmt == "markdown" else text_table
    parts = []
    title = (lambda t: f"### {t}") if fmt == "markdown" else (lambda t: t)
    summary = summary_rows(document)
    if summary:
        parts += [title("Summary per source, GPU and tier"), table(SUMMARY_HEADER, summary)]
    parts += [title("Coverage"), table(COVERAGE_HEADER, coverage_rows(document))]
    rows = case_rows(document)
    if rows:
        parts += [title("Measured vs predicted, per case"), table(CASE_HEADER, rows)]
    timing = timing_rows(document)
    if timing:
        parts += [title("Step time: what the measurements imply for the roofline"),
                  table(TIMING_HEADER, timing)]  # fmt: skip
    repeats = repeat_rows(document)
    if repeats:
        parts += [title("Repeated runs of one setup: the source's own spread (information; the "
                        "bounds apply to each run's own error)"),
                  table(REPEAT_HEADER, repeats)]  # fmt: skip
    missing = missing_rows(document)
    if missing:
        parts += [title("Not expressible yet"), table(MISSING_HEADER, missing)]
    failed = [c for c in document["cases"] if c["expressible"] and c["status"] == "failed"]
    if failed:
        parts += [title("Estimates that failed")]
        parts += [f"- {c['id']}: {c.get('message', '')}" for c in failed]
    verdicts = [c for c in document["cases"] if c.get("verdict")]
    if verdicts:
        agree = sum(c["verdict"]["agrees"] for c in verdicts)
        line = (
            f"Fit/OOM verdicts: the predicted device figure agrees with {agree} of "
            f"{len(verdicts)} recorded outcomes."
        )
        edge = [c for c in verdicts if c["verdict"].get("at_the_edge")]
        if edge:
            ran_out = [c["id"] for c in edge if c["verdict"]["outcome"] != "completed"]
            line += (
                f" {len(edge)} of the predicted fits are at the card's edge (they fit only after "
                f"the allocator frees its cache in the replay): {len(edge) - len(ran_out)} "
                f"completed, {len(ran_out)} ran out"
                + (f" ({', '.join(ran_out)})" if ran_out else "")
                + "."
            )
        parts.append(line)
    parts.append(
        "PASSED: every expressible case within its bounds"
        if document["passed"]
        else "FAILED: some expressible case is out of bounds or failed"
    )
    return "\n\n".join(parts) + "\n"
