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


def model_of(record: dict[str, Any], model: str | None = None) -> tuple[str, list[str]]:
    """The model the run trained, as velora can build it, and a note when it is not the plan's.

    Args:
        model: what the user named (``velora profile MODEL --compare RUN``), needed when the
            run trained another model than its plan's and the record has no name for it.

    Raises:
        CompareError: ``model`` contradicts the record, or the run trained an unnamed model.
    """
    from velora_cli.runs.plan_check import describe_model

    plan_model = record["plan"].get("model")
    seen = record.get("observed", {})
    facts = seen.get("model") or {}
    if not seen.get("model_differs"):
        if model is not None and model != plan_model:
            raise CompareError(f"MODEL {model!r} is not the run's model {plan_model!r}: drop it")
        return plan_model, []
    trained = facts.get("name")
    if model is not None:
        if trained and model != trained:
            raise CompareError(f"MODEL {model!r} is not the run's model {trained!r}: drop it")
        trained = model
    if not trained:
        raise CompareError(
            f"the run trained {describe_model(facts)}, not its plan's {plan_model}, and the "
            "record has no name for it: pass it, velora profile MODEL --compare RUN"
        )
    return trained, [
        f"predicted for the model that trained, {trained}, not the plan's {plan_model}"
    ]


def spec_of(record: dict[str, Any], model: str | None = None):
    """The ``StepSpec`` of what the run ran, and lines saying where that differs from the plan.

    Args:
        model: the model the user named (see `model_of`).

    Raises:
        CompareError: the record does not say a sequence length, or its plan is unreadable, or
            the run trained a model it cannot name (`model_of`).
    """
    from velora_cli.measure.train_step import StepSpec, Strategy

    plan = load_config(record["plan"])
    seen = record.get("observed", {})
    notes = [f"the run differed from its plan: {m}" for m in record.get("mismatches", [])]
    trained, said = model_of(record, model)
    notes += said
    world = seen.get("world_size") or plan.world_size
    parallel = None
    if world > 1:
        sharded = seen.get("sharded", (plan.parallel or "").startswith("fsdp"))
        parallel = plan.parallel if sharded == (plan.parallel or "").startswith("fsdp") else None
        parallel = parallel or ("fsdp" if sharded else "ddp")
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
        model=trained,
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
        world_size=world,
        parallel=parallel,
        cpu_offload=plan.cpu_offload and parallel == plan.parallel,
        trainer=seen.get("trainer", plan.trainer),
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
