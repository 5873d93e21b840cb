"""Observe one tracked step: the shared core of the cpu and estimate backends.

Both run the same sequence on a prepared model: warm-up steps (create optimizer state, set v from
the first batch), then one step under the storage tracker and the saved-tensor counter. They
differ only in the device (real CPU tensors vs meta tensors) and in whether time is measured.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from velora_cli.measure import timeline
from velora_cli.measure.accounting import SavedTensorCounter
from velora_cli.measure.tracker import AllocationTrace, MemoryTracker
from velora_cli.measure.train_step import Prepared, train_step


def tracked_step(
    prepared: Prepared,
    *,
    breakdown: bool,
    round_to: int = 512,
    op_counter=None,
    tracker: MemoryTracker | None = None,
    with_timeline: bool = True,
    fused: bool = False,
) -> tuple[dict[str, Any], AllocationTrace]:
    """Run one step under the tracker; return the memory fields of a row and the step's
    allocation trace (for the allocator model). The row's ``timeline`` is the trace made
    compact (velora_cli/measure/timeline.py) for the memory-timeline picture.

    With galore/adarankgrad the tracked step refreshes every subspace (SVD or range finder on
    each gradient): their costliest step, so the peak holds for every step.

    Args:
        op_counter: optional `opcount.OpCounter` that also sees every op of this step, with the
            same phases (the roofline's FLOPs and bytes come from the very step the peak does).
        tracker: a tracker made for ``prepared`` with ``trace=True`` (e.g. the depth shortcut's
            `measure.depth.PositionTracker`); None makes a plain one rounding to ``round_to``.
        with_timeline: add the ``timeline`` field (a shallow step of the depth shortcut, whose
            timeline is made from the synthesized deep trace instead, leaves it out).
        fused: ``op_counter`` counts inside the tracker's mode (`MemoryTracker.counting`: the
            same counts, one Python dispatch per op) instead of as a mode of its own above it.
    """
    force_refresh(prepared)
    ledger = getattr(prepared.model, "_velora_host_ledger", None)  # activation offload
    if ledger is not None:
        ledger.reset()
    counter = SavedTensorCounter(prepared.model)
    if tracker is None:
        tracker = MemoryTracker(prepared.model, prepared.optimizer, round_to=round_to, trace=True)
    phase = tracker.phase
    if op_counter is not None:
        phase = _both(tracker.phase, op_counter.phase)
    if op_counter is None:
        counting = contextlib.nullcontext()
    else:
        counting = tracker.counting(op_counter) if fused else op_counter
    with tracker, counting:
        train_step(prepared, forward_context=lambda: counter, phase=phase)
    row: dict[str, Any] = {
        **peak_fields(tracker, counter),
        "param_bytes": prepared.param_bytes(),
        "grad_bytes": prepared.grad_bytes(),
        "optimizer_bytes": prepared.optimizer_bytes(),
        "peak_breakdown": dict(tracker.peak_breakdown),
        "wrapped_layers": len(prepared.wrapped),
        "trainable_params": prepared.trainable_params(),
        **prepared.quantized(),
        **prepared.optimizer_details(),
    }
    paged = prepared.paged_optimizer_bytes()
    if paged:  # managed memory: outside the allocator's counters (methods/optimizers.py)
        row["paged_optimizer_bytes"] = paged
    if ledger is not None:  # host memory apart: the peak above is the device's alone
        row.update(ledger.fields(len(prepared.micro_batches)))
    if breakdown:
        row["activation_breakdown"] = dict(
            sorted(counter.result.by_pattern().items(), key=lambda kv: -kv[1])
        )
    trace = tracker.trace
    if with_timeline:
        row["timeline"] = timeline.compact(
            trace, micro_batches=(len(prepared.micro_batches), prepared.spec.grad_accum_steps)
        )
    return row, trace


def peak_fields(tracker: MemoryTracker, counter: SavedTensorCounter) -> dict[str, Any]:
    """The first fields of a tracked step's row: the peak, its phase, the peak of each phase a
    row reports, and the saved activations."""
    phases = {
        k: v for k, v in tracker.phase_peaks.items() if k in ("forward_backward", "optimizer")
    }
    return {
        "peak_bytes": tracker.peak_bytes,
        "peak_phase": max(phases, key=phases.get) if phases else None,
        "fwd_bwd_peak_bytes": phases.get("forward_backward"),
        "optimizer_peak_bytes": phases.get("optimizer"),
        "activation_bytes": counter.result.total_bytes,
    }


def _both(first, second):
    """One ``phase(name)`` callable entering two phase markers."""

    @contextlib.contextmanager
    def phase(name: str):
        with first(name), second(name):
            yield

    return phase


def force_refresh(prepared: Prepared) -> bool:
    """Make the next step a subspace refresh (galore/adarankgrad); False for other optimizers."""
    refresh = getattr(prepared.optimizer, "refresh_on_next_step", None)
    if refresh is None:
        return False
    refresh()
    return True


def timed_steps(prepared: Prepared, steps: int) -> list[float]:
    """Wall-clock seconds of ``steps`` consecutive steps, each on a new batch."""
    times = []
    for _ in range(steps):
        prepared.next_batch()
        start = time.perf_counter()
        train_step(prepared)
        times.append(time.perf_counter() - start)
    return times
