"""What a GPU must hold for a training step: the caching allocator's reserved memory, predicted by
replaying the step's allocation trace as the cuda backend runs it, plus the CUDA context. No torch.

    predicted_device_bytes = predicted_reserved_bytes (modelled) + CUDA context (a constant)

The reserved peak comes from `replay.simulate` over the cuda backend's schedule
(measure/cuda.py): parameters and buffers as the model is loaded; warm-up step 1, in which the
optimizer creates its state at the start of its step and cuBLAS takes its two workspaces (one per
handle: the Python thread's at the first forward GEMM, the autograd device thread's at the first
backward one; ``CublasHandlePool.cpp`` keeps one per handle and stream, allocated through the
caching allocator, so they count in allocated and reserved alike); the other warm-up steps and the
untimed step that counts saved tensors; ``empty_cache()``; ``reset_peak_memory_stats()``; the timed
steps. Every step replays the one traced step (`AllocationTrace`), with the kernel scratch of
kernel_scratch.py inserted after the outputs of the ops that take it.

The replay runs within what the allocator can reserve on the GPU (`device_capacity`: the total
CUDA reports less the context): near that limit the allocator's OOM retry path frees its cache,
as the real one does, and a step that runs out even then is reported as not fitting.

`device_memory_fields` is a function of one trace, so a caller that estimates from a shallower
model (fewer layers) can call it on that trace. `estimate_error` compares a prediction with what
a cuda row measured.
"""

from __future__ import annotations

import bisect
import itertools
import os
import re
from collections import defaultdict, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from velora_cli.allocator.caching import AllocatorOutOfMemory
from velora_cli.allocator.config import AllocatorConfig
from velora_cli.allocator.replay import (
    ALLOC,
    EMPTY_CACHE,
    FREE,
    REPEAT,
    RESET_PEAK,
    SKIP,
    Event,
    simulate,
)
from velora_cli.budget import format_bytes

if TYPE_CHECKING:
    from velora_cli.gpus import GpuSpec
    from velora_cli.measure.tracker import AllocationTrace

# The cuda backend's defaults (CudaBackend.warmup, .steps).
CUDA_WARMUP, CUDA_STEPS = 2, 5
# cuBLAS handles a training step uses: the Python thread's (forward, loss) and the autograd
# engine's device thread's (backward, checkpoint recomputation); each keeps its own workspace.
CUBLAS_HANDLES = 2
# expandable_segments:True is pointed out when it would save more than this share of the device
EXPANDABLE_WORTH = 0.05


def cublas_workspace_bytes(gpu: GpuSpec, environ: Mapping[str, str] | None = None) -> int:
    """One cuBLAS workspace: ``CUBLAS_WORKSPACE_CONFIG`` (``:SIZE_KiB:COUNT`` pairs) if set and
    readable, else the architecture's default (``parseChosenWorkspaceSize``)."""
    environ = os.environ if environ is None else environ
    pairs = re.findall(r":([0-9]+):([0-9]+)", environ.get("CUBLAS_WORKSPACE_CONFIG") or "")
    if pairs:
        return sum(int(size) * 1024 * int(count) for size, count in pairs)
    return gpu.cublas_workspace_bytes


def device_capacity(gpu: GpuSpec, cuda_version: str | None = None) -> tuple[int, str]:
    """What the caching allocator can reserve on ``gpu``: the device's total as CUDA reports it
    (`GpuSpec.device_total`) less the CUDA context (`GpuSpec.cuda_context`), and where both
    figures come from. cudaMalloc fails beyond it, and the allocator's OOM retry path frees its
    cache (allocator/caching.py)."""
    total, context = gpu.device_total(), gpu.cuda_context(cuda_version)
    source = (
        f"{format_bytes(total.nbytes)} total as CUDA reports it ({total.basis}: {total.source}) "
        f"- CUDA context {format_bytes(context.nbytes)} ({context.basis})"
    )
    return total.nbytes - context.nbytes, source


