"""Rendering a profile document: the rows table, categories at the peak, the activation breakdown,
the footer, JSON and CSV."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from velora_cli.report.ranks import layout_title, rank_lines
from velora_cli.report.units import fmt_bytes, fmt_delta, fmt_seconds, format_bytes

ROW_FIELDS = (
    "strategy",
    "label",
    "placement",
    "num_groups",
    "sub_token_size",
    "gc",
    "status",
    "backend",
    "peak_bytes",
    "activation_bytes",
    "param_bytes",
    "grad_bytes",
    "optimizer",
    "optimizer_bytes",
    "optimizer_worst_bytes",
    "optimizer_rank_cap",
    "optimizer_rank_min",
    "optimizer_rank_median",
    "optimizer_rank_max",
    "step_seconds",
    "refresh_step_seconds",
    "timed_refreshes",
    "tokens_per_second",
    "peak_phase",
    "fwd_bwd_peak_bytes",
    "optimizer_peak_bytes",
    "peak_delta_bytes",
    "peak_delta_pct",
    "activation_delta_bytes",
    "activation_delta_pct",
    "step_time_ratio",
    "reserved_bytes",
    "device_used_bytes",
    "wrapped_layers",
    "trainable_params",
    "quantized_params",
    "quantized_bytes",
    "note",
    "error",
    "world_size",
    "parallel",
    "global_batch_size",
    "peak_rank",
)


def profile_table(document: dict[str, Any]):
    """A rich Table of a profile document's rows."""
    from rich.table import Table

    title = (
        f"{document['model']} · {document['mode']} · batch {document['batch_size']} × seq "
        f"{document['seq_len']} · {document['precision']} · backend {document['backend']}"
    ) + layout_title(document)
    table = Table(title=title, title_justify="left")
    width = max((len(r["label"]) for r in document["rows"]), default=10)
    table.add_column("strategy", min_width=width, no_wrap=True)
    for name in (
        "peak",
        "Δ peak",
        "fwd+bwd peak",
        "opt. state",
        "saved act.",
        "Δ saved act.",
        "step",
        "tok/s",
        "× time",
    ):
        table.add_column(name, justify="right", no_wrap=True)
    reference = next((r for r in document["rows"] if r["status"] == "ok"), None)
    for row in document["rows"]:
        if row["status"] != "ok":  # the reason is listed under the table
            table.add_row(row["label"], f"[red]{row['status']}[/red]", *[""] * 8)
            continue
        tps = row.get("tokens_per_second")
        ratio = row.get("step_time_ratio")
        own = row is reference  # deltas are against the first (baseline) row
        table.add_row(
            row["label"] + (" *" if row.get("note") else ""),
            fmt_bytes(row.get("peak_bytes")),
            "" if own else fmt_delta(row.get("peak_delta_pct")),
            fmt_bytes(row.get("fwd_bwd_peak_bytes")),
            fmt_bytes(row.get("optimizer_bytes")),
            fmt_bytes(row.get("activation_bytes")),
            "" if own else fmt_delta(row.get("activation_delta_pct")),
            fmt_seconds(row.get("step_seconds")),
            "—" if tps is None else f"{tps:,.0f}",
            "—" if ratio is None else f"{ratio:.2f}",
        )
    return table


def profile_footer(document: dict[str, Any]) -> list[str]:
    """Lines under the table: what was measured and how."""
    lines = list(document.get("notices", [])) + optimizer_lines(document)
    for row in document["rows"]:
        if row["status"] != "ok":
            lines.append(f"{row['label']}: {row['status']}: {row.get('error', '')}")
    notes = {r["note"] for r in document["rows"] if r.get("note") and r["status"] == "ok"}
    lines += [f"* {note}" for note in sorted(notes)]
    quantized = next((r for r in document["rows"] if r.get("quantized_bytes")), None)
    if quantized:
        values, nbytes = quantized["quantized_params"], quantized["quantized_bytes"]
        lines.append(
            f"4-bit base: {f'{values / 1e6:,.0f}M' if values >= 1e7 else f'{values:,}'} weights"
            f" in {format_bytes(nbytes)} "
            f"({8 * nbytes / values:.3f} bits each, quantization constants included; "
            "quantized_bytes in json/csv)"
        )
    env = document.get("environment", {})
    device = env.get("gpu_name") or f"CPU ({env.get('cpu_threads')} threads)"
    lines.append(
        f"measured on {device}; torch {env.get('torch')}, transformers {env.get('transformers')}"
    )
    sources = {r.get("step_seconds_source") for r in document["rows"] if r.get("step_seconds")}
    if document["backend"] == "estimate":
        lines.append(
            "memory: estimated on meta tensors (allocations rounded as the CUDA caching "
            "allocator does; CUDA context and kernel workspaces not included)"
        )
    ok = [r for r in document["rows"] if r["status"] == "ok"]
    in_optimizer = [r for r in ok if r.get("peak_phase") == "optimizer"]
    if ok and len(in_optimizer) == len(ok):
        lines.append(
            "every row peaks in the optimizer step (params + grads + optimizer state + "
            "its temporaries): activation savings show in the fwd+bwd peak and lower the "
            "step's peak only where fwd+bwd is the larger"
        )
    elif in_optimizer:
        lines.append(
            f"{len(in_optimizer)} of {len(ok)} rows peak in the optimizer step, the "
            "others in forward/backward"
        )
    lines += rank_lines(document)
    for source in sorted(s for s in sources if s):
        lines.append(f"step time: {source}")
    if not sources:
        lines.append("step time: not measured by this backend")
    return lines


