"""``velora profile --compare RUN``: predict what a recorded run ran, and line the two up.

`spec_of` turns a run record (`velora_cli.runs.record`) into the training step it ran: the plan's model,
mode, precision and VeLoRA, with what the run really had where it differs (its micro-batch and
accumulation, its longest sequence, its checkpointing, its autocast, VeLoRA only if the run had
it). `comparison` puts each figure the run measured beside this prediction and beside the plan's
own, with relative errors. Plain data; rendering is `velora_cli.report.run`.
"""

from __future__ import annotations

from typing import Any

from velora_cli.configs import load_config
from velora_cli.runs import record as runs

# measured figure -> the profile row's field that predicts it (and whether like for like)
ROW_FIELDS = {
    "allocated_bytes": ("peak_bytes", True),  # every backend's peak_bytes is the allocator's
    "reserved_bytes": ("reserved_bytes", True),
    "device_used_bytes": ("device_used_bytes", True),
    "tensor_peak_bytes": ("peak_bytes", True),
    "rss_peak_bytes": ("peak_bytes", False),
    "rss_peak_since_start_bytes": ("peak_bytes", False),
    "tokens_per_second": ("tokens_per_second", True),
}


class CompareError(ValueError):
    """A run record that cannot be turned into a step to predict (the message says why)."""


def run_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The run's summary (computed from its intervals when the run did not finish)."""
    if record.get("summary"):
        return record["summary"]
    if not record.get("intervals"):
        raise CompareError(
            f"{record.get('path', 'the run')} has no logging interval yet: nothing measured to "
            "compare (it is written after each logging interval)"
        )
    return runs.summarize(record["intervals"], record.get("prediction", {}))


def spec_of(record: dict[str, Any]):
    """The ``StepSpec`` of what the run ran, and lines saying where that differs from the plan.

    Raises:
        CompareError: the record does not say a sequence length, or its plan is unreadable.
    """
    from velora_cli.measure.train_step import StepSpec, Strategy

    plan = load_config(record["plan"])
    seen = record.get("observed", {})
    notes = [f"the run differed from its plan: {m}" for m in record.get("mismatches", [])]
    micro = seen.get("micro_batch_size") or plan.micro_batch_size
    accum = seen.get("grad_accum_steps") or plan.grad_accum_steps
    seq = run_summary(record).get("seq_len_max") or plan.seq_len
    if not seq:
        raise CompareError("the run record says no sequence length (neither seen nor planned)")
    if plan.seq_len and seq != plan.seq_len:
        notes.append(
            f"predicted at the run's longest sequence, {seq} tokens (planned {plan.seq_len})"
        )
    gc = seen.get("gc_every", plan.gc_every)
    if gc == "irregular":
        notes.append("the run checkpointed an irregular set of layers: predicted with the plan's")
        gc = plan.gc_every
    placement, groups = plan.placement, plan.num_groups
    layers = seen.get("velora_layers", {})
    if not layers:
        placement = groups = None
    elif placement is None:
        notes.append("the run had VeLoRA layers the plan does not name: predicted without VeLoRA")
        groups = None
    elif groups is None and plan.layers:
        entry = next(iter(plan.layers.values()))
        groups = entry["in_features"] // entry["sub_token_size"]
    spec = StepSpec(
        model=plan.model,
        batch_size=micro * accum,
        seq_len=seq,
        grad_accum_steps=accum,
        dtype=plan.dtype,
        amp=seen.get("amp", plan.amp),
        mode=plan.mode,
        lora_rank=plan.lora_rank or 8,
        lora_targets=plan.lora_targets or "all-linear",
        optimizer=plan.optimizer,
        rank=plan.rank,
        update_gap=plan.update_gap,
        eta=plan.eta,
        init=plan.init,
        strategy=Strategy(placement, groups, gc=False if gc is None else gc),
    )
    return spec, notes


def comparison(record: dict[str, Any], row: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per figure the run measured: the run's value, this prediction's, the plan's.

    Returns:
        ``[{figure, run, predicted, relative_error, like_for_like, plan, plan_error}]``; missing
        predictions are None.
    """
    summary = run_summary(record)
    measured = {**summary["memory"], "tokens_per_second": summary.get("tokens_per_second")}
    plan = runs.versus(measured, record.get("prediction", {}))
    lines = []
    for figure, value in measured.items():
        if value is None or figure not in ROW_FIELDS:
            continue
        field, like = ROW_FIELDS[figure]
        predicted = row.get(field) if row.get("status") == "ok" else None
        lines.append(
            {
                "figure": figure,
                "run": value,
                "predicted": predicted,
                "relative_error": runs.relative_error(value, predicted),
                "like_for_like": like,
                "plan": plan.get(figure, {}).get("predicted"),
                "plan_error": plan.get(figure, {}).get("relative_error"),
            }
        )
    return lines