def replay_within(events, config: AllocatorConfig, capacity: int, *, over: bool = False):
    """`simulate` with the device's ``capacity``: (statistics, fits). A step that runs out even
    after the allocator frees its cache does not fit; it is replayed again without a capacity, so
    its figures say how much it would take (then above the card). ``events`` is replayed twice
    then, so it must be re-iterable (a `Schedule` or a list).

    Args:
        over: the caller knows the step cannot fit (`live_peak` above ``capacity``): only the
            replay without a capacity runs (the one within it would raise).
    """
    if over:
        return simulate(events, config), False
    try:
        return simulate(events, config, capacity=capacity), True
    except AllocatorOutOfMemory:
        return simulate(events, config), False


def live_peak(events) -> int:
    """The most bytes ``events`` hold live at once, as requested (the allocator rounds each up,
    and holds at least that in its segments): above a capacity, a replay within it must run out
    however the cache is freed. Markers are passed over; a step the replay skips repeats one
    before it, so its live bytes are among those counted."""
    sizes: dict[int, int] = {}
    live = peak = 0
    for kind, key, nbytes in events:
        if kind == ALLOC:
            if nbytes:
                sizes[key] = nbytes
                live += nbytes
                if live > peak:
                    peak = live
        elif kind == FREE:
            live -= sizes.pop(key, 0)
    return peak


class _Keys:
    """Allocator keys: loaded storages keep theirs (``slot``), each replayed step gets fresh ones
    for what it allocates, and workspaces and scratch get negative ones."""

    def __init__(self, trace: AllocationTrace) -> None:
        ids = [sid for sid, _ in trace.initial] + [sid for _, sid, _ in trace.events]
        self.stride = max(ids, default=0) + 1
        self.slot = {sid: sid for sid, _ in trace.initial}  # initial storage -> its holder now
        self._special = 0

    def step(self, step: int, sid: int) -> int:
        return (step + 1) * self.stride + sid

    def special(self) -> int:
        self._special -= 1
        return self._special


def scratch_positions(
    trace: AllocationTrace, scratch: Mapping[str, Sequence[int]]
) -> dict[int, tuple[int, ...]]:
    """Event index -> scratch sizes allocated (and freed again) just before that event.

    An op's scratch goes right after its last output allocation: the C++ allocates outputs, then
    its scratch, and frees the scratch before returning; frees the op triggers come after.

    Args:
        trace: a trace with ``op_names``.
        scratch: op name -> sizes of one call's scratch (kernel_scratch.py).
    """
    if not scratch or not trace.op_names:
        return {}
    ops = [op for op, _, _ in trace.events]
    out: dict[int, tuple[int, ...]] = {}
    for index, name in enumerate(trace.op_names):
        sizes = scratch.get(name)
        if not sizes:
            continue
        op = index + 1  # events count ops from 1
        lo, hi = bisect.bisect_left(ops, op), bisect.bisect_right(ops, op)
        allocs = [i for i in range(lo, hi) if trace.events[i][2] > 0]
        at = allocs[-1] + 1 if allocs else lo
        out[at] = out.get(at, ()) + tuple(sizes)
    return out


@dataclass(frozen=True)
class LoadPlan:
    """How the model's storages reached the GPU, where that was more than one allocation each.

    The caching allocator keeps what loading freed in its segments, and nothing empties them
    before a harness that never calls ``empty_cache()`` resets its peaks, so the reserved peak of
    such a run starts from what loading reserved. Two loaders allocate transients:

    - on-the-fly 4-bit quantization (transformers' bitsandbytes quantizer: the checkpoint
      tensor is materialized on the device in the load dtype, then bitsandbytes'
      ``Params4bit._quantize`` calls ``functional.quantize_4bit``, which allocates the packed
      codes and the absmax, and the full-precision tensor is dropped): ``staged`` maps a packed
      weight's bytes to (the full-precision tensor's bytes, the sizes of the quantization state
      allocated with it, in order);
    - peft's ``prepare_model_for_kbit_training``, after loading, replaces every fp16/bf16
      parameter that is not a 4-bit weight by an fp32 copy (``param.data =
      param.data.to(torch.float32)``, in ``model.parameters()`` order): ``upcast`` maps such a
      parameter's bytes to its bytes as loaded.

    Storages are matched by size (a trace knows sizes and roles, not modules); a trainable
    parameter of an upcast size would be matched too (none of the common shapes is).
    """

    staged: Mapping[int, tuple[int, tuple[int, ...]]] = field(default_factory=dict)
    upcast: Mapping[int, int] = field(default_factory=dict)


