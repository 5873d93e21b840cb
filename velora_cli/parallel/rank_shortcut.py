"""The depth shortcut for one rank of a DDP/FSDP2 job: its step from three shallow ones, exact or
refused.

The single-process estimate's depth shortcut (`velora_cli.shortcut.shortcuts`) applies to a rank
unchanged in principle: a rank's step over a stack of identical blocks is one sequence of ops
at every depth, the block part repeated, with what the engines add per block (FSDP2's
all-gather of block j's parameters before its forward and backward, their reshard after, the
reduce-scatter of its gradients; DDP's gradient buckets) repeated with it. So, for rank r:

1. the same plan and checks as one process (`Shortcuts.depth_plan`: the real model's blocks
   repeat, the shallow models look like it outside the stack; depths 2n, 3n, 4n for
   checkpointing every n; at least 8n blocks);
2. each shallow model is built, sharded and warmed up as the real rank is (`fake.run_rank`)
   and its step tracked by the rank's tracker (roles, resizes, collective buffers) that also
   logs its memory curve and records its ops by block (`shortcut.record.RecordingTracker`,
   `depth.BlockMarks`); a DTensor's storage is its local shard's;
3. the memory fields at the real depth from the three curves (`extrapolate.memory_at_depth`),
   every other field from the three rows (`extrapolate.fields_at_depth`), and the real
   step's allocation trace written out op for op (`synthesis.synthesize`), which must reach
   the extrapolated peak; the caller replays the allocator over that trace as over a real one.

Units are one checkpointing period (one block without checkpointing), and the first unit a
pass runs may differ from the middle ones (`extrapolate.memory_at_depth` with ``edges``), as the
last one may: FSDP2's backward of block j starts with its pre-backward hook (the block's
unshard, a no-op when prefetched, and the prefetch of block j − 1's all-gather), so the top
block, which nothing prefetched, all-gathers its own parameters and the bottom one prefetches
nothing. That hook is registered on the block's output by FSDP2's ``_post_forward`` and tensor
hooks run in the order registered, so the shortcut's backward mark of block j is registered
before it (`depth.BlockMarks`' ``backward_first``): the hook's work then counts for block j.
Marked after it, block j + 1's stretch held the prefetch of block j − 1, two blocks down, and
FSDP2's units had to be two blocks (from 4, 6 and 8 blocks, and 8, 12 and 16 with
checkpointing every 2: more than Llama-2-7b's 32, so those ran at full depth). A peak inside a
middle unit of such a pass takes its breakdown from the middle units alone (`extrapolate`), and
the synthesized trace must hold that breakdown where it first reaches the peak. DDP's
gradient buckets, allocated by the C++ ``Reducer`` and alive from the start, each belong to
the block of their first parameter (`bucket_storages`; Llama-2-7b: a block's last bucket
holds its input norm's gradient and the down projection's of the block below), and their layout at
the real depth is checked against torch's own bucket assignment before any shallow step is
tracked (`check_buckets`; a small model whose buckets hold several blocks is refused there).
The reducer's copies from the buckets back into the gradients after backward are ops outside
the blocks' passes that the synthesis gives to the block of their first argument. Blocks with
buffers (VeLoRA's vectors): DDP copies every buffer into one flat tensor at each forward, whose
bytes grow with depth; its pieces are labelled by block (`record.RecordingTracker`'s
``pieces``), the bucket layout at the real depth checked (`check_broadcast`), the synthesis
told it may grow, and the memory curves stand its rounded size in by a line (`grown_logs`).
Anything not
exactly periodic is refused with the reason, and the real depth runs: the row's
``estimate_method`` says which. ``--cpu-offload`` runs at full depth.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from velora_cli.parallel import FSDP
from velora_cli.shortcut.extrapolate import (
    MEMORY_FIELDS,
    NotExtrapolable,
    PositionLog,
    fields_at_depth,
    memory_at_depth,
    memory_of_log,
)
from velora_cli.shortcut.synthesis import synthesize

# The optimizers whose DDP ranks the shortcut gave rows equal to the real depth's (a 12-block
# llama, tests/test_rank_shortcut.py; fused AdamW also Llama-2-7b). galore, adarankgrad and
# adafactor were off by their replaced state (a refresh's old bases, 72 MiB on that llama;
# adafactor's 53 KiB) until the recording tracker stopped keeping a fake rank's storages alive
# (`record.RecordingTracker.__enter__`). adamw_torch_forloop is refused by the synthesis; the
# bitsandbytes 8-bit ones do not run on fake tensors.
DDP_CHECKED_OPTIMIZERS = (
    "adamw", "adamw_torch", "adamw_torch_fused", "sgd", "paged_adamw_32bit",
    "galore", "adarankgrad", "adafactor",
)  # fmt: skip

if TYPE_CHECKING:
    from velora_cli.measure.train_step import StepSpec
    from velora_cli.parallel.roles import DdpBuckets
    from velora_cli.shortcut.shortcuts import Shortcuts


class RankShortcuts:
    """A rank's step through the depth shortcut, where exact (module docstring).

    Args:
        single: the single-process estimate's `Shortcuts` (its model resolution, shallow
            models and block checks, shared with the one-process candidates of a tune).
    """

    def __init__(self, single: Shortcuts) -> None:
        self.single = single
        self.extrapolated = 0  # rank steps given by the shortcut
        self.full = 0  # rank steps run at the real depth
        # warmed ranks shared by candidates differing in micro-batch size (`fake.WarmRanks`);
        # None: every rank built afresh (set by `ParallelEstimateBackend.keep_warm`)
        self.warm = None

    def rank_step(self, spec: StepSpec, rank: int, *, warmup: int, breakdown: bool):
        """``((row, trace, prepared) or None, estimate_method)``: the rank's tracked-step row
        (`rank_step.tracked_rank_step`'s fields) and synthesized trace, or None and the reason
        to run the real depth."""
        from velora_cli.measure.cpu import _is_user_error
        from velora_cli.measure.train_step import SpecError

        try:
            out = self._extrapolated(spec, rank, warmup, breakdown)
        except NotExtrapolable as exc:
            self.full += 1
            return None, f"full depth ({exc})"
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            if isinstance(exc, SpecError) or _is_user_error(exc):
                raise  # the reference path raises it too: the request is wrong
            # a shallow rank the shortcut could not record: the real depth answers
            self.full += 1
            return None, f"full depth (the shortcut failed: {type(exc).__name__})"
        self.extrapolated += 1
        return out, out[3]

    def _extrapolated(self, spec: StepSpec, rank: int, warmup: int, breakdown: bool):
        from velora_cli.parallel.fake import run_rank
        from velora_cli.shortcut.depth import breakdown_at

        if spec.parallel == "ddp" and spec.optimizer not in DDP_CHECKED_OPTIMIZERS:
            raise NotExtrapolable(f"DDP with --optimizer {spec.optimizer}: not checked exact")
        if spec.cpu_offload:  # the row splits device and host storages of the real trace
            raise NotExtrapolable("--cpu-offload: the host share is counted at full depth")
        # the model before sharding is the one-process model: the plan's checks are shared
        single = dataclasses.replace(spec, world_size=1, parallel=None, cpu_offload=False)
        model_spec = self.single.resolve(single)
        depth, period, depths, shallow = self.single.depth_plan(single, model_spec)
        if sum(depths) >= depth:  # each shallow rank is built, sharded and warmed up
            raise NotExtrapolable(f"{depth} blocks: the shallow ranks would step as many")
        rows, logs, records, flats = [], [], [], []
        prepared = None
        for d, shallow_spec in zip(depths, shallow, strict=True):
            row, log, record, prepared, flat = run_rank(
                spec,
                rank,
                _logged(breakdown, d, period, depth, backward_first=spec.parallel in FSDP),
                warmup=warmup,
                model_spec=shallow_spec,
                warm=self.warm,
            )
            rows.append(row)
            logs.append(log)
            records.append(record)
            flats.append(flat)
        out = fields_at_depth(rows, depths, depth, skip=MEMORY_FIELDS)
        grows = any(flats)
        if grows:  # DDP's flat copy of the module buffers, at every forward
            logs = grown_logs(logs, records, flats, depth, period)
        out.update(memory_at_depth(logs, depth, period, edges=True))
        try:
            trace, _, _ = synthesize(
                records, depth, period, trace=True, grows=[set(f) for f in flats] if grows else None
            )
        except (TypeError, IndexError, KeyError) as exc:
            raise NotExtrapolable(
                f"the synthesis cannot place this step's events ({type(exc).__name__})"
            ) from None
        lives = trace.live_bytes()
        if max(lives) != out["peak_bytes"]:
            raise NotExtrapolable("the synthesized trace does not reach the extrapolated peak")
        peak = out["peak_breakdown"]  # the trace's where it first reaches the peak
        if breakdown_at(trace, lives.index(max(lives)), tuple(peak)) != peak:
            raise NotExtrapolable("the synthesized trace's breakdown at the peak differs")
        for name, key in (("forward_backward", "fwd_bwd_peak_bytes"),
                          ("optimizer", "optimizer_peak_bytes")):  # fmt: skip
            spans = [lives[a : b + 1] for phase, a, b in trace.phases if phase == name]
            if max((max(v) for v in spans), default=None) != out[key]:
                raise NotExtrapolable(f"the synthesized trace does not give the {key}")
        out = {key: out[key] for key in rows[0] if key in out}  # the real run's field order
        method = f"extrapolated from {', '.join(map(str, depths))} blocks"
        return out, trace, prepared, method


def _logged(
    breakdown: bool, depth: int, period: int, real_depth: int, *, backward_first: bool = False
):
    """The body `run_rank` runs at a shallow ``depth``: the rank's tracked step, recorded
    (``backward_first``: an FSDP2 rank's, `depth.BlockMarks`)."""
    from velora_cli.parallel.rank_step import rank_tracker_options, tracked_rank_step
    from velora_cli.shortcut.depth import (
        BlockMarks,
        block_signature,
        breakdown_at,
        decoder_stack,
        periodic,
    )
    from velora_cli.shortcut.record import RecordingTracker, StepRecord, block_storages

    def body(prepared, roles) -> tuple:
        stack = decoder_stack(prepared.model, depth)
        if stack is None:
            raise NotExtrapolable("no stack of identical blocks found in the model")
        if not periodic([block_signature(b) for b in stack], period):
            raise NotExtrapolable(f"with this strategy the blocks do not repeat every {period}")
        owned = block_storages(stack, prepared.optimizer)
        pieces = False
        if roles.buckets is not None:  # DDP: after the warm-up's rebuild
            if broadcasts_block_buffers(prepared.model, stack):
                check_broadcast(prepared.model, stack, real_depth)
                pieces = True
            check_buckets(prepared.model, roles.buckets, stack, period, real_depth)
            owned.update(bucket_storages(roles.buckets, stack))
        tracker = RecordingTracker(
            prepared.model,
            prepared.optimizer,
            op_cache=None,
            owned=owned,
            pieces=pieces,
            **rank_tracker_options(roles),
        )
        del owned  # the tracker's alone (`block_storages`)
        marks = BlockMarks(
            stack, tracker, prepared.optimizer, first=True, backward_first=backward_first
        )
        with marks:
            row, trace = tracked_rank_step(prepared, roles, breakdown=breakdown, tracker=tracker)
        categories = tracker.categories
        log = PositionLog(
            depth, tracker.log, lambda events: breakdown_at(trace, events, categories)
        )
        rebuilt = memory_of_log(log)
        if any(rebuilt[k] != row.get(k) for k in MEMORY_FIELDS):
            raise NotExtrapolable("the tracker's log does not rebuild its peaks")
        flats = sorted(tracker.pieces) if tracker.pieces else []  # storage ids, in order
        return row, log, StepRecord.of(depth, tracker, None), prepared, flats

    return body


# -- DDP's broadcast of the module buffers --------------------------------------------------------


def broadcasts_block_buffers(ddp, stack) -> bool:
    """Whether DDP copies the blocks' buffers into one flat tensor at every forward (VeLoRA's
    vectors are block buffers): ``broadcast_buffers`` (the default) and any buffer in a block."""
    return bool(ddp.broadcast_buffers) and any(True for b in stack for _ in b.buffers())


def check_broadcast(ddp, stack, depth: int) -> None:
    """Check, without a step, that DDP's buffer broadcast at the real ``depth`` makes the same
    flat tensors as at this shallow rank's, each as long as its buffers.

    At each forward DDP broadcasts ``modules_buffers`` from rank 0 (torch 2.13
    ``_sync_buffers`` -> ``_default_broadcast_coalesced`` -> ``dist._broadcast_coalesced`` with
    ``broadcast_bucket_size``, 250 MiB): the C++ ``broadcast_coalesced`` (``comm.cpp``) groups
    the buffers with ``compute_bucket_assignment_by_size`` (by dtype and device, a bucket
    closed once it reaches the limit) and concatenates each bucket into one flat tensor
    (``flatten_dense_tensors``), then copies the broadcast values back through views of it. So
    each bucket is one allocation whose size is the sum of its buffers, affine in depth as long
    as the buckets at the real depth are the shallow rank's, grown: here every dtype's buffers
    in one bucket at the real depth (hence at every smaller one), the blocks' buffers in block
    order between the same buffers outside the stack.

    Raises:
        NotExtrapolable: with the reason.
    """
    import torch
    import torch.distributed as dist

    buffers = list(ddp.modules_buffers)
    block_of = {id(b): j for j, blk in enumerate(stack) for b in blk.buffers()}
    spots = [block_of.get(id(b)) for b in buffers]
    inside = [k for k, j in enumerate(spots) if j is not None]
    per_block = len(inside) // len(stack)
    if (
        not inside
        or inside != list(range(inside[0], inside[-1] + 1))
        or len(inside) % len(stack)
        or spots[inside[0] : inside[-1] + 1]
        != [j for j in range(len(stack)) for _ in range(per_block)]
    ):
        raise NotExtrapolable("DDP's buffer broadcast: the blocks' buffers are not in block order")
    head, tail = buffers[: inside[0]], buffers[inside[-1] + 1 :]
    block = buffers[inside[0] : inside[0] + per_block]
    deep = head + block * depth + tail
    like = [torch.empty(b.shape, dtype=b.dtype, device="meta") for b in deep]
    n = len(like)
    buckets = dist._compute_bucket_assignment_by_size(
        like, [ddp.broadcast_bucket_size], [False] * n, list(range(n))
    )[0]
    kinds = {(b.dtype, b.device.type) for b in deep}
    if len(buckets) != len(kinds):
        raise NotExtrapolable(
            f"DDP's buffer broadcast at {depth} blocks splits a dtype's buffers over buckets"
        )


def grown_logs(logs: list, records: list, flats: list[list[int]], depth: int, period: int):
    """The shallow logs with DDP's flat buffer copies counted so that their memory is exactly
    affine in depth and reaches, at ``depth``, the copy's true size there.

    A flat copy's bytes are affine in depth (`check_broadcast`), its rounded bytes (what the
    tracker's curve counts) not: 4,288 bytes at 2 blocks rounds to 4,608, not a line. Wherever
    a copy is live in a shallow log, its rounded bytes there are replaced by the value at that
    depth of a line through its rounded bytes at the real depth (any slope: the memory at a
    point is then exactly affine if the rest of the point is, and `memory_at_depth` checks
    that). The synthesis writes the copy out at its true size, and the caller checks the
    synthesized trace against these peaks.

    Raises:
        NotExtrapolable: the copies differ in number between depths, or their bytes are not
            exactly affine in depth.
    """
    from velora_cli.shortcut.extrapolate import PositionLog

    if len({len(f) for f in flats}) != 1:
        raise NotExtrapolable("DDP's buffer broadcast makes a different number of copies")
    ms = [log.depth // period for log in logs]
    big_m = depth // period
    spans = []  # per log: (first event, last event, sid, raw bytes) per copy
    for record, ids in zip(records, flats, strict=True):
        events = record.trace.events
        made = {sid: k for k, (_, sid, n) in enumerate(events) if n > 0 and sid in ids}
        gone = {sid: k for k, (_, sid, n) in enumerate(events) if n < 0 and sid in ids}
        spans.append([(made[s], gone.get(s, len(events)), events[made[s]][2]) for s in ids])
    adjusted = [[] for _ in logs]
    trace0 = records[0].trace
    for c in range(len(flats[0])):
        sizes = [spans[k][c][2] for k in range(len(logs))]
        rise, run = sizes[1] - sizes[0], ms[1] - ms[0]
        if (sizes[2] - sizes[1]) * run != rise * (ms[2] - ms[1]) or rise % run:
            raise NotExtrapolable("DDP's buffer copy is not affine in depth")
        slope = rise // run
        at_depth = trace0.rounded(sizes[0] + slope * (big_m - ms[0]))
        for k in range(len(logs)):
            first, last, raw = spans[k][c]
            stand_in = at_depth - slope * (big_m - ms[k])
            adjusted[k].append((first, last, stand_in - records[k].trace.rounded(raw),
                                records[k].trace.categories[flats[k][c]]))  # fmt: skip
    out = []
    for log, shifts in zip(logs, adjusted, strict=True):

        def shift_at(events: int, shifts=shifts) -> list[tuple[str, int]]:
            # after the copy's allocation (event ``first``) and before its free
            return [(cat, d) for first, last, d, cat in shifts if first < events <= last]

        points = [
            (label, phases, live + sum(d for _, d in shift_at(events)), events)
            for label, phases, live, events in log.points
        ]

        def breakdown(events: int, log=log, shift_at=shift_at) -> dict[str, int]:
            parts = dict(log.breakdown_at(events))
            for cat, d in shift_at(events):
                parts[cat] += d
            return parts

        out.append(PositionLog(log.depth, points, breakdown))
    return out


# -- DDP's gradient buckets at the real depth -----------------------------------------------------


def bucket_storages(buckets: DdpBuckets, stack) -> dict[int, tuple[int, Any]]:
    """DDP's gradient buckets as `record.block_storages` gives a block's storages: a bucket
    belongs to the block of its first parameter (one outside the stack, the first bucket's
    head say, is left out: it is outside, the same at every depth, `check_buckets` checks)."""
    block_of = {id(p): j for j, b in enumerate(stack) for p in b.parameters()}
    out: dict[int, tuple[int, Any]] = {}
    for index, buffer in buckets.buffers.items():
        params = buckets.parameters.get(index) or []
        j = block_of.get(id(params[0])) if params else None
        if j is not None:
            storage = buffer.untyped_storage()
            out[id(storage)] = (j, storage)
    return out


def check_buckets(ddp, buckets: DdpBuckets, stack, period: int, depth: int) -> None:
    """Check, without a step, that DDP's gradient buckets at the real ``depth`` repeat as this
    shallow rank's do.

    After its first iteration DDP's ``Reducer`` rebuilds its buckets over the parameters in the
    order their gradients became ready: a first bucket of at most 1 MiB, then 25 MiB each,
    greedily (a bucket closes once it reaches its cap: ``dist._compute_bucket_assignment_by_size``,
    called by ``Reducer::rebuild_buckets`` in torch 2.13's ``reducer.cpp``). Here: the shallow
    rank's ready order (its buckets, in order) must be parameters outside the stack, every
    block's in one order from the top block down, then the rest; torch's assignment over that
    order must give this rank's buckets back; and over the same order written out at
    ``depth``, it must give the same buckets outside the stack, in the top and bottom units and
    in every unit between (a bucket described by its first parameter's unit and its parameters
    relative to that unit). A small model whose buckets each hold several blocks fails here,
    in its first shallow rank, before the other two are spent.

    Raises:
        NotExtrapolable: with the reason.
    """
    import torch
    import torch.distributed as dist

    where = {id(p): (j, name) for j, b in enumerate(stack) for name, p in b.named_parameters()}
    groups = [buckets.parameters[i] for i in sorted(buckets.parameters)]
    order = [p for group in groups for p in group]
    d = len(stack)
    spots = [where.get(id(p)) for p in order]
    inside = [k for k, s in enumerate(spots) if s is not None]
    if not inside or inside != list(range(inside[0], inside[-1] + 1)) or len(inside) % d:
        raise NotExtrapolable(
            "DDP's gradient buckets: the blocks' gradients are not ready together"
        )
    head, tail = order[: inside[0]], order[inside[-1] + 1 :]
    per_block = len(inside) // d
    template = [name for _, name in spots[inside[0] : inside[0] + per_block]]
    if spots[inside[0] : inside[-1] + 1] != [
        (j, name) for j in reversed(range(d)) for name in template
    ]:
        raise NotExtrapolable("DDP's gradient buckets: the blocks' gradients are not ready alike")
    limits = [dist._DEFAULT_FIRST_BUCKET_BYTES, ddp.bucket_bytes_cap]

    def assign(params: list) -> list[list[int]]:
        like = [torch.empty(p.shape, dtype=p.dtype, device="meta") for p in params]
        n = len(like)
        return dist._compute_bucket_assignment_by_size(like, limits, [False] * n, list(range(n)))[0]

    def places(blocks: int) -> list:
        return (
            [("out", k) for k in range(len(head))]
            + [(j, name) for j in reversed(range(blocks)) for name in template]
            + [("out", len(head) + k) for k in range(len(tail))]
        )

    seen, start = [], 0
    for group in groups:
        seen.append(list(range(start, start + len(group))))
        start += len(group)
    if assign(order) != seen:
        raise NotExtrapolable("DDP's gradient buckets are not the ones torch's assignment gives")
    block_params = order[inside[0] : inside[0] + per_block]  # the top block's, in ready order
    here = _by_unit(seen, places(d), d, period)
    there = _by_unit(assign(head + block_params * depth + tail), places(depth), depth, period)
    if any(here[k] != there[k] for k in ("head", "top", "bottom", "tail")) or (
        here["middle"] is not None and here["middle"] != there["middle"]
    ):
        raise NotExtrapolable(f"DDP's gradient buckets at {depth} blocks differ from {d}'s")


def _by_unit(assignment: list[list[int]], places: list, depth: int, period: int) -> dict:
    """Buckets by unit (`check_buckets`): ``head`` and ``tail`` (first parameter outside the
    stack, before and after it), ``top`` and ``bottom`` (the first and last unit of the
    backward), ``middle`` (every unit between, all alike; None at two units)."""
    m = depth // period
    owned: list[tuple[int | None, tuple]] = []
    for bucket in assignment:
        first = places[bucket[0]][0]
        unit = None if first == "out" else first // period
        items = []
        for k in bucket:
            j, name = places[k]
            if j == "out":
                items.append(("out", name))
            elif unit is None:  # the final norm's bucket, holding the top block's last layer
                items.append(("from_top", depth - 1 - j, name))
            else:
                items.append(("rel", j - unit * period, name))
        owned.append((unit, tuple(items)))
    units = [u for u, _ in owned if u is not None]
    if not units:
        raise NotExtrapolable("DDP's gradient buckets: none starts inside the stack")
    lo = next(k for k, (u, _) in enumerate(owned) if u is not None)
    hi = max(k for k, (u, _) in enumerate(owned) if u is not None)
    if any(u is None for u, _ in owned[lo : hi + 1]) or units != sorted(units, reverse=True):
        raise NotExtrapolable("DDP's gradient buckets do not follow the blocks down")
    by_unit = [tuple(b for u, b in owned if u == unit) for unit in reversed(range(m))]
    middles = set(by_unit[1:-1])
    if len(middles) > 1:
        raise NotExtrapolable(f"DDP's gradient buckets do not repeat by unit at {depth} blocks")
    return {
        "head": tuple(b for _, b in owned[:lo]),
        "tail": tuple(b for _, b in owned[hi + 1 :]),
        "top": by_unit[0],
        "bottom": by_unit[-1],
        "middle": middles.pop() if middles else None,
    }
