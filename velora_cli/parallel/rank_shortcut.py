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

FSDP2 ranks only: DDP ranks run at full depth (their reducer's work on the gradient buckets
did not repeat by block at 2 to 5 blocks of Llama-2-7b; a small model has one bucket for every
block). FSDP2's backward prefetch looks one block ahead, so the units are two blocks (two
checkpointing periods), and the first unit a pass runs may differ from the middle ones
(`extrapolate.memory_at_depth` with ``edges``). Anything not exactly periodic is refused with
the reason, and the real depth runs: the row's ``estimate_method`` says which.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from velora_cli.measure.train_step import StepSpec
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

        if spec.parallel not in FSDP:
            # Llama-2-7b's DDP buckets repeat by block, but the reducer's work on them does not
            # fall into the same runs at 2-5 blocks (measured: refused), and a small model's one
            # bucket holds every block: the three shallow ranks would be spent for nothing
            raise NotExtrapolable("DDP ranks run at full depth (their buckets' work)")
        if spec.cpu_offload:  # the row splits device and host storages of the real trace
            raise NotExtrapolable("--cpu-offload: the host share is counted at full depth")
        # the model before sharding is the one-process model: the plan's checks are shared
        single = dataclasses.replace(spec, world_size=1, parallel=None, cpu_offload=False)
        model_spec = self.single.resolve(single)
        # FSDP2's backward prefetch looks one block ahead: units of two blocks
        depth, period, depths, shallow = self.single.depth_plan(single, model_spec, unit=2)
        if sum(depths) >= depth:  # each shallow rank is built, sharded and warmed up
            raise NotExtrapolable(f"{depth} blocks: the shallow ranks would step as many")
        rows, logs, records = [], [], []
        prepared = None
        for d, shallow_spec in zip(depths, shallow, strict=True):
            row, log, record, prepared = run_rank(
                spec,
                rank,
                _logged(breakdown, d, period),
                warmup=warmup,
                model_spec=shallow_spec,
            )
            rows.append(row)
            logs.append(log)
            records.append(record)
        out = fields_at_depth(rows, depths, depth, skip=MEMORY_FIELDS)
        out.update(memory_at_depth(logs, depth, period, edges=True))
        try:
            trace, _, _ = synthesize(records, depth, period, trace=True)
        except (TypeError, IndexError, KeyError) as exc:
            raise NotExtrapolable(
                f"the synthesis cannot place this step's events ({type(exc).__name__})"
            ) from None
        lives = trace.live_bytes()
        if max(lives) != out["peak_bytes"]:
            raise NotExtrapolable("the synthesized trace does not reach the extrapolated peak")
        for name, key in (("forward_backward", "fwd_bwd_peak_bytes"),
                          ("optimizer", "optimizer_peak_bytes")):  # fmt: skip
            spans = [lives[a : b + 1] for phase, a, b in trace.phases if phase == name]
            if max((max(v) for v in spans), default=None) != out[key]:
                raise NotExtrapolable(f"the synthesized trace does not give the {key}")
        out = {key: out[key] for key in rows[0] if key in out}  # the real run's field order
        method = f"extrapolated from {', '.join(map(str, depths))} blocks"
        return out, trace, prepared, method


def _logged(breakdown: bool, depth: int, period: int):
    """The body `run_rank` runs at a shallow ``depth``: the rank's tracked step, recorded."""
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
        tracker = RecordingTracker(
            prepared.model,
            prepared.optimizer,
            op_cache=None,
            owned=owned,
            **rank_tracker_options(roles),
        )
        del owned  # the tracker's alone (`block_storages`)
        with BlockMarks(stack, tracker, prepared.optimizer, first=True):
            row, trace = tracked_rank_step(prepared, roles, breakdown=breakdown, tracker=tracker)
        categories = tracker.categories
        log = PositionLog(
            depth, tracker.log, lambda events: breakdown_at(trace, events, categories)
        )
        rebuilt = memory_of_log(log)
        if any(rebuilt[k] != row.get(k) for k in MEMORY_FIELDS):
            raise NotExtrapolable("the tracker's log does not rebuild its peaks")
        return row, log, StepRecord.of(depth, tracker, None), prepared

    return body