def load_events(trace: AllocationTrace, keys: _Keys, plan: LoadPlan | None) -> list[Event]:
    """The allocator events of loading the model: each loaded storage once, in the trace's
    order, with the transients of `plan` (staged tensors freed as their quantized form is made;
    upcast parameters replaced after everything is loaded)."""
    loaded = [
        (sid, nbytes)
        for sid, nbytes in trace.initial
        if trace.categories.get(sid) not in ("optimizer", "grads")
    ]
    if plan is None or not (plan.staged or plan.upcast):
        return [(ALLOC, keys.slot[sid], nbytes) for sid, nbytes in loaded]
    buffers: dict[int, deque[int]] = defaultdict(deque)
    for sid, nbytes in loaded:
        if trace.categories.get(sid) == "buffers":
            buffers[nbytes].append(sid)
    companions: dict[int, list[tuple[int, int]]] = {}  # packed weight -> its state
    for sid, nbytes in loaded:
        if trace.categories.get(sid) != "params" or nbytes not in plan.staged:
            continue
        sizes = plan.staged[nbytes][1]
        need: dict[int, int] = {}
        for size in sizes:
            need[size] = need.get(size, 0) + 1
        if all(len(buffers[size]) >= count for size, count in need.items()):
            companions[sid] = [(buffers[size].popleft(), size) for size in sizes]
    taken = {c for state in companions.values() for c, _ in state}
    events: list[Event] = []
    after: list[Event] = []
    for sid, nbytes in loaded:
        if sid in taken:
            continue
        if sid in companions:
            full = keys.special()
            events.append((ALLOC, full, plan.staged[nbytes][0]))
            events.append((ALLOC, keys.slot[sid], nbytes))
            events += [(ALLOC, keys.slot[c], size) for c, size in companions[sid]]
            events.append((FREE, full, 0))
        elif trace.categories.get(sid) == "params" and nbytes in plan.upcast:
            half = keys.special()
            events.append((ALLOC, half, plan.upcast[nbytes]))
            after += [(ALLOC, keys.slot[sid], nbytes), (FREE, half, 0)]
        else:
            events.append((ALLOC, keys.slot[sid], nbytes))
    return events + after


def _first_index(trace: AllocationTrace, phase: str, default: int) -> int:
    return next((start for name, start, _ in trace.phases if name == phase), default)


# AccumulateGrad adds a backward buffer into an existing gradient right after the op that made
# it; a buffer freed within this many events of its allocation, with a gradient's size, is such
# a buffer
ACCUMULATE_WINDOW = 8


def first_step_grads(trace: AllocationTrace) -> dict[int, int]:
    """Backward buffers of the traced step that were gradients in the run's first step.

    A loop that zeroes gradients in place (``zero_grad(set_to_none=False)``) starts the traced
    step with every gradient allocated (``trace.initial``); its backward makes each parameter's
    gradient in a fresh buffer and AccumulateGrad adds it in place, then frees it. In the first
    step no gradient exists yet and AccumulateGrad keeps that buffer as the gradient
    (``accumulate_grad.h``: a new gradient is stolen, not copied), so the first step's gradients
    lie where those buffers were allocated, between the activations freed by the backward. Each
    gradient is matched, by size and in backward order, to a buffer that lives at most
    `ACCUMULATE_WINDOW` events.

    Returns:
        traced buffer's storage id -> the initial gradient's storage id it stands for.
    """
    pending: dict[int, list[int]] = {}
    for sid, nbytes in trace.initial:
        if trace.categories.get(sid) == "grads":
            pending.setdefault(nbytes, []).append(sid)
    if not pending:
        return {}
    start = _first_index(trace, "backward", len(trace.events))
    end = _first_index(trace, "optimizer", len(trace.events))
    born: dict[int, tuple[int, int]] = {}  # storage -> (event index, nbytes)
    out: dict[int, int] = {}
    for index in range(start, end):
        _op, sid, nbytes = trace.events[index]
        if nbytes > 0:
            born[sid] = (index, nbytes)
            continue
        if sid not in born:
            continue
        at, size = born.pop(sid)
        if index - at <= ACCUMULATE_WINDOW and pending.get(size):
            out[sid] = pending[size].pop(0)
    return out


