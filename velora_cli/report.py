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
)


def _bytes(value: int | None) -> str:
    return "—" if value is None else format_bytes(value)


def _delta(pct: float | None) -> str:
    """A change against the reference row in percent (the bytes are in json/csv)."""
    if pct is None:
        return ""
    return f"{pct:+.0f}%".replace("-", "−") if round(pct) else "±0%"


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
            _bytes(row.get("peak_bytes")),
            "" if own else _delta(row.get("peak_delta_pct")),
            _bytes(row.get("fwd_bwd_peak_bytes")),
            _bytes(row.get("optimizer_bytes")),
            _bytes(row.get("activation_bytes")),
            "" if own else _delta(row.get("activation_delta_pct")),
            _seconds(row.get("step_seconds")),
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
        cells = [_bytes(r["peak_breakdown"].get(c, 0)) for c in categories]
        if lowrank and r.get("optimizer_rank_cap"):
            low, mid, high = (r.get(f"optimizer_rank_{k}") for k in ("min", "median", "max"))
            cells.append(str(low) if low == high else f"{low}–{high} (med {mid})")
        elif lowrank:
            cells.append("")
        if timed:
            refresh, extra = r.get("refresh_step_seconds"), r.get("timed_refreshes")
            cell = "" if refresh is None else _seconds(refresh)
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
            f"{r['optimizer_rank_cap']}; optimizer state at the cap {_bytes(r['optimizer_worst_bytes'])}"
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
            name or "(model)", *[_bytes(r["activation_breakdown"].get(name, 0)) for r in rows]
        )
    return table


# ---- velora tune ------------------------------------------------------------------------


def describe(row: dict[str, Any]) -> str:
    """A candidate in words: ``full · velora paper g32 · gc every 2 · micro-batch 4 × 2``, with
    its optimizer after the mode when it is not AdamW (``full · adarankgrad · ...``)."""
    parts = [row["mode"]]
    if row.get("optimizer", "adamw") != "adamw":
        parts.append(row["optimizer"])
    if row.get("placement"):
        parts.append(f"velora {row['placement']} g{row['num_groups'] or 32}")
    gc = row.get("gc")
    if gc is True:
        parts.append("gc")
    elif gc:
        parts.append(f"gc every {gc}")
    parts.append(f"micro-batch {row['micro_batch_size']} × {row['grad_accum_steps']}")
    return " · ".join(parts)


def pareto_keys(rows: list[dict[str, Any]]) -> set[str]:
    """Keys of the measured-ok rows on the (peak ↓, tokens/s ↑) front."""
    ok = [r for r in rows if r.get("measure_status") == "ok" and r.get("peak_bytes") is not None]

    def tps(r):
        return r.get("tokens_per_second") or 0.0

    return {
        r["key"]
        for r in ok
        if not any(
            o["peak_bytes"] <= r["peak_bytes"] and tps(o) >= tps(r)
            and (o["peak_bytes"] < r["peak_bytes"] or tps(o) > tps(r))
            for o in ok
        )
    }  # fmt: skip