def to_json(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2)


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=ROW_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in ROW_FIELDS})
    return out.getvalue()


def category_table(document: dict[str, Any], *, always: bool = False):
    """Memory at each row's peak by category, with the optimizer's ranks and refresh step.

    Shown when rows differ by optimizer or use a low-rank one (or with ``always``); else None.
    """
    from rich.table import Table

    rows = [r for r in document["rows"] if r["status"] == "ok" and r.get("peak_breakdown")]
    lowrank = any(r.get("optimizer_rank_cap") for r in rows)
    if not rows or not (always or lowrank or len(document.get("optimizers", [])) > 1):
        return None
    timed = any(r.get("refresh_step_seconds") is not None for r in rows)
    table = Table(title="memory at each row's peak, by category", title_justify="left")
    table.add_column("row", overflow="fold")
    categories = ("params", "grads", "optimizer", "activations", "temporaries")
    for name in ("params", "grads", "opt. state", "activations", "temporaries"):
        table.add_column(name, justify="right", no_wrap=True)
    if lowrank:
        table.add_column("ranks", justify="right", no_wrap=True)
    if timed:
        table.add_column("refresh step", justify="right", no_wrap=True)
    for r in rows:
        cells = [fmt_bytes(r["peak_breakdown"].get(c, 0)) for c in categories]
        if lowrank and r.get("optimizer_rank_cap"):
            low, mid, high = (r.get(f"optimizer_rank_{k}") for k in ("min", "median", "max"))
            cells.append(str(low) if low == high else f"{low}–{high} (med {mid})")
        elif lowrank:
            cells.append("")
        if timed:
            refresh, extra = r.get("refresh_step_seconds"), r.get("timed_refreshes")
            cell = "" if refresh is None else fmt_seconds(refresh)
            if extra:  # the convergence test refreshed some weights within the timed steps
                cell += f" (+{extra} in timed steps)"
            cells.append(cell)
        table.add_row(r["label"], *cells)
    return table


def optimizer_lines(document: dict[str, Any]) -> list[str]:
    """One line per low-rank optimizer: rank cap, state now vs its worst case, refresh cost."""
    lines, seen = [], set()
    for r in document["rows"]:
        name = r.get("optimizer")
        if r["status"] != "ok" or not r.get("optimizer_rank_cap") or name in seen:
            continue
        seen.add(name)
        line = (
            f"{name}: {r['projected_weights']} projected weights, rank cap "
            f"{r['optimizer_rank_cap']}; optimizer state at the cap {fmt_bytes(r['optimizer_worst_bytes'])}"
        )
        if r.get("refresh_step_seconds") is not None:
            line += "; 'refresh step': a step that refreshes every subspace (1 in ≤ T steps)"
        lines.append(line)
    return lines


def breakdown_table(document: dict[str, Any], limit: int = 12):
    """Saved-activation bytes by module pattern, one column per ok row with a breakdown."""
    from rich.table import Table

    rows = [r for r in document["rows"] if r.get("activation_breakdown")]
    if not rows:
        return None
    patterns: dict[str, int] = {}
    for r in rows:
        for name, nbytes in r["activation_breakdown"].items():
            patterns[name] = max(patterns.get(name, 0), nbytes)
    top = sorted(patterns, key=lambda n: -patterns[n])[:limit]
    table = Table(title="saved activations by module (largest first)", title_justify="left")
    table.add_column("module")
    for r in rows:
        table.add_column(r["label"], justify="right")
    for name in top:
        table.add_row(
            name or "(model)", *[fmt_bytes(r["activation_breakdown"].get(name, 0)) for r in rows]
        )
    return table