def _step_events(
    trace: AllocationTrace,
    keys: _Keys,
    step: int,
    scratch_at: Mapping[int, Sequence[int]],
    *,
    first: bool,
    workspace: int,
) -> list[Event]:
    """One replayed step; ``first``: warm-up step 1 (workspaces, optimizer state created)."""
    inserts: dict[int, list[Event]] = {}
    if first:
        if workspace:
            for phase in ("forward", "backward")[:CUBLAS_HANDLES]:
                at = _first_index(trace, phase, 0)
                inserts.setdefault(at, []).append((ALLOC, keys.special(), workspace))
        at = _first_index(trace, "optimizer", len(trace.events))
        for sid, nbytes in trace.initial:
            if trace.categories.get(sid) == "optimizer":
                inserts.setdefault(at, []).append((ALLOC, keys.slot[sid], nbytes))
        stolen = first_step_grads(trace)
        for sid, nbytes in trace.initial:  # gradients no backward buffer stood for
            if trace.categories.get(sid) == "grads" and sid not in stolen.values():
                at = _first_index(trace, "backward", len(trace.events))
                inserts.setdefault(at, []).append((ALLOC, keys.slot[sid], nbytes))
    else:
        stolen = {}
    events: list[Event] = []
    append = events.append
    live: dict[int, int] = {}  # step-local storage -> its key
    freed_slots: list[int] = []
    offset = (step + 1) * keys.stride  # keys.step(step, sid) == offset + sid
    slot = keys.slot
    extra = inserts.keys() | scratch_at.keys()  # event indices with something before them
    for index, (_op, sid, nbytes) in enumerate(trace.events):
        if index in extra:
            events.extend(inserts.get(index, ()))
            scratch = [(keys.special(), size) for size in scratch_at.get(index, ())]
            events += [(ALLOC, key, size) for key, size in scratch]  # live together in the op,
            events += [(FREE, key, 0) for key, _ in reversed(scratch)]  # freed as it returns
        if sid in stolen:  # the first step's backward buffer that became a gradient
            if nbytes > 0:
                append((ALLOC, slot[stolen[sid]], nbytes))
        elif nbytes > 0:
            key = live[sid] = offset + sid
            append((ALLOC, key, nbytes))
        elif sid in live:
            append((FREE, live.pop(sid), 0))
        elif sid in slot:  # a loaded storage (or what replaced it) freed in the step
            append((FREE, slot[sid], 0))
            freed_slots.append(sid)
    events.extend(inserts.get(len(trace.events), ()))
    # What the step leaves alive replaces the loaded storages it freed (e.g. a refreshed
    # projection); anything beyond is freed, as the next step's trace does not know it.
    survivors = list(live.values())
    for sid, key in zip(freed_slots, survivors, strict=False):
        keys.slot[sid] = key
    events += [(FREE, key, 0) for key in survivors[len(freed_slots) :]]
    return events