def tune_table(document: dict[str, Any]):
    """A rich Table of the measured candidates, the measured Pareto front marked ★."""
    from rich.table import Table

    title = (
        f"{document['model']} · batch {document['batch_size']} × seq {document['seq_len']} · "
        f"{document['precision']} · backend {document['backend']} · budget "
        f"{format_bytes(document['budget_bytes'])} (limit {format_bytes(document['limit_bytes'])})"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("", no_wrap=True)
    table.add_column("configuration", overflow="fold", min_width=28)
    for name in (
        "status",
        "est. peak",
        "peak",
        "step",
        "tok/s",
        "probe loss",
        "Δ loss",
        "grad cos",
    ):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("note", overflow="fold", max_width=48)
    front = pareto_keys(document["candidates"])
    rows = [r for r in document["candidates"] if r.get("measure_status")]
    rows.sort(key=lambda r: (r.get("peak_bytes") is None, r.get("peak_bytes") or 0))
    rows += unfit_modes(document["candidates"])
    for r in rows:
        mark = "→" if r["status"] == "chosen" else "★" if r["key"] in front else ""
        li, cos = r.get("loss_increase"), r.get("grad_cosine_min")
        table.add_row(
            mark,
            describe(r),
            r["status"],
            _bytes(r.get("estimate_peak_bytes")),
            _bytes(r.get("peak_bytes")),
            "—" if r.get("step_seconds") is None else f"{r['step_seconds']:.2f} s",
            "—" if r.get("tokens_per_second") is None else f"{r['tokens_per_second']:,.0f}",
            "—" if r.get("loss") is None else f"{r['loss']:.4f}",
            "—" if li is None else f"{li:+.2%}",
            "—" if cos is None else f"{cos:.3f}",
            r.get("note") or "",
        )
    return table


def unfit_modes(candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per mode whose every candidate was estimated over budget: its smallest estimate
    (a real one; lower bounds only when there is nothing else), so the table says why the mode
    is out."""
    out = []
    for mode in dict.fromkeys(r["mode"] for r in candidates):
        rows = [r for r in candidates if r["mode"] == mode]
        if not all(r["status"] == "infeasible-estimate" for r in rows):
            continue
        known = [r for r in rows if r.get("estimate_peak_bytes") is not None]
        if not known:
            continue
        real = [r for r in known if not r.get("estimate_lower_bound")] or known
        best = min(real, key=lambda r: r["estimate_peak_bytes"])
        note = f"all {len(rows)} {mode} candidates over budget"
        floors = [r["estimate_peak_bytes"] for r in rows if r.get("estimate_lower_bound")]
        if floors:
            note += f": params+grads+optimizer state alone {format_bytes(min(floors))}"
        out.append({**best, "note": note})
    return out


def summary_lines(document: dict[str, Any]) -> list[str]:
    """Lines under the table: the unmeasured, the probe setup, the recommendation and why."""
    lines = []
    counts: dict[str, int] = {}
    for r in document["candidates"]:
        if not r.get("measure_status"):
            counts[r["status"]] = counts.get(r["status"], 0) + 1
    if counts:
        lines.append(
            f"not measured: {', '.join(f'{n} {status}' for status, n in sorted(counts.items()))} "
            f"(of {len(document['candidates'])} candidates; ★ measured Pareto front)"
        )
    probe = document.get("probe", {})
    if probe.get("skipped"):
        lines.append(probe["skipped"])
    elif probe.get("baselines"):
        base = ", ".join(f"{key} {b['loss']:.4f}" for key, b in probe["baselines"].items())
        lines.append(
            f"probe: {probe['steps']} steps on {probe.get('data_description')}; "
            f"{probe.get('tokenization')}; baseline held-out loss {base}"
        )
        if probe.get("note"):
            lines.append(f"probe: {probe['note']}")
    lines += [f"warning: {w}" for w in document.get("warnings", [])]
    rec = document.get("recommendation")
    if rec is None:
        return lines
    li = rec.get("loss_increase")
    real = "estimated, not run" if document["backend"] == "estimate" else "verification run"
    lines += [
        f"recommended: {describe(rec)}",
        f"  peak {format_bytes(rec['peak_bytes'])} ({real}) ≤ limit "
        f"{format_bytes(rec['limit_bytes'])} (budget {format_bytes(rec['budget_bytes'])} − "
        f"{rec['margin']:.0%})"
        + (
            ""
            if rec.get("tokens_per_second") is None
            else f" · {rec['tokens_per_second']:,.0f} tokens/s"
        )
        + ("" if li is None else f" · loss {li:+.2%} vs {_baseline_of(rec)}"),
        f"  why: {rec['reason']}",
    ]
    searched = document.get("settings", {}).get("modes") or []
    if rec.get("mode") != "full" and "full" in searched:
        lines.append(
            f"  note: this trains {rec['mode'].upper()} adapters on a frozen base, not all "
            "parameters; the accuracy probe compares VeLoRA within a mode, not modes with each "
            "other. Pass --mode full to keep full-parameter training."
        )
    if document.get("path"):
        lines.append(
            f"  export: velora export-config --from {document['path']} --format velora|peft|trainer"
        )
    return lines


def _baseline_of(row: dict[str, Any]) -> str:
    """What a candidate's loss change is measured against (autotune.Prober)."""
    from velora_cli.measure.train_step import LOWRANK_OPTIMIZERS

    return "the AdamW baseline" if row.get("optimizer") in LOWRANK_OPTIMIZERS else "baseline"


def nothing_fits_lines(document: dict[str, Any]) -> list[str]:
    """What to tell the user when no configuration fits: the smallest one seen and its peak."""
    small = document.get("smallest")
    lines = [f"nothing fits: {document['reason']}"]
    if small:
        how = "measured" if small["peak_source"] == "measured" else "estimated"
        lines.append(
            f"smallest configuration: {describe(small)}, peak {format_bytes(small['smallest_peak_bytes'])} "
            f"({how}); try a larger --budget, a smaller --batch-size/--seq-len or more --placements"
        )
    return lines
