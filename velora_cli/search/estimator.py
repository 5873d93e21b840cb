"""The tune's ``estimate(c)`` and ``measure(c)``: backends turned into the tuner's `Measurement`s.

estimate(c)  the estimate backend (meta tensors), cached per candidate; with --backend estimate
             or cuda its peak is the predicted device memory (allocator-reserved + CUDA
             context, allocator/device_memory.py), as the budget is the GPU's whole memory
measure(c)   the chosen backend: cuda (budget against the device-level peak), cpu, or the
             cached estimate itself with ``--backend estimate`` (then nothing is a real run,
             and the recommendation says so)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from velora_cli.search.candidates import Candidate, Measurement
from velora_cli.search.settings import TuneSettings, candidate_spec

if TYPE_CHECKING:
    from velora_cli.estimate.pool import Helped

PREDICTED_DEVICE_SOURCE = (
    "predicted_device_bytes (estimate: the caching allocator's predicted reserved memory + CUDA "
    "context, not allocated bytes)"
)


def measurement_of(
    row: dict[str, Any], spec, use_device_peak: bool, *, predicted_device: bool = False
) -> Measurement:
    """A backend row as the tuner's Measurement; the row's other fields travel in detail.

    An estimate row has no measured time: its step time and tokens/s are the roofline's
    prediction (``predicted_*``, marked by ``step_seconds_source``), so the tuner ranks
    estimates by predicted tokens/s. A measured row keeps its measured time.

    Args:
        use_device_peak: a cuda row's peak is its device-level (NVML) memory.
        predicted_device: an estimate row's peak is its predicted device memory.
    """
    from velora_cli.profiling.profiler import strategy_fields

    status = row.get("status", "error")
    peak = row.get("peak_bytes")
    seconds, tokens = row.get("step_seconds"), row.get("tokens_per_second")
    if seconds is None and row.get("predicted_step_seconds") is not None:
        seconds, tokens = row["predicted_step_seconds"], row["predicted_tokens_per_second"]
    detail = {**strategy_fields(spec.strategy), **row}
    if use_device_peak and row.get("process_used_bytes") is not None:
        # cuda: the budget is the device's memory, so the device-level peak of the worker alone
        # (its CUDA context + reserved), not the whole device's (another process's context)
        peak = row["process_used_bytes"]
        detail["allocator_peak_bytes"] = row.get("peak_bytes")
        detail["peak_source"] = (
            "process_used_bytes (NVML, this step's process, CUDA context included)"
        )
    elif use_device_peak and row.get("device_used_bytes") is not None:
        # NVML lists no per-process usage here (a container's PID namespace): the whole device's
        peak = row["device_used_bytes"]
        detail["allocator_peak_bytes"] = row.get("peak_bytes")
        detail["peak_source"] = "device_used_bytes (device-level, CUDA context included)"
    elif predicted_device and row.get("predicted_device_bytes") is not None:
        peak = row["predicted_device_bytes"]
        detail["allocator_peak_bytes"] = row.get("peak_bytes")
        detail["peak_source"] = PREDICTED_DEVICE_SOURCE
    for key in ("peak_bytes", "step_seconds", "tokens_per_second", "status", "backend"):
        detail.pop(key, None)
    detail.pop("timeline", None)  # the profile's picture; a tune keeps hundreds of candidates
    if row.get("wrapped_layers") is not None:
        detail["velora_layers"] = row["wrapped_layers"]  # feeds tuner.cost_rank
    return Measurement(
        peak_bytes=peak if status == "ok" else None,
        step_seconds=seconds,
        tokens_per_second=tokens,
        status=status if status in ("ok", "oom") else "error",
        backend=row.get("backend", ""),
        detail=detail,
    )


class Estimator:
    """``estimate(c)``: the estimate backend on meta tensors, cached per candidate.

    A mode that cannot fit is not stepped through candidate by candidate: params + gradients +
    optimizer state are the same for every candidate of one mode and optimizer, and all alive
    in the optimizer step, so the first estimate of a mode gives a floor under all its peaks.
    When the floor alone exceeds the budget, the mode's candidates get it as their estimate,
    marked ``lower_bound``. So do the leanest ones (full checkpointing at the smallest
    micro-batch, `refinable`) while another mode may still fit: the tuner asks for their real
    estimates (`refine`) only when nothing does, so that its answer can name the smallest
    configuration and its real estimate. When something fits, they cannot change the answer (a
    peak is at least its floor, over the budget): a 7B tune at 10 GB saves their 18 steps on
    meta. When every planned mode's floor is over the budget (a GPU-count tune's rounds with too
    few GPUs), nothing can fit, and the leanest are estimated as the tune reaches them.
    """

    def __init__(self, settings: TuneSettings, ddp_rows=None):
        # ddp_rows: a `parallel.estimate.DdpRows` shared by the rounds of a GPU-count tune
        from velora_cli.estimate.backend import EstimateBackend
        from velora_cli.parallel.backends import with_ranks

        self.settings = settings
        self.base = settings.base_spec()
        # the budget is compared with the default allocator settings: no expandable replay
        # and no memory timeline (`measurement_of` drops it from every candidate)
        single = EstimateBackend(gpu=settings.gpu, alloc_conf=settings.alloc_conf,
                                 expandable=False, timeline=False)  # fmt: skip
        self.backend = with_ranks(single, gpu=settings.gpu, ddp_rows=ddp_rows)
        # rank 0 holds the largest FSDP2 shards, so its peak is the job's (parallel/estimate.py)
        self.backend.ranks.ranks = (0,)
        # FSDP2 ranks warmed once for the candidates differing in micro-batch size, until finish
        self.backend.ranks.keep_warm()
        # the budget is a GPU's memory: compare it with what the device must hold (a cpu tune
        # compares tracked CPU tensors, so its estimates stay allocated bytes too)
        self.device_level = settings.backend in ("estimate", "cuda")
        self.budget = settings.budget_bytes
        self.min_micro = min(settings.micro_batches or (1,))
        self.cache: dict[str, Measurement] = {}
        self.floors: dict[tuple, int] = {}  # (mode, optimizer[, world size, parallel]) -> bytes
        self.calls = 0
        # the helper process (estimate/pool.py): the planned candidates' indices and the list
        self._index: dict[str, int] = {}
        self._floor_keys: set[tuple] | None = None  # the planned candidates' (`floored`)
        self._helped: Helped | None = None

    def __call__(self, c: Candidate) -> Measurement:
        if c.key not in self.cache:
            spec = candidate_spec(self.base, c)
            if self.floored(c):
                from velora_cli.profiling.profiler import strategy_fields

                self.cache[c.key] = Measurement(
                    self.floors[_floor_key(c)], None, None, backend="estimate",
                    detail={**strategy_fields(spec.strategy), "lower_bound": True},
                )  # fmt: skip
                return self.cache[c.key]
            self.calls += 1
            row = self._pooled_row(c)
            self.note_floor(c, row)
            self.cache[c.key] = measurement_of(row, spec, False, predicted_device=self.device_level)
        return self.cache[c.key]

    def floored(self, c: Candidate) -> bool:
        """Whether ``c`` gets its mode's floor instead of an estimate (class docstring): a
        leanest one only while another mode (optimizer, layout) of the planned candidates may
        still fit, by its floor; when none can, the answer will name the smallest configuration,
        so the leanest are estimated in turn, as the tune goes (not after it, one by one)."""
        floor = self.floors.get(_floor_key(c))
        if floor is None or floor <= self.budget:
            return False
        return not self.refinable(c) or self._another_may_fit()

    def _another_may_fit(self) -> bool:
        if self._floor_keys is None:  # no plan: nothing known of the others
            return False
        return any(self.floors.get(k, 0) <= self.budget for k in self._floor_keys)

    def refinable(self, c: Candidate) -> bool:
        """Whether the tuner may ask for the real estimate of ``c``, given its mode's floor:
        the leanest candidates, full checkpointing at the smallest micro-batch (class
        docstring)."""
        return c.gc is True and c.micro_batch_size == self.min_micro

    def refine(self, c: Candidate) -> Measurement:
        """The real estimate of ``c``, past its mode's floor: the tuner asks for it when
        nothing fits, to name the smallest configuration (class docstring)."""
        self.calls += 1
        spec = candidate_spec(self.base, c)
        row = self.row(c)
        self.cache[c.key] = measurement_of(row, spec, False, predicted_device=self.device_level)
        return self.cache[c.key]

    def row(self, c: Candidate) -> dict[str, Any]:
        """The estimate backend's row of ``c`` (also run in the helper process)."""
        return self.backend.measure(candidate_spec(self.base, c))

    def note_floor(self, c: Candidate, row: dict[str, Any]) -> None:
        """Keep the floor of ``c``'s mode from its first ok row (class docstring)."""
        if row.get("status") == "ok":
            static = row["param_bytes"] + row["grad_bytes"] + row["optimizer_bytes"]
            self.floors.setdefault(_floor_key(c), static)

    # -- a second process for dear estimates (estimate/pool.py) ------------------------------

    def plan(self, candidates: list[Candidate]) -> None:
        """The candidates the tune will ask for, in its order: the helper process works the list
        from its end once a first estimate shows it pays."""
        from velora_cli.estimate.pool import Helped

        self._index = {c.key: i for i, c in enumerate(candidates)}
        self._floor_keys = {_floor_key(c) for c in candidates}
        self._helped = Helped(self, candidates, spawn=(self.settings, type(self)))

    def finish(self) -> None:
        """Stop the helper process, if one runs, and release the warmed ranks (the tune asks for
        no more estimates; a later one builds its ranks afresh)."""
        self.backend.ranks.release()
        if self._helped is not None:
            self._helped.close()

    @property
    def helped(self) -> int:
        """Estimates the helper process made."""
        return 0 if self._helped is None else self._helped.helped

    @property
    def _pool(self):
        return None if self._helped is None else self._helped.pool

    @property
    def _forked(self) -> bool:
        return self._helped is not None and self._helped.forked

    def _pooled_row(self, c: Candidate) -> dict[str, Any]:
        index = self._index.get(c.key)
        if index is None or self._helped is None:
            return self.row(c)
        row = self._helped.row(index)
        learn = getattr(self.backend.ranks, "learn", None)
        if c.parallel is not None and learn is not None:
            learn(candidate_spec(self.base, c), row)  # a DDP rank the helper stepped: every round
        return row