class _StepTemplate:
    """`_step_events` of a step after the first, worked out once per trace: which storages the
    step allocates, which loaded storages it frees and where the scratch goes are the same in
    every such step; only the keys move on (each step's own keys one stride further, the
    loaded storages' holders as the previous step left them, fresh scratch keys). A 7B tune
    builds a few steps of ~10^4 events each for every row: the events of one are zipped in C
    from the template's columns (kinds, storage ids moved on by the step's offset, sizes), and
    the few entries that are not the step's own storages are written over after.
    tests/test_device_memory.py checks the events equal `_step_events`'s."""

    def __init__(self, trace: AllocationTrace, slots, scratch_at) -> None:
        kinds: list[str] = []
        refs: list[int] = []  # the step's own storage id (else 0: written over)
        sizes: list[int] = []
        kind_of, ref_of, size_of = kinds.append, refs.append, sizes.append
        # (index, kind, loaded storage id, bytes): a loaded storage's current holder freed
        self.slot_entries: list[tuple[int, str, int, int]] = []
        # (index, kind, n, bytes): the step's n-th kernel scratch buffer
        self.scratch_entries: list[tuple[int, str, int, int]] = []
        live: dict[int, None] = {}  # the step's own storages alive, in allocation order
        self.freed_slots: list[int] = []
        scratch_count = 0
        for index, (_op, sid, nbytes) in enumerate(trace.events):
            if index in scratch_at:
                first = scratch_count
                for size in scratch_at[index]:
                    scratch_count += 1
                    self.scratch_entries.append((len(kinds), ALLOC, scratch_count, size))
                    kind_of(ALLOC)
                    ref_of(0)
                    size_of(size)
                for number in range(scratch_count, first, -1):
                    self.scratch_entries.append((len(kinds), FREE, number, 0))
                    kind_of(FREE)
                    ref_of(0)
                    size_of(0)
            if nbytes > 0:
                live[sid] = None
                kind_of(ALLOC)
                ref_of(sid)
                size_of(nbytes)
            elif sid in live:
                del live[sid]
                kind_of(FREE)
                ref_of(sid)
                size_of(0)
            elif sid in slots:
                self.slot_entries.append((len(kinds), FREE, sid, 0))
                kind_of(FREE)
                ref_of(0)
                size_of(0)
                self.freed_slots.append(sid)
        self.kinds, self.refs, self.sizes = kinds, refs, sizes
        self.survivors = list(live)
        self.scratch_count = scratch_count

    def events(self, keys: _Keys, step: int) -> list[Event]:
        """Step ``step``'s events (`_step_events` with ``first`` False); moves ``keys`` on."""
        offset, slot = (step + 1) * keys.stride, keys.slot
        scratch = keys._special  # the n-th scratch buffer of the step gets scratch - n
        moved = map(offset.__add__, self.refs)
        events: list[Event] = list(zip(self.kinds, moved, self.sizes, strict=True))
        for index, kind, sid, nbytes in self.slot_entries:
            events[index] = (kind, slot[sid], nbytes)
        for index, kind, number, nbytes in self.scratch_entries:
            events[index] = (kind, scratch - number, nbytes)
        keys._special = scratch - self.scratch_count
        survivors = [offset + sid for sid in self.survivors]
        for sid, key in zip(self.freed_slots, survivors, strict=False):
            slot[sid] = key
        events += [(FREE, key, 0) for key in survivors[len(self.freed_slots) :]]
        return events


def cuda_schedule(
    trace: AllocationTrace,
    *,
    workspace: int,
    scratch: Mapping[str, Sequence[int]] | None = None,
    warmup: int = CUDA_WARMUP,
    steps: int = CUDA_STEPS,
    empty_cache: bool = True,
    load: LoadPlan | None = None,
    reset_peak: bool = True,
) -> list[Event]:
    """The allocator events of a cuda-backend row, built from one traced step.

    Args:
        trace: the traced step (after warm-up: optimizer state among its initial storages).
        workspace: bytes of one cuBLAS workspace (0: none).
        scratch: op name -> scratch sizes of one call.
        warmup: warm-up steps before the untimed counting step.
        steps: timed steps.
        empty_cache: the harness empties the cache before the peak is reset (the cuda backend
            does); False: the pool the warm-up grew is still reserved when measuring starts.
        load: the loader's transients (`LoadPlan`; None: each storage allocated once).
        reset_peak: the harness resets the peak counters after the warm-up (the cuda backend
            does); False: its peaks cover the whole run from the load (a published run that
            reads ``max_memory_allocated`` once after training).

    Returns:
        Load, ``warmup`` + 1 steps (the first creates the optimizer state and the workspaces;
        each later one after a SKIP marker), EMPTY_CACHE (with ``empty_cache``), RESET_PEAK
        (with ``reset_peak``), ``steps`` steps, each after a REPEAT marker.
    """
    return list(
        Schedule(
            trace,
            workspace=workspace,
            scratch=scratch,
            warmup=warmup,
            steps=steps,
            empty_cache=empty_cache,
            load=load,
            reset_peak=reset_peak,
        )  # fmt: skip
    )


