"""What activation offload's copies cost in the predicted step time.

The step's offload (`velora_cli.measure.host_offload`) copies each offloaded tensor to pinned host
memory in the forward and back in the backward. Both copies cross the GPU's host link
(`GpuSpec.host_link_bandwidth`: one direction, an upper bound), charged here at that rate:

    d2h = offloaded bytes per micro-batch × micro-batches / link   (in the forward)
    h2d = restored bytes per micro-batch × micro-batches / link    (in the backward)

Overlap, stated as the assumption it is: ``save_on_cpu`` (what transformers' ``offload=True``
runs, and what the measured step runs) issues both copies on the current stream, so they run
between the kernels around them and add in full: the predicted step time includes d2h + h2d. An
offloader with a side stream (TRL's ``activation_offloading``, ``use_streams=True``) can hide the
copies behind compute: ``offload_hidden_with_streams`` says whether d2h fits in the forward's
predicted compute and h2d in the backward's (an optimistic test: one link, copies and kernels
perfectly overlapped, the link not shared with anything else).
"""

from __future__ import annotations

from typing import Any

from velora_cli.gpus import get_gpu


def offload_fields(row: dict[str, Any], gpu: str | None, micro_batches: int) -> dict[str, Any]:
    """Fields charging the row's offload copies to its predicted step time.

    Args:
        row: a row with ``offloaded_bytes`` / ``restored_bytes`` (per micro-batch) and the
            roofline's ``predicted_step_seconds`` and ``predicted_seconds_by_phase``.
        gpu: the GPU predicted for (`velora_cli.gpus` name).
        micro_batches: micro-batches per step.

    Returns:
        {} without offload; else ``predicted_offload_seconds`` (d2h + h2d), the updated
        ``predicted_step_seconds`` and phases, ``offload_hidden_with_streams`` and the link
        used; with no known host link, only a note that the copies are not charged.
    """
    if row.get("offloaded_bytes") is None or row.get("predicted_step_seconds") is None:
        return {}
    spec = get_gpu(gpu)
    if not spec.host_link_bandwidth:
        return {"offload_note": f"{spec.name}: host link unknown, the copies are not charged"}
    link = spec.host_link_bandwidth
    d2h = row["offloaded_bytes"] * micro_batches / link
    h2d = row.get("restored_bytes", 0) * micro_batches / link
    phases = dict(row.get("predicted_seconds_by_phase") or {})
    hidden = d2h <= phases.get("forward", 0.0) and h2d <= phases.get("backward", 0.0)
    phases["forward"] = phases.get("forward", 0.0) + d2h
    phases["backward"] = phases.get("backward", 0.0) + h2d
    return {
        "predicted_step_seconds": row["predicted_step_seconds"] + d2h + h2d,
        "predicted_seconds_by_phase": phases,
        "predicted_offload_seconds": d2h + h2d,
        "offload_hidden_with_streams": hidden,
        "offload_link": spec.host_link,
        "offload_link_bandwidth": link,  # bytes/s one way, an upper bound (gpus.HOST_LINK_NOTE)
    }
