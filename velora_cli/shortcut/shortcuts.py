"""The estimate's fast path: reused meta models (`meta_cache`), meta-kernel results kept by
input metadata (`meta_ops`) and depth extrapolation (`extrapolate`), with the real-depth run
wherever the extrapolation is not exact.

For one row:
1. The depth plan: a stack of D blocks with checkpointing every n (n = 1 without it or with
   every block) is run at 2n, 3n and 4n blocks when D is a multiple of n, deeper than 4n, and
   the three shallow runs cost less than the real one (`shallow_runs_pay`, counted on the real
   model: `depth.step_units`). Otherwise: the real depth.
2. The blocks must repeat: the real model's blocks all have one signature
   (`depth.block_signature`: structure, parameters, buffers), the shallow models' blocks and
   everything outside the stack look like the real model's (checked once per setup on the real
   model built on meta, which takes no step); in each shallow run, with the row's strategy
   applied, block j looks like block j mod n (placement presets wrap by role, checkpointing
   every n by index, so identical blocks stay periodic; the check makes sure).
3. Each shallow depth runs ``observe`` (the estimate's one-run body) with a position-logging
   tracker and block marks; the memory fields the tracker reports there must equal those
   rebuilt from its log (a self-check of the log), then `extrapolate.memory_at_depth` gives the
   memory fields and `extrapolate.fields_at_depth` every other field at depth D.
4. Any refusal (a reason) runs the real depth on the reused model instead; the row's
   ``estimate_method`` says which was used, and why not the shortcut.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from velora_cli.measure import timeline
from velora_cli.measure.train_step import LOWRANK_OPTIMIZERS
from velora_cli.shortcut.extrapolate import (
    MEMORY_FIELDS,
    NotExtrapolable,
    PositionLog,
    fields_at_depth,
    memory_at_depth,
    memory_of_log,
)
from velora_cli.shortcut.meta_cache import MetaModels, setup_key
from velora_cli.shortcut.synthesis import synthesize

if TYPE_CHECKING:
    from velora_cli.estimate.backend import EstimateBackend
    from velora_cli.measure.train_step import Prepared, StepSpec
    from velora_cli.models import ModelSpec
    from velora_cli.shortcut.record import RecordingCounter

SHALLOW_UNITS = (2, 3, 4)  # depths run, in units of the checkpointing period


def shallow_runs_pay(depth: int, period: int, fixed: int, per_block: int) -> bool:
    """Whether the shallow runs step less than the real one.

    A meta step costs about the same per dispatched op whatever the shapes (no kernel computes
    anything), and its ops are a fixed part (embeddings, head, loss, the step's own bookkeeping)
    plus a part per block: ``fixed + depth * per_block``, in any unit proportional to ops
    (`depth.step_units` counts modules and parameters, which follow the ops: llama-60m dispatches
    92 + 254 ops per block per step, 7 + 19 units). The shortcut steps the model at
    ``u * period`` blocks for each ``u`` in `SHALLOW_UNITS`, so it pays when

        sum(fixed + u * period * per_block for u in SHALLOW_UNITS) < fixed + depth * per_block

    i.e. 2·fixed + 9·period·per_block < depth·per_block (llama-60m, 8 blocks: no; Llama-2-7b,
    32 blocks: yes up to checkpointing every 2 blocks). The synthesis of the deep trace and the
    row checks are left out of the count (the rule errs towards the shortcut).
    """
    shallow = sum(fixed + u * period * per_block for u in SHALLOW_UNITS)
    return shallow < fixed + depth * per_block


class Shortcuts:
    """Rows of the estimate through reused models and, where exact, depth extrapolation.

    Args:
        observe: the one-run body (`measure.estimate.EstimateBackend.observe`).
        models: where the meta models are built and kept.
    """

    def __init__(self, backend: EstimateBackend, models: MetaModels) -> None:
        from velora_cli.measure.meta_ops import MetaOpCache
        from velora_cli.timing.opcount import OpCosts

        self.backend = backend
        self.models = models
        # meta-kernel results, shared by every tracked run (None: kernels run every time)
        self.op_cache: MetaOpCache | None = MetaOpCache()
        # op costs by op and metadata, shared by every row's op counter (`opcount.OpCosts`)
        self.op_costs = OpCosts()
        self._resolved: dict[tuple[str, bool], ModelSpec] = {}
        self._shallow: dict[tuple[str, int], ModelSpec] = {}
        self._checked: dict[tuple, str | None] = {}
        self._units: dict[tuple, tuple[int, int] | None] = {}
        self.extrapolated = 0  # rows given by the depth shortcut
        self.full = 0  # rows run at the real depth

    def row(
        self, spec: StepSpec, *, breakdown: bool, full_depth: bool = False, why: str = "asked for"
    ) -> dict[str, Any]:
        """The estimate row of ``spec`` (same fields as the reference path, plus
        ``estimate_method``).

        Args:
            full_depth: run the real depth (for fields that need the real step, e.g. a trace).
            why: the reason given in ``estimate_method`` when ``full_depth``.

        Raises:
            SpecError and the user errors `prepare` raises; other failures propagate.
        """
        model_spec = self._resolve(spec)
        why = why if full_depth else None
        if why is None:
            try:
                row = self._extrapolated(spec, model_spec, breakdown)
                self.extrapolated += 1
                return row
            except NotExtrapolable as exc:
                why = str(exc)
        row = self.models.run(spec, model_spec, self._full(breakdown))
        row["estimate_method"] = f"full depth ({why})"
        self.full += 1
        return row

    # -- the depth shortcut ------------------------------------------------------------------

    def depth_plan(self, spec: StepSpec, model_spec: ModelSpec) -> tuple[int, int, list, list]:
        """The depth shortcut's plan for ``spec``: (real depth, period, shallow depths, shallow
        model specs), the real model's blocks checked to repeat (module docstring, 1-2). The
        period is the checkpointing interval, for a DDP/FSDP2 rank too (`parallel.rank_shortcut`).

        Raises:
            NotExtrapolable: with the reason the real depth must run.
        """
        from velora_cli.shortcut.depth import DepthError, stack_depth

        depth = stack_depth(model_spec)
        gc_every = spec.strategy.gc_every or 1
        period = gc_every
        if depth is None:
            raise NotExtrapolable("the config gives no number of blocks")
        if spec.strategy.offload:  # the host ledger is counted, not synthesized from a trace
            raise NotExtrapolable("activation offload: host memory is counted at full depth")
        if depth % gc_every:
            raise NotExtrapolable(f"checkpointing every {gc_every} blocks does not divide {depth}")
        depths = [u * period for u in SHALLOW_UNITS]
        if depth <= depths[-1]:
            raise NotExtrapolable(f"{depth} blocks: shallow enough to run in full")
        units = self._step_units(spec, model_spec, depth)
        if units is not None and not shallow_runs_pay(depth, period, *units):
            raise NotExtrapolable(
                f"{depth} blocks: shallow enough to run in full (the runs at "
                f"{', '.join(map(str, depths))} blocks would step more ops)"
            )
        try:
            shallow = [self._shallow_spec(model_spec, d) for d in depths]
        except DepthError as exc:
            raise NotExtrapolable(str(exc)) from None
        problem = self._check_blocks(spec, model_spec, depth, depths, shallow)
        if problem:
            raise NotExtrapolable(problem)
        return depth, period, depths, shallow

    def _extrapolated(self, spec, model_spec, breakdown: bool) -> dict[str, Any]:
        depth, period, depths, shallow = self.depth_plan(spec, model_spec)
        rows, logs, records = [], [], []
        for d, shallow_spec in zip(depths, shallow, strict=True):
            row, log, record, prepared = self.models.run(
                spec, shallow_spec, self._logged(breakdown, d, period)
            )
            rows.append(row)
            logs.append(log)
            records.append(record)
        out = fields_at_depth(rows, depths, depth, skip=MEMORY_FIELDS)
        out.update(memory_at_depth(logs, depth, period))
        backend = self.backend
        trace, counts, regular = None, None, None
        if backend.trace_fields or backend.step_time:
            try:
                trace, counts, regular = synthesize(
                    records, depth, period, trace=backend.trace_fields
                )
            except (TypeError, IndexError, KeyError) as exc:
                # an event the synthesis cannot place (e.g. Adafactor's factored state, whose
                # shapes differ by block): the reference path answers, exactly, and says why
                raise NotExtrapolable(
                    f"the synthesis cannot place this step's events ({type(exc).__name__})"
                ) from None
        if trace is not None:
            # the synthesized trace must hold the peak the memory curve gives, at the same event
            lives = trace.live_bytes()
            if max(lives) != out["peak_bytes"]:
                raise NotExtrapolable("the synthesized trace does not reach the extrapolated peak")
        out = {key: out[key] for key in rows[0] if key in out}  # the real run's field order
        if trace is not None and backend.timeline:  # the last field of the real run's step
            out["timeline"] = timeline.compact(
                trace, micro_batches=(len(prepared.micro_batches), spec.grad_accum_steps)
            )
        # `finish` reads the spec and the model's config from the deepest shallow run: the
        # config differs from the real one only in its number of blocks, which nothing there
        # reads (kernel scratch takes the attention and embedding shapes)
        out = backend.finish(prepared, out, trace, counts, regular=regular)
        out["estimate_method"] = f"extrapolated from {', '.join(map(str, depths))} blocks"
        return out

    def _full(self, breakdown: bool) -> Callable[[Prepared], dict[str, Any]]:
        from velora_cli.measure.meta_ops import CachedTracker
        from velora_cli.timing.opcount import OpCounter

        def body(prepared: Prepared) -> dict[str, Any]:
            tracker = CachedTracker(
                prepared.model, prepared.optimizer, op_cache=self.op_cache, trace=True
            )
            counter = OpCounter("meta", self.op_costs) if self.backend.step_time else None
            return self.backend.observe(
                prepared, breakdown=breakdown, tracker=tracker, counter=counter
            )[0]

        return body

    def _logged(self, breakdown: bool, depth: int, period: int) -> Callable[[Prepared], tuple]:
        from velora_cli.shortcut.depth import (
            BlockMarks,
            block_signature,
            breakdown_at,
            decoder_stack,
            periodic,
        )
        from velora_cli.shortcut.record import (
            RecordingCounter,
            RecordingTracker,
            StepRecord,
            block_storages,
        )

        backend = self.backend

        def body(prepared: Prepared) -> tuple:
            stack = decoder_stack(prepared.model, depth)
            if stack is None:
                raise NotExtrapolable("no stack of identical blocks found in the model")
            if not periodic([block_signature(b) for b in stack], period):
                raise NotExtrapolable(f"with this strategy the blocks do not repeat every {period}")
            tracker = RecordingTracker(
                prepared.model,
                prepared.optimizer,
                op_cache=self.op_cache,
                owned=block_storages(stack, prepared.optimizer),  # the tracker's alone
            )
            counter = RecordingCounter("meta", self.op_costs) if backend.step_time else None
            with BlockMarks(stack, tracker, prepared.optimizer):
                row, trace, _ = backend.tracked(
                    prepared,
                    breakdown=breakdown,
                    tracker=tracker,
                    counter=counter,
                    with_timeline=False,  # the deep step's comes from its synthesized trace
                )
            regular = None
            if counter is not None and prepared.spec.optimizer in LOWRANK_OPTIMIZERS:
                regular = _counted_step(prepared, stack)  # `prediction_fields` counts it apart
            log = PositionLog(depth, tracker.log, lambda events: breakdown_at(trace, events))
            rebuilt = memory_of_log(log)
            if any(rebuilt[k] != row.get(k) for k in MEMORY_FIELDS):
                raise NotExtrapolable("the tracker's log does not rebuild its peaks")
            return row, log, StepRecord.of(depth, tracker, counter, regular), prepared

        return body

    def _step_units(self, spec, model_spec, depth: int) -> tuple[int, int] | None:
        """`depth.step_units` of the real model (built on meta, no step; the full-depth run
        reuses it), once per setup; None without a stack (the block check then says why)."""
        key = (setup_key(spec), model_spec.name)
        if key not in self._units:
            from velora_cli.measure.train_step import Strategy
            from velora_cli.shortcut.depth import decoder_stack, step_units

            def look(prepared: Prepared):
                stack = decoder_stack(prepared.model, depth)
                return None if stack is None else step_units(prepared.model, stack)

            bare = spec.with_strategy(Strategy())
            self._units[key] = self.models.run(bare, model_spec, look, step=False)
        return self._units[key]

    def _check_blocks(self, spec, model_spec, depth: int, depths, shallow) -> str | None:
        """Why the real model's blocks do not repeat, or the shallow models differ from it
        (None when neither); once per setup and set of shallow depths."""
        key = (setup_key(spec), model_spec.name, tuple(depths))
        if key not in self._checked:
            self._checked[key] = self._blocks_problem(spec, model_spec, depth, depths, shallow)
        return self._checked[key]

    def _blocks_problem(self, spec, model_spec, depth: int, depths, shallow) -> str | None:
        from velora_cli.measure.train_step import Strategy
        from velora_cli.shortcut.depth import (
            block_signature,
            decoder_stack,
            outside_signature,
            periodic,
        )

        bare = spec.with_strategy(Strategy())

        def signatures(d: int):
            def look(prepared: Prepared):
                stack = decoder_stack(prepared.model, d)
                if stack is None:
                    return None
                blocks = [block_signature(b) for b in stack]
                return blocks, outside_signature(prepared.model, stack)

            return look

        real = self.models.run(bare, model_spec, signatures(depth), step=False)
        if real is None:
            return "no stack of identical blocks found in the model"
        blocks, outside = real
        if not periodic(blocks, 1):
            return "its blocks differ (structure or parameters)"
        for d, shallow_spec in zip(depths, shallow, strict=True):
            seen = self.models.run(bare, shallow_spec, signatures(d), step=False)
            if seen is None or seen[0] != blocks[:d] or seen[1] != outside:
                return "the shallow model differs from the real one outside its depth"
        return None

    def resolve(self, spec: StepSpec) -> ModelSpec:
        """``spec.model`` resolved (once per model, task and trust setting)."""
        return self._resolve(spec)

    def _resolve(self, spec: StepSpec) -> ModelSpec:
        from velora_cli.models import resolve_model

        key = (spec.model, spec.trust_remote_code, spec.task)
        if key not in self._resolved:
            self._resolved[key] = resolve_model(
                spec.model, trust_remote_code=spec.trust_remote_code, task=spec.task
            )
        return self._resolved[key]

    def _shallow_spec(self, model_spec: ModelSpec, depth: int) -> ModelSpec:
        from velora_cli.shortcut.depth import shallow_model_spec

        key = (model_spec.name, depth)
        if key not in self._shallow:
            self._shallow[key] = shallow_model_spec(model_spec, depth)
        return self._shallow[key]


def _counted_step(prepared: Prepared, stack) -> RecordingCounter:
    """`step_time.count_step` with its ops labelled by block (a low-rank optimizer's regular
    step, counted apart from the tracked refresh step)."""
    from velora_cli.emulation.step import cuda_emulation
    from velora_cli.measure.train_step import train_step
    from velora_cli.shortcut.depth import BlockMarks
    from velora_cli.shortcut.record import RecordingCounter

    counter = RecordingCounter(prepared.device.type)
    with (
        cuda_emulation(prepared.spec.amp, prepared.spec.torch_version),
        BlockMarks(stack, counter, prepared.optimizer),
        counter,
    ):
        train_step(prepared, phase=counter.phase)
    return counter