class Schedule:
    """`cuda_schedule`'s events, built a step at a time when a replay first reaches it and kept,
    so that several replays (default settings, expandable segments) share one build and none
    builds the steps after the one it stops at (allocator.REPEAT)."""

    def __init__(
        self,
        trace: AllocationTrace,
        *,
        workspace: int,
        scratch: Mapping[str, Sequence[int]] | None = None,
        warmup: int = CUDA_WARMUP,
        steps: int = CUDA_STEPS,
        empty_cache: bool = True,
        load: LoadPlan | None = None,
        reset_peak: bool = True,
    ) -> None:
        self.trace, self.workspace, self.warmup, self.steps = trace, workspace, warmup, steps
        self.empty_cache, self.reset_peak = empty_cache, reset_peak
        self.keys = _Keys(trace)
        self.scratch_at = scratch_positions(trace, scratch or {})
        self.parts: list[list[Event]] = [load_events(trace, self.keys, load)]
        self._next = 0  # the next step to build
        self._template: _StepTemplate | None = None  # the steps after the first, made once
        self._holders: dict[int, int] | None = None  # loaded storage -> its holder mod stride
        self._marked = False  # the next timed step's REPEAT marker is out, the step not yet

    def _build(self) -> bool:
        step, warm = self._next, self.warmup + 1
        if step >= warm + self.steps:
            return False
        if step >= warm and not self._marked:
            # each timed step is the previous one with its keys one stride on: the replay may
            # stop once the allocator is steady (replay.simulate), at the marker, so the
            # marker is a part of its own and the step is built only if the replay goes on
            self.parts.append([(REPEAT, self.keys.stride, 0)])
            self._marked = True
            return True
        self._marked = False
        if step == 0:
            events = _step_events(self.trace, self.keys, step, self.scratch_at, first=True,
                                  workspace=self.workspace)  # fmt: skip
        else:
            if self._template is None:
                self._template = _StepTemplate(self.trace, self.keys.slot, self.scratch_at)
            # the warm-up steps after the first: each repeats the one before (the same template,
            # its keys one stride on) when the loaded storages it frees are held by the same
            # storages of the step before (modulo the stride) as they were for that step; the
            # replay may then pass over it (allocator.SKIP)
            stride = self.keys.stride
            holders = {sid: key % stride for sid, key in self.keys.slot.items()}
            again = int(holders == self._holders)
            self._holders = holders
            events = self._template.events(self.keys, step)
            if step < warm:
                events.insert(0, (SKIP, stride, again))
        self.parts.append(events)
        if step == warm - 1:
            empty = [(EMPTY_CACHE, 0, 0)] if self.empty_cache else []
            reset = [(RESET_PEAK, 0, 0)] if self.reset_peak else []
            self.parts.append([*empty, *reset])
        self._next += 1
        return True

    def __iter__(self) -> Iterator[Event]:
        # the events of each part in turn: chained in C, the generator runs once per part
        return itertools.chain.from_iterable(self._parts())

    def _parts(self) -> Iterator[list[Event]]:
        index = 0
        while index < len(self.parts) or self._build():
            yield self.parts[index]
            index += 1