def _floor_key(c: Candidate) -> tuple:
    """Candidates sharing params + grads + optimizer state per rank: one mode, optimizer and
    (for a parallel layout) world size and strategy."""
    if c.parallel is None:
        return (c.mode, c.optimizer)
    return (c.mode, c.optimizer, c.world_size, c.parallel)


class Measurer:
    """``measure(c)``: one training step on the chosen backend (also the verification run)."""

    def __init__(self, settings: TuneSettings, estimator: Estimator, backend=None):
        from velora_cli.profiling.profiler import make_backend

        self.settings, self.estimator = settings, estimator
        self.base = settings.base_spec()
        if backend is None and settings.backend != "estimate":
            # cpu: 1 warm-up (optimizer state), the tracked step, 1 timed step; a real llama-60m
            # step takes ~20 s on 2 cores, and the verification run re-measures the choice anyway
            steps = 1 if settings.backend == "cpu" else None
            backend = make_backend(settings.backend, self.base, steps=steps)
        self.backend = backend
        self.calls = 0

    def __call__(self, c: Candidate) -> Measurement:
        self.calls += 1
        if self.backend is None:  # --backend estimate: the "measurement" is the estimate
            return self.estimator(c)
        spec = candidate_spec(self.base, c)
        return measurement_of(self.backend.measure(spec), spec, self.settings.backend == "cuda")
