"""One rank's tracked training step -> its row: the same for the estimate (fake tensors, fake
process group) and for a real rank (CPU tensors, gloo).

Like `velora_cli.measure.observe.tracked_step`, with what a rank adds: the tracker is told the
roles it cannot see (`roles.RankRoles`: unsharded parameters, gradient buckets), sees storage
resizes, labels collective buffers (`roles.CommBuffers`), and rescans roles before the
optimizer step (FSDP2's sharded gradients). Sizes are the rank's own: a DTensor shard counts its
local storage, not the global parameter.

On a real gloo rank it also labels what gloo's collectives hold and NCCL's would not
(`roles.GlooOnly`) and says how much of the peak that is (`gloo_only_fields`): the estimate
predicts a rank on NCCL, so it equals the gloo rank's peak less ``gloo_only_bytes``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch

from velora_cli.measure.accounting import SavedTensorCounter
from velora_cli.measure.observe import force_refresh, peak_fields
from velora_cli.measure.tracker import AllocationTrace, MemoryTracker
from velora_cli.measure.train_step import Prepared, train_step
from velora_cli.parallel.roles import (
    EXTRA_CATEGORIES,
    GLOO_ONLY,
    CommBuffers,
    DdpBuckets,
    GlooOnly,
    RankRoles,
)

# DDP rebuilds its buckets in the second iteration's forward (Reducer::rebuild_buckets, in the
# order gradients became ready): two warm-up steps put the tracked step in steady state.
DDP_WARMUP = 2


def warm_up(
    prepared: Prepared, steps: int, buckets: DdpBuckets | None, *, fewest: bool = False
) -> None:
    """Warm-up steps (optimizer state, VeLoRA's v, FSDP2's lazy init, DDP's bucket rebuild).

    Args:
        fewest: one step with the fewest forwards that reach the same state, for the estimate's
            fake ranks (nothing to time there): one micro-batch, two under DDP (its buckets are
            rebuilt at the second forward, the optimizer state is made by the step), instead
            of ``steps`` steps (two under DDP) over all the step's micro-batches. Only where
            ``steps`` is 1 (the default): more asked for are run as asked.
    """
    if fewest and steps == 1:
        batches = prepared.micro_batches
        prepared.micro_batches = (
            (batches * 2)[:2] if prepared.spec.parallel == "ddp" else batches[:1]
        )
        try:
            if buckets is not None:
                buckets.reset()
            train_step(prepared)
        finally:
            prepared.micro_batches = batches
        return
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


def rank_tracker_options(roles: RankRoles, *, on_gloo: bool = False) -> dict[str, Any]:
    """What a rank's `MemoryTracker` is told beyond the model and optimizer (module docstring);
    ``on_gloo``: a real gloo rank, whose collectives' own storages get the `GLOO_ONLY` category."""
    extra = EXTRA_CATEGORIES + ((GLOO_ONLY,) if on_gloo else ())
    return {"extra_categories": extra, "roles": roles, "track_resize": True}


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
        ``peak_breakdown`` also giving ``unsharded`` and ``comm``; on a gloo process group also
        ``gloo`` and the `gloo_only_fields`.
    """
    force_refresh(prepared)
    on_gloo = _on_gloo()
    model, optimizer = prepared.model, prepared.optimizer
    # Saved unsharded weights (a linear saves W for grad_input) are parameters, not activations.
    counter = SavedTensorCounter(model, exclude=roles.unsharded())
    if tracker is None:
        tracker = MemoryTracker(
            model,
            optimizer,
            round_to=round_to,
            trace=True,
            **rank_tracker_options(roles, on_gloo=on_gloo),
        )

    @contextlib.contextmanager
    def phase(name: str):
        if name == "optimizer":
            tracker.snapshot()  # FSDP2 assigned the sharded gradients: give them their role
        with tracker.phase(name):
            yield

    gloo = GlooOnly(tracker) if on_gloo else contextlib.nullcontext()
    with tracker, CommBuffers(tracker), gloo:
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
    if on_gloo:
        row.update(gloo_only_fields(tracker.trace, gloo.born))
    if breakdown:
        row["activation_breakdown"] = dict(
            sorted(counter.result.by_pattern().items(), key=lambda kv: -kv[1])
        )
    return row, tracker.trace


def _on_gloo() -> bool:
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_backend() == "gloo"


def peak_without(trace: AllocationTrace, excluded: Iterable[int]) -> int:
    """The trace's peak live bytes (rounded as the tracker rounds) without the storages
    ``excluded`` (trace storage ids), wherever in the step that peak falls."""
    skip = set(excluded)
    live = sum(trace.rounded(n) for sid, n in trace.initial if sid not in skip)
    peak = live
    for _, sid, nbytes in trace.events:
        if sid in skip:
            continue
        live += trace.rounded(nbytes) if nbytes > 0 else -trace.rounded(nbytes)
        peak = max(peak, live)
    return peak


def _live_at_peak(trace: AllocationTrace) -> set[int]:
    """Storage ids live at the trace's (first) peak."""
    live = {sid for sid, _ in trace.initial}
    total = best = sum(trace.rounded(n) for _, n in trace.initial)
    best_live = set(live)
    for _, sid, nbytes in trace.events:
        if nbytes > 0:
            live.add(sid)
            total += trace.rounded(nbytes)
        else:
            live.discard(sid)
            total -= trace.rounded(nbytes)
        if total > best:
            best, best_live = total, set(live)
    return best_live


def gloo_only_fields(
    trace: AllocationTrace, born: dict[str, list[tuple[int, int]]]
) -> dict[str, Any]:
    """What of a gloo rank's peak NCCL would not hold (`roles.GlooOnly` found it).

    Args:
        trace: the rank's tracked step.
        born: ``GlooOnly.born``: collective -> ``(storage id, nbytes)`` of what it created.

    Returns:
        ``gloo_only_bytes`` (the peak less the peak of the same step without those storages,
        which may fall at another moment), ``gloo_only_items`` (per collective: how many
        storages, the largest, and the bytes live at the peak) and, when the peak holds any,
        ``gloo_only_note``.
    """
    ids = {sid for items in born.values() for sid, _ in items}
    peak = max(trace.live_bytes())
    at_peak = _live_at_peak(trace)
    items = {
        name: {
            "storages": len(created),
            "largest_bytes": max(n for _, n in created),
            "at_peak_bytes": sum(trace.rounded(n) for sid, n in created if sid in at_peak),
        }
        for name, created in sorted(born.items())
    }
    fields: dict[str, Any] = {
        "gloo_only_bytes": peak - peak_without(trace, ids),
        "gloo_only_items": items,
    }
    if fields["gloo_only_bytes"]:
        what = "; ".join(
            _GLOO_WHAT.get(name, f"storages gloo's {name} created inside the collective")
            for name in items
        )
        fields["gloo_only_note"] = f"gloo-only: {what}: NCCL would not hold it"
    return fields


# What gloo holds in each collective (roles.GlooOnly's docstring has the source lines).
_GLOO_WHAT = {
    # no brackets: the table renderer reads them as markup
    "reduce_scatter_single": "ProcessGroupGloo's reduce-scatter copies its whole input "
    "(reduce_scatter_tensor_coalesced clones each input tensor) and holds the copy until the "
    "work ends (NCCL reduce-scatters from FSDP2's own buffer)",
}
_GLOO_WHAT["reduce_scatter_tensor"] = _GLOO_WHAT["reduce_scatter_single"]


def rank_roles(prepared: Prepared, *, fake_world: bool = False) -> RankRoles:
    """Roles for the sharded ``prepared`` model; registers DDP's bucket-recording comm hook."""
    buckets = None
    if prepared.spec.parallel == "ddp":
        buckets = DdpBuckets(fake_world=fake_world)
        buckets.register(prepared.model)
    return RankRoles(prepared.spec.parallel, prepared.model, buckets)
