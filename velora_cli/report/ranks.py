"""Rendering the per-rank side of a profile (DDP/FSDP2 rows): the title's layout, memory at the
peak by category on the largest rank, and the notes under the table."""

from __future__ import annotations

from typing import Any

from velora_cli.report.units import fmt_bytes, format_bytes

# (row key, column title): the categories a rank's tracker reports (velora_cli.parallel.roles)
RANK_CATEGORIES = (
    ("params", "params"),
    ("grads", "grads"),
    ("optimizer", "opt. state"),
    ("unsharded", "unsharded"),
    ("comm", "comm buf."),
    ("activations", "activations"),
    ("temporaries", "temporaries"),
)
# real gloo ranks only (--backend cpu): what gloo's collectives hold and NCCL's would not
GLOO_CATEGORY = ("gloo", "gloo-only")


def layout_title(document: dict[str, Any]) -> str:
    """`` · fsdp ×4, per rank (global batch 16 × seq 2048)``; empty for a single process."""
    if not document.get("parallel"):
        return ""
    return (
        f" · {document['parallel']} ×{document['world_size']}, memory per rank (batch per rank;"
        f" global batch {document['global_batch_size']} × seq {document['seq_len']})"
    )


def rank_table(document: dict[str, Any]):
    """Each row's memory at its largest rank's peak, by category; None without ranks."""
    from rich.table import Table

    rows = [r for r in document["rows"] if r["status"] == "ok" and r.get("ranks")]
    if not rows:
        return None
    table = Table(
        title="per rank: memory at the peak of the largest rank, by category",
        title_justify="left",
    )
    width = max(len(r["label"]) for r in rows)
    table.add_column("row", min_width=min(width, 40), overflow="fold")
    table.add_column("rank", justify="right")
    categories = RANK_CATEGORIES
    if any(GLOO_CATEGORY[0] in r["peak_breakdown"] for r in rows):
        categories += (GLOO_CATEGORY,)
    for _, title in categories:
        table.add_column(title, justify="right", no_wrap=True)
    table.add_column("peaks (ranks)", justify="right", no_wrap=True)
    for r in rows:
        peaks = [x["peak_bytes"] for x in r["ranks"] if x.get("peak_bytes") is not None]
        low, high = fmt_bytes(min(peaks)), fmt_bytes(max(peaks))
        spread = low if low == high else f"{low}–{high}"
        cells = [fmt_bytes(r["peak_breakdown"].get(key, 0)) for key, _ in categories]
        cells.append(f"{spread} ({len(peaks)})")
        table.add_row(r["label"], str(r.get("peak_rank")), *cells)
    return table


def rank_lines(document: dict[str, Any]) -> list[str]:
    """Notes under the tables: what the categories and the estimated ranks mean."""
    rows = [r for r in document["rows"] if r.get("ranks")]
    if not rows:
        return []
    lines = [
        "per rank: 'unsharded' = FSDP2's all-gathered parameters, 'comm buf.' = DDP's gradient "
        "buckets and the collectives' buffers; tok/s = the whole job's (slowest rank's step)"
    ]
    if document.get("backend") == "estimate":
        lines.append(
            "per-rank estimate: the real DDP/FSDP2 code on fake CPU tensors with a fake process "
            f"group of size {document.get('world_size')} (nothing allocated, each storage "
            "rounded to 512 bytes as the CUDA caching allocator does)"
        )
    lines += sorted({r["ranks_note"] for r in rows if r.get("ranks_note")})
    lines += gloo_lines(rows)
    if any(r.get("cpu_offload") for r in rows):
        lines.append(
            "cpu offload: sharded parameters, gradients and optimizer state live in host memory"
        )
    return lines


def gloo_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per row with gloo-only memory: how much of the peak it is, and what it is."""
    lines = []
    for r in rows:
        if not r.get("gloo_only_note"):
            continue
        gloo = r["gloo_only_bytes"]
        lines.append(
            f"{r['label']}: {fmt_bytes(gloo)} of the {fmt_bytes(r['peak_bytes'])} peak is "
            f"gloo-only (the peak without it: {fmt_bytes(r['peak_bytes'] - gloo)}, what NCCL "
            f"ranks would hold and the estimate predicts)"
        )
    lines += sorted({r["gloo_only_note"] for r in rows if r.get("gloo_only_note")})
    return lines


def gpu_count_table(document: dict[str, Any]):
    """``velora tune --world-size 1,2,4,8``: the best configuration per GPU count."""
    from rich.table import Table

    from velora_cli.report.tune import describe

    needed = document.get("gpus_needed")
    budget = f"budget {format_bytes(document['budget_bytes'])} per GPU"
    title = (
        f"how many GPUs: {needed} ({budget})"
        if needed
        else f"how many GPUs: none of these counts fits ({budget})"
    )
    table = Table(title=title, title_justify="left")
    for name in ("GPUs", "best configuration", "peak per rank", "tok/s (job)", "tok/s per GPU"):
        table.add_column(name, justify="left" if name == "best configuration" else "right")
    for entry in document["by_world_size"]:
        rec = entry["recommendation"]
        if rec is None:
            smallest = entry.get("smallest") or {}
            best = smallest.get("smallest_peak_bytes")
            table.add_row(
                str(entry["world_size"]),
                "nothing fits" + (f" (smallest {fmt_bytes(best)})" if best else ""),
                "",
                "",
                "",
            )
            continue
        tps, per_gpu = rec.get("tokens_per_second"), entry.get("tokens_per_second_per_gpu")
        table.add_row(
            ("→ " if entry["world_size"] == needed else "") + str(entry["world_size"]),
            describe(rec),
            fmt_bytes(rec.get("peak_bytes")),
            "—" if tps is None else f"{tps:,.0f}",
            "—" if per_gpu is None else f"{per_gpu:,.0f}",
        )
    return table
