"""Rendering: rich tables, JSON and CSV. Bytes stay ints until they reach this module."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from velora_cli.budget import format_bytes

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
    "optimizer_bytes",
    "step_seconds",
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
    "note",
    "error",
)


def _bytes(value: int | None) -> str:
    return "—" if value is None else format_bytes(value)


def _delta(value: int | None, pct: float | None) -> str:
    if value is None:
        return ""
    sign = "+" if value > 0 else ("−" if value < 0 else "±")
    return f"{sign}{format_bytes(abs(value))} ({pct:+.0f}%)" if pct is not None else ""


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 1e3:.0f} ms" if value < 10 else f"{value:.1f} s"


def profile_table(document: dict[str, Any]):
    """A rich Table of a profile document's rows."""
    from rich.table import Table

    title = (
        f"{document['model']} · {document['mode']} · batch {document['batch_size']} × seq "
        f"{document['seq_len']} · {document['precision']} · backend {document['backend']}"
    )
    table = Table(title=title, title_justify="left")
    width = max((len(r["label"]) for r in document["rows"]), default=10)
    table.add_column("strategy", min_width=width, no_wrap=True)
    for name in (
        "peak",
        "Δ peak",
        "fwd+bwd peak",
        "saved act.",
        "Δ saved act.",
        "step",
        "tok/s",
        "× time",
    ):
        table.add_column(name, justify="right", no_wrap=True)
    for row in document["rows"]:
        if row["status"] != "ok":  # the reason is listed under the table
            table.add_row(row["label"], f"[red]{row['status']}[/red]", *[""] * 7)
            continue
        tps = row.get("tokens_per_second")
        ratio = row.get("step_time_ratio")
        table.add_row(
            row["label"] + (" *" if row.get("note") else ""),
            _bytes(row.get("peak_bytes")),
            ""
            if row["strategy"] == "baseline"
            else _delta(row.get("peak_delta_bytes"), row.get("peak_delta_pct")),
            _bytes(row.get("fwd_bwd_peak_bytes")),
            _bytes(row.get("activation_bytes")),
            ""
            if row["strategy"] == "baseline"
            else _delta(row.get("activation_delta_bytes"), row.get("activation_delta_pct")),
            _seconds(row.get("step_seconds")),
            "—" if tps is None else f"{tps:,.0f}",
            "—" if ratio is None else f"{ratio:.2f}",
        )
    return table


def profile_footer(document: dict[str, Any]) -> list[str]:
    """Lines under the table: what was measured and how."""
    lines = list(document.get("notices", []))
    for row in document["rows"]:
        if row["status"] != "ok":
            lines.append(f"{row['label']}: {row['status']}: {row.get('error', '')}")
    notes = {r["note"] for r in document["rows"] if r.get("note") and r["status"] == "ok"}
    lines += [f"* {note}" for note in sorted(notes)]
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
            name or "(model)", *[_bytes(r["activation_breakdown"].get(name, 0)) for r in rows]
        )
    return table