def device_memory_fields(
    trace: AllocationTrace,
    *,
    gpu: GpuSpec,
    config: AllocatorConfig | None = None,
    scratch: Mapping[str, Sequence[int]] | None = None,
    warmup: int = CUDA_WARMUP,
    steps: int = CUDA_STEPS,
    environ: Mapping[str, str] | None = None,
    expandable: bool = True,
    empty_cache: bool = True,
    cuda_version: str | None = None,
    load: LoadPlan | None = None,
    reset_peak: bool = True,
) -> dict[str, Any]:
    """The device-level prediction of one row, from its traced step.

    Args:
        trace: the step's allocation trace (measure/observe.tracked_step).
        gpu: the GPU predicted for (context and workspace sizes).
        config: the allocator settings (default: PyTorch's).
        expandable: also replay with ``expandable_segments:True`` (the ``*_expandable_*``
            fields; a tune, which compares the budget with the default settings, leaves it out).
        scratch: op name -> kernel scratch sizes (kernel_scratch.scratch_for_model).
        warmup, steps, empty_cache, reset_peak: the schedule of the run predicted (default: the
            cuda backend's; `cuda_schedule`).
        cuda_version: the CUDA runtime of the run (``torch.version.cuda``): the context figure
            for that version (`GpuSpec.cuda_context`); None: the GPU's figure for a current CUDA.
        environ: where ``CUBLAS_WORKSPACE_CONFIG`` is read (default: os.environ).
        load: how the model was loaded (`LoadPlan`: quantization on load, kbit upcasts); what
            loading reserved stays reserved when the schedule never empties the cache.

    Returns:
        Row fields: ``predicted_allocated_bytes`` (what max_memory_allocated would read),
        ``predicted_reserved_bytes`` (max_memory_reserved), ``fragmentation_bytes``, the same
        two with ``expandable_segments:True``, ``predicted_device_bytes`` (+ the CUDA context;
        NVML's used memory) and its expandable counterpart, the constants used and
        ``device_memory_notes`` saying what is modelled and what is a constant. Both replays
        run within ``device_capacity_bytes`` (`device_capacity`: the card's total less the
        context), as the real allocator does: near the limit cudaMalloc fails and the allocator
        frees its cache and retries (``alloc_retries``; reserved then stays within the card).
        ``fits_device`` (``fits_device_expandable``) is False when even that fails: the step
        does not fit the card, and the figures are the replay without a limit.
    """
    config = config or AllocatorConfig()
    workspace = cublas_workspace_bytes(gpu, environ)
    schedule = Schedule(trace, workspace=workspace, scratch=scratch, warmup=warmup, steps=steps,
                        empty_cache=empty_cache, load=load, reset_peak=reset_peak)  # fmt: skip
    capacity, capacity_source = device_capacity(gpu, cuda_version)
    # a step that holds more than the card at once runs out however the cache is freed: its
    # replays within the card (half a replay or so, each) are left out. The traced step's own
    # live bytes say when the schedule's are worth counting (the 7B profile's default rows, fp32
    # full training on an H100, all do).
    over = max(trace.live_bytes()) > capacity and live_peak(schedule) > capacity
    base, fits = replay_within(schedule, config, capacity, over=over)
    grown, grown_fits = (
        replay_within(schedule, config.with_expandable_segments(True), capacity, over=over)
        if expandable
        else (None, None)
    )
    cuda_context = gpu.cuda_context(cuda_version)
    context = cuda_context.nbytes
    largest_scratch = max((sum(s) for s in schedule.scratch_at.values()), default=0)
    notes = (
        f"device = reserved (modelled: allocator replay of the traced step as the cuda backend "
        f"runs it, settings {config.describe()}, incl. {CUBLAS_HANDLES} cuBLAS workspaces of "
        f"{format_bytes(workspace)}"
        + (
            f" and kernel scratch up to {format_bytes(largest_scratch)} per op"
            if largest_scratch
            else ""
        )
        + f") + CUDA context {format_bytes(context)} (constant for {gpu.key}: "
        f"{cuda_context.source}); replayed within what the allocator can reserve, "
        f"{format_bytes(capacity)} = {capacity_source}"
    )
    if not fits:
        notes += (
            f"; DOES NOT FIT: the step needs more than the {format_bytes(capacity)} the allocator "
            f"can reserve on {gpu.name} even after it frees its cache (cudaMalloc fails, the "
            "retry path frees cached segments, the retry fails: an out-of-memory error); the "
            "figures are the replay without that limit"
        )
    elif base.alloc_retries:
        notes += (
            f"; near the card's limit: cudaMalloc failed {base.alloc_retries} time(s) in the "
            "replay and the allocator freed cached segments and retried (reserved held at "
            f"most at {format_bytes(capacity)}; the real run slows down with each such retry). "
            "A prediction at the card's edge: it fits only if freeing the cache is enough, and "
            "fragmentation the replay does not see (a loader's staging segments, say) can still "
            "make the real run fail (docs/validation.md: such runs that completed and one that "
            "ran out)"
        )
    if grown is not None and not grown_fits:
        notes += "; with expandable_segments:True it does not fit either (figures without limit)"
    fields = {
        "predicted_allocated_bytes": base.peak_allocated_bytes,
        "predicted_reserved_bytes": base.peak_reserved_bytes,
        "fragmentation_bytes": base.fragmentation_bytes,
    }
    if grown is not None:
        fields["predicted_reserved_expandable_bytes"] = grown.peak_reserved_bytes
        fields["fragmentation_expandable_bytes"] = grown.fragmentation_bytes
    fields["predicted_device_bytes"] = base.peak_reserved_bytes + context
    if grown is not None:
        fields["predicted_device_expandable_bytes"] = grown.peak_reserved_bytes + context
    fields["device_capacity_bytes"] = capacity
    fields["fits_device"] = fits
    fields["alloc_retries"] = base.alloc_retries
    if grown is not None:
        fields["fits_device_expandable"] = grown_fits
    return {
        **fields,
        "cuda_context_bytes": context,
        "cublas_workspace_bytes": CUBLAS_HANDLES * workspace,
        "kernel_scratch_bytes": largest_scratch,
        "allocator_conf": config.describe(),
        "device_memory_notes": notes,
    }


