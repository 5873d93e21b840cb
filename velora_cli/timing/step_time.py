"""The predicted step time of a row: count a step's ops on meta tensors, apply the roofline.

The estimate backend counts the ops of the step it already tracks for memory (one run: FLOPs
and bytes come from the same dispatched ops as the peak) and turns them into row fields here.
The cuda backend asks for the same prediction beside each measured row, for the GPU it ran on,
so that every GPU run is a calibration point of the roofline's assumed efficiencies.
"""

from __future__ import annotations

from typing import Any

from velora_cli.measure.train_step import LOWRANK_OPTIMIZERS, Prepared, train_step
from velora_cli.timing.opcount import OpCounter, StepCounts

PREDICTED_FIELDS = (
    "predicted_step_seconds",
    "predicted_tokens_per_second",
    "predicted_refresh_step_seconds",
    "predicted_gpu",
    "predicted_seconds_by_phase",
    "predicted_seconds_by_kind",
    "step_flops",
    "step_bytes_moved",
    "step_kernels",
)


def prediction_source(gpu: str) -> str:
    """The ``step_seconds_source`` of a predicted row, e.g. ``predicted (roofline, h100)``."""
    return f"predicted (roofline, {gpu})"


def count_step(prepared: Prepared) -> StepCounts:
    """Run one training step of ``prepared`` under an `OpCounter`; its counted ops."""
    counter = OpCounter(prepared.device.type)
    with counter:
        train_step(prepared, phase=counter.phase)
    return counter.counts()


def prediction_fields(
    prepared: Prepared, counts: StepCounts, gpu: str | None, *, regular: StepCounts | None = None
) -> dict[str, Any]:
    """Row fields of the step time predicted for ``gpu`` from ``counts``.

    ``counts`` is the tracked step's (for galore/adarankgrad a forced subspace refresh, their
    costliest step): with a low-rank optimizer it gives ``predicted_refresh_step_seconds`` and one
    more step is counted for the regular step (no refresh: on meta the convergence test never
    fires), as the cpu and cuda backends time the two apart.

    Args:
        prepared: the step (its spec gives tokens and micro-batches; the model may have run
            fewer micro-batches than ``spec.grad_accum_steps``: the prediction repeats the last).
        counts: ops of one counted step of ``prepared``.
        gpu: a `velora_cli.gpus` name (None: the default GPU).
        regular: with a low-rank optimizer, the regular step's counts when already known (the
            estimate's depth shortcut synthesizes them); None: that step is counted here.

    Returns:
        ``predicted_step_seconds``, ``predicted_tokens_per_second``, ``predicted_gpu``, the time
        by phase and by op class, the step's FLOPs, bytes moved and kernels (`PREDICTED_FIELDS`).
    """
    from velora_cli.gpus import get_gpu
    from velora_cli.timing.roofline import gpu_device, predict

    spec = prepared.spec
    device = gpu_device(get_gpu(gpu))
    fields: dict[str, Any] = {}
    if spec.optimizer in LOWRANK_OPTIMIZERS:
        refresh = predict(counts, device, micro_batches=spec.grad_accum_steps)
        fields["predicted_refresh_step_seconds"] = refresh.seconds
        counts = regular if regular is not None else count_step(prepared)
    step = predict(counts, device, micro_batches=spec.grad_accum_steps)
    return {
        "predicted_step_seconds": step.seconds,
        "predicted_tokens_per_second": spec.batch_size * spec.seq_len / step.seconds,
        **fields,
        "predicted_gpu": device.key,
        "predicted_seconds_by_phase": step.by_phase,
        "predicted_seconds_by_kind": step.by_kind,
        "step_flops": step.flops,
        "step_bytes_moved": step.bytes,
        "step_kernels": step.kernels,
    }
