"""``--cpu-offload`` in the estimate: what stays on the GPU when FSDP2 offloads to host memory.

With ``CPUOffloadPolicy`` FSDP2 keeps the sharded parameters, their gradients and (since the
optimizer steps where its parameters are) the optimizer state in host memory; the GPU holds the
unsharded parameters it all-gathers, the communication buffers, activations and temporaries.
The estimate runs on fake CPU tensors, where host and device are one: it replays the rank's
allocation trace counting only the storages whose final role is not a host one, so the device
peak is found at its own moment (not the total's).

Not seen on fake CPU tensors (there ``.to("cpu")`` allocates nothing): the device-side copy of
each shard FSDP2 makes before its all-gather, and the device-side reduce-scatter output it
copies to the host gradient; each is at most one FSDP unit's shard (a decoder layer / N) and
short-lived, so the device peak is low by up to about two of them.
"""

from __future__ import annotations

from typing import Any

from velora_cli.measure.tracker import AllocationTrace

HOST_CATEGORIES = ("params", "grads", "optimizer")


def device_peak(trace: AllocationTrace) -> tuple[int, dict[str, int], int]:
    """The trace's peak without host-resident storages.

    Returns:
        (device peak bytes, its bytes by category, the host-resident bytes' own peak).
    """
    live: dict[int, int] = {}
    host = host_peak = 0
    for sid, nbytes in trace.initial:
        if trace.categories.get(sid) in HOST_CATEGORIES:
            host += trace.rounded(nbytes)
        else:
            live[sid] = trace.rounded(nbytes)
    host_peak = host
    current = sum(live.values())
    peak, at_peak = current, dict(live)
    for _op, sid, nbytes in trace.events:
        if trace.categories.get(sid) in HOST_CATEGORIES:
            host += trace.rounded(nbytes) if nbytes > 0 else -trace.rounded(nbytes)
            host_peak = max(host_peak, host)
            continue
        if nbytes > 0:
            live[sid] = live.get(sid, 0) + trace.rounded(nbytes)
            current += trace.rounded(nbytes)
        else:
            freed = trace.rounded(nbytes)
            live[sid] = live.get(sid, 0) - freed
            current -= freed
        if current > peak:
            peak, at_peak = current, dict(live)
    breakdown: dict[str, int] = {}
    for sid, nbytes in at_peak.items():
        if nbytes:
            category = trace.categories.get(sid, "temporaries")
            breakdown[category] = breakdown.get(category, 0) + nbytes
    return peak, breakdown, host_peak


def offloaded_row(row: dict[str, Any], trace: AllocationTrace) -> dict[str, Any]:
    """The rank's row with the GPU's peak (``peak_bytes``) and the host's share apart."""
    peak, breakdown, host = device_peak(trace)
    full = dict.fromkeys(row["peak_breakdown"], 0)
    full.update(breakdown)
    return {
        **row,
        "peak_bytes": peak,
        "peak_breakdown": full,
        "host_bytes": host,
        "total_peak_bytes": row["peak_bytes"],
        "fwd_bwd_peak_bytes": None,  # the tracker's phase peaks count host memory too
        "optimizer_peak_bytes": None,
        "peak_note": "cpu offload: device peak from the rank's trace without its sharded "
        "parameters, gradients and optimizer state (host memory)",
    }


def device_resident(trace: AllocationTrace) -> AllocationTrace:
    """The trace without its host-resident storages (sharded parameters, gradients, optimizer
    state under ``CPUOffloadPolicy``): what the GPU's caching allocator sees."""
    import dataclasses

    host = {sid for sid, role in trace.categories.items() if role in HOST_CATEGORIES}
    return dataclasses.replace(
        trace,
        initial=tuple(item for item in trace.initial if item[0] not in host),
        events=tuple(event for event in trace.events if event[1] not in host),
    )