def expandable_saving(row: Mapping[str, Any]) -> tuple[int, float] | None:
    """(bytes, share of the device figure) ``expandable_segments:True`` would save on a row, when
    that share exceeds `EXPANDABLE_WORTH`; else None."""
    device, expandable = (
        row.get("predicted_device_bytes"),
        row.get("predicted_device_expandable_bytes"),
    )
    if not device or expandable is None:
        return None
    saving = device - expandable
    share = saving / device
    return (saving, share) if share > EXPANDABLE_WORTH else None


# Measured fields of a cuda row and the predictions they are compared with.
COMPARED = (
    ("allocated", "peak_bytes", "predicted_allocated_bytes"),  # max_memory_allocated
    ("reserved", "reserved_bytes", "predicted_reserved_bytes"),  # max_memory_reserved
    ("device", "device_used_bytes", "predicted_device_bytes"),  # NVML used, all processes
    ("process", "process_used_bytes", "predicted_device_bytes"),  # NVML, the worker alone
)


def estimate_error(measured: Mapping[str, Any], predicted: Mapping[str, Any]) -> dict[str, Any]:
    """How far a prediction is from a cuda row's measurements, for calibrating the model.

    Args:
        measured: a cuda row (``peak_bytes`` = max_memory_allocated, ``reserved_bytes`` =
            max_memory_reserved, ``device_used_bytes`` from NVML for the whole device,
            ``process_used_bytes`` for the worker alone; missing ones are skipped).
        predicted: the estimate's device-memory fields for the same step.

    Returns:
        For each of allocated, reserved, device and process: ``estimate_error_<name>_bytes``
        (predicted − measured) and ``estimate_error_<name>_pct`` (of the measurement); plus
        ``context_implied_bytes`` (NVML used − measured reserved: what the CUDA context constant
        should be; from the worker's own usage where NVML reports it, else the device's, which
        also counts other processes, the parent's context included if it made one).
    """
    out: dict[str, Any] = {}
    for name, measured_key, predicted_key in COMPARED:
        real, guess = measured.get(measured_key), predicted.get(predicted_key)
        if real is None or guess is None:
            continue
        out[f"estimate_error_{name}_bytes"] = guess - real
        out[f"estimate_error_{name}_pct"] = 100 * (guess - real) / real if real else None
    used = measured.get("process_used_bytes")
    if used is None:
        used = measured.get("device_used_bytes")
    if used is not None and measured.get("reserved_bytes") is not None:
        out["context_implied_bytes"] = used - measured["reserved_bytes"]
    return out


def scratch_for_step(spec: Any, model: Any) -> dict[str, tuple[int, ...]]:
    """Kernel scratch per op for a `StepSpec` and its (transformers) model: the micro-batch shape
    and the compute dtype (bf16/fp16 under ``--amp`` or ``--dtype``; fp32 takes no flash path)."""
    from velora_cli.allocator.kernel_scratch import scratch_for_model

    config = getattr(model, "config", None)
    if config is None:
        return {}
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    dtype_bytes = 2 if spec.amp or spec.dtype in ("bf16", "fp16") else 4
    return scratch_for_model(
        config,
        micro_batch=spec.batch_size // spec.grad_accum_steps,
        seq_len=spec.seq_len,
        dtype_bytes=dtype_bytes,
    )
