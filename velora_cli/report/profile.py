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
    "predicted_step_seconds",
    "predicted_tokens_per_second",
    "predicted_refresh_step_seconds",
    "predicted_time_ratio",
    "predicted_gpu",
    "prediction_error",
    "step_seconds_source",
    "step_flops",
    "step_bytes_moved",
    "step_kernels",
    "reserved_bytes",
    "device_used_bytes",
    "predicted_allocated_bytes",
    "predicted_reserved_bytes",
    "fragmentation_bytes",
    "predicted_reserved_expandable_bytes",
    "fragmentation_expandable_bytes",
    "predicted_device_bytes",
    "predicted_device_expandable_bytes",
    "estimate_error_allocated_pct",
    "estimate_error_reserved_pct",
    "estimate_error_device_pct",
    "process_used_bytes",
    "estimate_error_process_pct",
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

    task = f" · {document['task']}" if document.get("task") else ""
    settings = document.get("settings", {})
    attention = f" · {settings['attn']} attention" if settings.get("attn") else ""
    padded = " (padded)" if settings.get("padding") else ""
    if settings.get("packing"):
        lengths = settings.get("lengths")
        tokens = sum(lengths) if lengths else None
        padded = f" (packed: {tokens:,} tokens in one row)" if tokens else " (packed in one row)"
    title = (
        f"{document['model']}{task} · {document['mode']} · batch {document['batch_size']} × seq "
        f"{document['seq_len']}{padded}{attention} · {document['precision']}"
        + (" · reentrant checkpointing" * bool(document.get("settings", {}).get("gc_reentrant")))
        + f" · backend {document['backend']}"
    ) + layout_title(document)
    table = Table(title=title, title_justify="left")
    width = max((len(r["label"]) for r in document["rows"]), default=10)
    table.add_column("strategy", min_width=width, no_wrap=True)
    # Predicted step times (roofline, for a GPU) are shown as predictions: in the step columns
    # when nothing was timed (estimate), else in a column of their own beside the measured step.
    ok = [r for r in document["rows"] if r["status"] == "ok"]
    timed = any(r.get("step_seconds") is not None for r in ok)
    predicted = any(r.get("predicted_step_seconds") is not None for r in ok)
    prefix = "" if timed or not predicted else "predicted_"
    time_columns = ["step", "tok/s", "× time"]
    if prefix:  # "~": predicted (the footer says for which GPU and how)
        time_columns = [f"~{name}" for name in time_columns]
    elif predicted:
        time_columns.insert(1, "~step")
    for name in (
        "peak",
        "Δ peak",
        "fwd+bwd peak",
        "opt. state",
        "saved act.",
        "Δ saved act.",
        *time_columns,
    ):
        table.add_column(name, justify="right", no_wrap=True)
    reference = next((r for r in document["rows"] if r["status"] == "ok"), None)
    for row in document["rows"]:
        if row["status"] != "ok":  # the reason is listed under the table
            table.add_row(
                row["label"], f"[red]{row['status']}[/red]", *[""] * (5 + len(time_columns))
            )
            continue
        tps = row.get(f"{prefix}tokens_per_second")
        ratio = row.get("predicted_time_ratio" if prefix else "step_time_ratio")
        own = row is reference  # deltas are against the first (baseline) row
        times = [
            fmt_seconds(row.get(f"{prefix}step_seconds")),
            "—" if tps is None else f"{tps:,.0f}",
            "—" if ratio is None else f"{ratio:.2f}",
        ]
        if predicted and not prefix:
            times.insert(1, fmt_seconds(row.get("predicted_step_seconds")))
        table.add_row(
            row["label"] + (" *" if row.get("note") else ""),
            fmt_bytes(row.get("peak_bytes")),
            "" if own else fmt_delta(row.get("peak_delta_pct")),
            fmt_bytes(row.get("fwd_bwd_peak_bytes")),
            fmt_bytes(row.get("optimizer_bytes")),
            fmt_bytes(row.get("activation_bytes")),
            "" if own else fmt_delta(row.get("activation_delta_pct")),
            *times,
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
    lines += sorted({r["sdpa_note"] for r in document["rows"] if r.get("sdpa_note")})
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
    versions = f"torch {env.get('torch')}, transformers {env.get('transformers')}"
    sources = {r.get("step_seconds_source") for r in document["rows"] if r.get("step_seconds")}
    if document["backend"] == "estimate":  # memory never touched a device
        cpu = f"; step times measured on CPU ({env.get('cpu_threads')} threads)" if sources else ""
        lines.append(f"estimated on meta tensors, no device used{cpu}; {versions}")
    else:
        device = env.get("gpu_name") or f"CPU ({env.get('cpu_threads')} threads)"
        lines.append(f"measured on {device}; {versions}")
    if document["backend"] == "estimate" and not device_rows(document):
        lines.append(
            "memory: estimated on meta tensors (allocations rounded as the CUDA caching "
            "allocator does; CUDA context and kernel workspaces not included)"
        )
    lines += device_memory_lines(document)
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
    lines += prediction_lines(document)
    if not sources and not any(r.get("predicted_step_seconds") for r in ok):
        lines.append("step time: not measured by this backend")
    return lines


def prediction_lines(document: dict[str, Any]) -> list[str]:
    """What the predicted step times are: for which GPU, from what, and how far to trust them."""
    from velora_cli.gpus import GPUS

    rows = [r for r in document["rows"] if r.get("predicted_step_seconds") is not None]
    if not rows:
        return []
    gpus = sorted({r.get("predicted_gpu") for r in rows if r.get("predicted_gpu")})
    names = ", ".join(GPUS[g].name if g in GPUS else g for g in gpus)
    lines = [
        f"~ predicted step time, not measured: for {names}, by a per-op roofline over the FLOPs and "
        "bytes of every op of the meta step (velora_cli/timing/roofline.py); its kernel "
        "efficiencies are assumptions not yet calibrated on a GPU: compare strategies, not "
        "absolute times; measure with --backend cuda"
    ]
    errors = [r["prediction_error"] for r in rows if r.get("prediction_error") is not None]
    if errors:
        lines.append(
            "prediction vs measured step: "
            + ", ".join(f"{r['label']} {r['prediction_error']:+.0%}" for r in rows
                        if r.get("prediction_error") is not None)
        )  # fmt: skip
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
    table.add_column("module", overflow="fold")  # a narrow terminal wraps names, never cuts them
    for r in rows:
        table.add_column(r["label"], justify="right")
    for name in top:
        table.add_row(
            name or "(model)", *[fmt_bytes(r["activation_breakdown"].get(name, 0)) for r in rows]
        )
    return table


def device_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The ok rows with a device-memory prediction (estimate rows, cuda rows compared with it)."""
    return [
        r
        for r in document["rows"]
        if r["status"] == "ok" and r.get("predicted_reserved_bytes") is not None
    ]


def device_table(document: dict[str, Any]):
    """What the GPU must hold per row: allocated, reserved (fragmentation), device memory, and
    the same with ``expandable_segments:True``; for cuda rows the measurements beside the
    prediction. None when no row has a prediction."""
    from rich.table import Table

    from velora_cli.allocator.device_memory import expandable_saving

    rows = device_rows(document)
    if not rows:
        return None
    cuda = document["backend"] == "cuda"
    where = "measured on this GPU vs predicted" if cuda else f"predicted for {document.get('gpu')}"
    table = Table(title=f"what the GPU must hold ({where})", title_justify="left")
    table.add_column("strategy", no_wrap=True)
    if cuda:
        columns = ("allocated", "pred.", "reserved", "pred.", "device", "pred.")
    else:
        columns = ("allocated", "reserved", "fragment.", "device", "exp. seg. device", "saving")
    for name in columns:
        table.add_column(name, justify="right", no_wrap=True)
    for r in rows:
        if cuda:
            cells = [
                fmt_bytes(r.get(key))
                for key in (
                    "peak_bytes", "predicted_allocated_bytes", "reserved_bytes",
                    "predicted_reserved_bytes", "device_used_bytes", "predicted_device_bytes",
                )
            ]  # fmt: skip
        else:
            saving = expandable_saving(r)
            cells = [
                fmt_bytes(r["predicted_allocated_bytes"]),
                fmt_bytes(r["predicted_reserved_bytes"]),
                fmt_bytes(r["fragmentation_bytes"]),
                fmt_bytes(r["predicted_device_bytes"]),
                fmt_bytes(r["predicted_device_expandable_bytes"]),
                "" if saving is None else f"{format_bytes(saving[0])} ({saving[1]:.1%})",
            ]
        table.add_row(r["label"], *cells)
    return table


def device_memory_lines(document: dict[str, Any]) -> list[str]:
    """What the device-memory figures are, where expandable segments would pay, and (cuda) how
    far the allocator model was from the measurement."""
    from velora_cli.allocator.device_memory import EXPANDABLE_WORTH, expandable_saving

    rows = device_rows(document)
    if not rows:
        return []
    if document["backend"] == "cuda":
        errors = [
            f"{r['label']} "
            + "/".join(
                "—" if r.get(f"estimate_error_{k}_pct") is None
                else f"{r[f'estimate_error_{k}_pct']:+.1f}%"
                for k in ("allocated", "reserved", "device")
            )
            for r in rows
        ]  # fmt: skip
        return [
            "allocator model vs this run (predicted − measured, of allocated/reserved/device): "
            + "; ".join(errors)
        ]
    lines = [
        "what the GPU must hold, predicted: allocated = what max_memory_allocated would read "
        "(the peak's tensors as whole allocator blocks, plus cuBLAS workspaces and kernel "
        "scratch); reserved = the caching allocator's segments, replayed from the step's "
        "allocation trace; fragment. = reserved − allocated at that peak; device = reserved + "
        "CUDA context (NVML's used memory: what must fit the GPU)"
    ]
    lines += sorted({r["device_memory_notes"] for r in rows if r.get("device_memory_notes")})
    worth = [(r, s) for r in rows if (s := expandable_saving(r)) is not None]
    if worth:
        lines.append(
            f"PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True would save more than "
            f"{EXPANDABLE_WORTH:.0%} of device memory on: "
            + ", ".join(f"{r['label']} ({format_bytes(s[0])}, {s[1]:.1%})" for r, s in worth)
        )
    return lines
