"""Per-rank rows -> one row of a profile: the job's peak is the largest rank's, its step time
the slowest rank's, its tokens/s the whole job's (world size × per-rank batch × sequence length
per step)."""

from __future__ import annotations

from typing import Any

# What each rank keeps in the job row's ``ranks`` list.
RANK_FIELDS = (
    "rank",
    "status",
    "error",
    "peak_bytes",
    "peak_phase",
    "fwd_bwd_peak_bytes",
    "optimizer_peak_bytes",
    "param_bytes",
    "grad_bytes",
    "optimizer_bytes",
    "comm_buffer_bytes",
    "activation_bytes",
    "peak_breakdown",
    "step_seconds",
    "reserved_bytes",
    "device_used_bytes",
    "host_bytes",
    "tracked_peaks_bytes",
    "gloo_only_bytes",
    "gloo_only_items",
    "predicted_allocated_bytes",
    "predicted_reserved_bytes",
    "predicted_device_bytes",
)
# Predictions of what the GPU must hold: the job's is the largest rank's (each rank needs it).
LARGEST = (
    "predicted_allocated_bytes",
    "predicted_reserved_bytes",
    "predicted_reserved_expandable_bytes",
    "predicted_device_bytes",
    "predicted_device_expandable_bytes",
)


def layout_fields(spec) -> dict[str, Any]:
    """The fields every parallel row carries: world size, strategy, offload, global batch."""
    return {
        "world_size": spec.world_size,
        "parallel": spec.parallel,
        "cpu_offload": spec.cpu_offload,
        "global_batch_size": spec.world_size * spec.batch_size,
    }


def job_row(spec, rank_rows: list[dict[str, Any]], *, backend: str) -> dict[str, Any]:
    """Combine the rows of a job's ranks (each with its ``rank``) into the profile's row.

    Args:
        spec: the `StepSpec` (batch per rank).
        rank_rows: one row per rank measured or estimated, each with ``rank`` and ``status``.
        backend: the backend's name.

    Returns:
        A row like a single-process one (``peak_bytes`` and its breakdown are those of the rank
        with the largest peak, ``peak_rank``), with ``ranks`` (per-rank fields), the layout
        fields, and, when every rank was timed, the slowest rank's ``step_seconds`` and the
        job's ``tokens_per_second``. A failed rank fails the row: ``oom`` if any rank ran out
        of memory, else ``error``, with each failed rank's reason.
    """
    ranks = [{k: r[k] for k in RANK_FIELDS if k in r} for r in rank_rows]
    base = {"backend": backend, **layout_fields(spec), "ranks": ranks}
    failed = [r for r in rank_rows if r.get("status") != "ok"]
    if failed or not rank_rows:
        status = "oom" if any(r.get("status") == "oom" for r in failed) else "error"
        reasons = "; ".join(f"rank {r['rank']}: {r.get('error') or r['status']}" for r in failed)
        return {**base, "status": status, "error": reasons or "no rank reported"}
    top = max(rank_rows, key=lambda r: (r["peak_bytes"], -r["rank"]))
    row = {k: v for k, v in top.items() if k != "rank"}
    row.update(base, status="ok", peak_rank=top["rank"])
    for key in LARGEST:
        values = [r[key] for r in rank_rows if r.get(key) is not None]
        if values:
            row[key] = max(values)
    for key in ("fits_device", "fits_device_expandable"):  # the job fits when every rank does
        flags = [r[key] for r in rank_rows if r.get(key) is not None]
        if flags:
            row[key] = all(flags)
    times = [r.get("step_seconds") for r in rank_rows]
    if all(t is not None for t in times):
        step = max(times)
        row["step_seconds"] = step
        row["tokens_per_second"] = spec.world_size * spec.batch_size * spec.seq_len / step
    else:
        row["step_seconds"], row["tokens_per_second"] = None, None
    return row
