"""One rank's tracked training step -> its row: the same for the estimate (fake tensors, fake
process group) and for a real rank (CPU tensors, gloo).

Like `velora_cli.measure.observe.tracked_step`, with what a rank adds: the tracker is told the
roles it cannot see (`roles.RankRoles`: unsharded parameters, gradient buckets), sees storage
resizes, labels collective buffers (`roles.CommBuffers`), and rescans roles before the
optimizer step (FSDP2's sharded gradients). Sizes are the rank's own: a DTensor shard counts its
local storage, not the global parameter.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from velora_cli.measure.accounting import SavedTensorCounter
from velora_cli.measure.observe import force_refresh, peak_fields
from velora_cli.measure.tracker import AllocationTrace, MemoryTracker
from velora_cli.measure.train_step import Prepared, train_step
from velora_cli.parallel.roles import EXTRA_CATEGORIES, CommBuffers, DdpBuckets, RankRoles

# DDP rebuilds its buckets in the second iteration's forward (Reducer::rebuild_buckets, in the
# order gradients became ready): two warm-up steps put the tracked step in steady state.
DDP_WARMUP = 2


def warm_up(prepared: Prepared, steps: int, buckets: DdpBuckets | None) -> None:
    """Warm-up steps (optimizer state, VeLoRA's v, FSDP2's lazy init, DDP's bucket rebuild)."""
    if prepared.spec.parallel == "ddp":
        steps = max(steps, DDP_WARMUP)
    for _ in range(steps):
        if buckets is not None:
            buckets.reset()  # keep the buckets of the last warm-up step only
        train_step(prepared)


def local_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` on this rank (a DTensor: its shard)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        storage = local.untyped_storage()
        if id(storage) not in seen:
            seen.add(id(storage))
            total += storage.nbytes()
    return total


def local_numel_bytes(tensors) -> int:
    """Bytes of the rank's elements of ``tensors`` (a DTensor: its shard), views not merged."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def rank_tracker_options(roles: RankRoles) -> dict[str, Any]:
    """What a rank's `MemoryTracker` is told beyond the model and optimizer (module docstring)."""
    return {"extra_categories": EXTRA_CATEGORIES, "roles": roles, "track_resize": True}


def tracked_rank_step(
    prepared: Prepared,
    roles: RankRoles,
    *,
    breakdown: bool = False,
    round_to: int = 512,
    tracker: MemoryTracker | None = None,
) -> tuple[dict[str, Any], AllocationTrace]:
    """Run one step under the tracker with this rank's roles; return its row and trace.

    Args:
        tracker: a tracker made for ``prepared`` with ``trace=True`` and
            `rank_tracker_options` (the depth shortcut's recording one); None: a plain one
            rounding to ``round_to``.

    Returns:
        (row, trace): the row has the fields of `observe.tracked_step`'s, per rank, with
        ``peak_breakdown`` also giving ``unsharded`` and ``comm``.
    """
    force_refresh(prepared)
    model, optimizer = prepared.model, prepared.optimizer
    # Saved unsharded weights (a linear saves W for grad_input) are parameters, not activations.
    counter = SavedTensorCounter(model, exclude=roles.unsharded())
    if tracker is None:
        tracker = MemoryTracker(
            model, optimizer, round_to=round_to, trace=True, **rank_tracker_options(roles)
        )

    @contextlib.contextmanager
    def phase(name: str):
        if name == "optimizer":
            tracker.snapshot()  # FSDP2 assigned the sharded gradients: give them their role
        with tracker.phase(name):
            yield

    with tracker, CommBuffers(tracker):
        train_step(prepared, forward_context=lambda: counter, phase=phase)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    state = [
        v
        for s in optimizer.state.values()
        for k, v in s.items()
        if isinstance(v, torch.Tensor) and k != "step"
    ]
    row: dict[str, Any] = {
        **peak_fields(tracker, counter),
        "param_bytes": local_bytes(params),
        "grad_bytes": local_numel_bytes(trainable),
        "optimizer_bytes": local_bytes(state),
        "comm_buffer_bytes": local_bytes(roles.buckets.buffers.values()) if roles.buckets else 0,
        "peak_breakdown": dict(tracker.peak_breakdown),
        "wrapped_layers": len(prepared.wrapped),
        "trainable_params": sum(p.numel() for p in trainable),  # global: DTensor numel
        **prepared.optimizer_details(),
    }
    if breakdown:
        row["activation_breakdown"] = dict(
            sorted(counter.result.by_pattern().items(), key=lambda kv: -kv[1])
        )
    return row, tracker.trace


def rank_roles(prepared: Prepared, *, fake_world: bool = False) -> RankRoles:
    """Roles for the sharded ``prepared`` model; registers DDP's bucket-recording comm hook."""
    buckets = None
    if prepared.spec.parallel == "ddp":
        buckets = DdpBuckets(fake_world=fake_world)
        buckets.register(prepared.model)
    return RankRoles(prepared.spec.parallel, prepared.model, buckets)
