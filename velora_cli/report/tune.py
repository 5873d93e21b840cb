"""Rendering a tune document: the candidates table, the recommendation, and why nothing fits."""

from __future__ import annotations

from typing import Any

from velora_cli.report.units import fmt_bytes, fmt_seconds, format_bytes

MODE_NAMES = {"full": "full-parameter training", "lora": "LoRA", "qlora": "QLoRA"}


def describe(row: dict[str, Any]) -> str:
    """A candidate in words: ``full · velora paper g32 · gc every 2 · micro-batch 4 × 2``, with
    its optimizer after the mode when it is not AdamW (``full · adarankgrad · ...``)."""
    parts = [row["mode"]]
    if row.get("parallel"):
        parts.append(f"{row['parallel']} ×{row['world_size']}")
    if row.get("optimizer", "adamw") != "adamw":
        parts.append(row["optimizer"])
    if row.get("placement"):
        parts.append(f"velora {row['placement']} g{row['num_groups'] or 32}")
    gc = row.get("gc")
    kind = f"sac {row['sac']}" if row.get("sac") else "gc"
    if gc is True:
        parts.append(kind)
    elif gc:
        parts.append(f"{kind} every {gc}")
    if row.get("offload"):
        parts.append(f"offload {row['offload']}")
    parts.append(f"micro-batch {row['micro_batch_size']} × {row['grad_accum_steps']}")
    return " · ".join(parts)


def pareto_keys(rows: list[dict[str, Any]]) -> set[str]:
    """Keys of the measured-ok rows on the (peak ↓, tokens/s ↑) front; a row the probe rejected
    for accuracy is on no front (it is not a choice)."""
    ok = [r for r in rows if r.get("measure_status") == "ok" and r.get("peak_bytes") is not None
          and r.get("status") != "rejected-accuracy"]  # fmt: skip

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
    predicted = "~" if document["backend"] == "estimate" else ""  # roofline predictions
    for name in (
        "status",
        "est. peak",
        "peak",
        f"{predicted}step",
        f"{predicted}tok/s",
        "probe loss",
        "Δ loss",
        "min grad cos",  # the smallest cosine over the compressed layers (probes.gradient_fidelity)
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
            ("≥ " if r.get("estimate_lower_bound") else "")
            + fmt_bytes(r.get("estimate_peak_bytes")),
            fmt_bytes(r.get("peak_bytes")),
            fmt_seconds(r.get("step_seconds")),
            "—" if r.get("tokens_per_second") is None else f"{r['tokens_per_second']:,.0f}",
            "—" if r.get("loss") is None else f"{r['loss']:.4f}",
            "" if li is None or r.get("loss") is None else f"{li:+.2%}",  # unprobed: nothing
            "—" if cos is None else f"{cos:.3f}",
            r.get("note") or "",
        )
    return table


def unfit_modes(candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per mode whose every candidate was estimated over budget, so the table says why
    the mode is out: the smallest real estimate of its leanest candidates (full checkpointing
    at the smallest micro-batch), which the tune steps when nothing fits; else its smallest
    lower bound (params + gradients + optimizer state); else its smallest estimate."""
    out = []
    for mode, world in dict.fromkeys((r["mode"], r.get("world_size", 1)) for r in candidates):
        rows = [r for r in candidates if (r["mode"], r.get("world_size", 1)) == (mode, world)]
        if not all(r["status"] == "infeasible-estimate" for r in rows):
            continue
        known = [r for r in rows if r.get("estimate_peak_bytes") is not None]
        if not known:
            continue
        smallest_micro = min(r["micro_batch_size"] for r in rows)
        real = [r for r in known if not r.get("estimate_lower_bound")]
        leanest = [
            r for r in real if r.get("gc") is True and r["micro_batch_size"] == smallest_micro
        ]
        lower = [r for r in known if r.get("estimate_lower_bound")]
        best = min(leanest or lower or real, key=lambda r: r["estimate_peak_bytes"])
        where = f" at {world} GPUs" if world > 1 else ""
        note = f"all {len(rows)} {mode} candidates{where} over budget"
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
    if document["backend"] == "estimate":
        lines.append("~ step, tok/s: predicted by the roofline for the --gpu, not measured")
    rec = document.get("recommendation")
    if rec is None:
        return lines
    li = rec.get("loss_increase")
    real = "estimated, not run" if document["backend"] == "estimate" else "verification run"
    searched = document.get("settings", {}).get("modes") or []
    if rec.get("mode") != "full" and "full" in searched:  # the mode changes: say it first
        lines.append(
            f"recommended: {MODE_NAMES[rec['mode']]} instead of full-parameter training: it "
            "trains adapters on a frozen base, not all parameters; pass --mode full to keep "
            "full-parameter training (the accuracy probe compares VeLoRA within a mode, not "
            "modes with each other)"
        )
    if str(rec.get("peak_source", "")).startswith("predicted_device_bytes"):
        real = "predicted device memory: allocator-reserved + CUDA context; " + real
    lines += [
        f"recommended: {describe(rec)}",
        f"  peak {format_bytes(rec['peak_bytes'])} ({real}) ≤ limit "
        f"{format_bytes(rec['limit_bytes'])} (budget {format_bytes(rec['budget_bytes'])} − "
        f"{rec['margin']:.0%})"
        + (
            ""
            if rec.get("tokens_per_second") is None
            else f" · {rec['tokens_per_second']:,.0f} tokens/s"
            + (" (predicted)" if document["backend"] == "estimate" else "")
        )
        + (
            ""
            if li is None or rec.get("loss") is None  # not probed: nothing to report
            else f" · loss {li:+.2%} vs {_baseline_of(rec)}"
        ),
        f"  why: {rec['reason']}",
    ]
    if document.get("path"):
        formats = "velora|peft|trainer|trl" + (
            "|accelerate|torchrun" if rec.get("parallel") else ""
        )
        lines.append(f"  export: velora export-config --from {document['path']} --format {formats}")
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
        static, limit = small.get("static_bytes"), document.get("limit_bytes")
        if static and limit and static > limit:
            # activations are not the problem: placements, checkpointing, shorter batches
            # shrink only those
            lines.append(
                f"smallest configuration: {describe(small)}, peak "
                f"{format_bytes(small['smallest_peak_bytes'])} ({how}); its parameters, "
                f"gradients and optimizer state alone take {format_bytes(static)}, more than "
                f"{format_bytes(limit)}: no placement, checkpointing or smaller batch helps; try "
                "a larger --budget, a smaller model, or more GPUs (--world-size N: FSDP2 "
                "shards them)"
            )
            return lines
        lines.append(
            f"smallest configuration: {describe(small)}, peak {format_bytes(small['smallest_peak_bytes'])} "
            f"({how}); try a larger --budget, a smaller --batch-size/--seq-len or more --placements"
        )
    return lines
