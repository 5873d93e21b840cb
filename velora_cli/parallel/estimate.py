"""The per-rank estimate: the real DDP/FSDP2 code path, one rank at a time, in this process.

Each rank is rank r of a fake process group of size N, on fake CPU tensors (`fake`): the model
is built on meta with the row's strategy (VeLoRA, checkpointing), moved to fake tensors, wrapped
by DDP or ``fully_shard`` exactly as a real rank does (`shard`), warmed up and tracked
(`rank_step`). Nothing is allocated; the tracker rounds every storage to 512 bytes as the CUDA
caching allocator does, so the row predicts each rank's ``max_memory_allocated``.

Which ranks: DDP ranks are identical (rank 0 is estimated), and the same at every world size: a
rank's allocations do not depend on N (torch 2.13: the Reducer's buckets are assigned by
parameter sizes alone, ``dist._compute_bucket_assignment_by_size``; the all-reduce and the
division by N are in place in the buckets; the fake group's collectives allocate nothing; the
batch is per rank). So a process that estimates a DDP rank at several world sizes (a GPU-count
tune, one round per N) steps it once and reuses the row (`DdpRows`; its ``estimate_method``
says so); tests/test_rank_shortcut.py checks the rows of N = 2, 4, 8 equal on the reference path.
FSDP2 pads every rank's shard of a parameter to ``ceil(dim0 / N)`` rows (the sharded storage,
gradient and all-gather buffers are the same size on every rank); only the optimizer state,
created like the unpadded local shard, is smaller on the last ranks when ``dim0`` is not a
multiple of N. Rank 0 holds the largest
shard of every parameter, hence the largest peak; ranks 0 and N−1 are estimated (the extremes),
or every rank with ``ranks="all"``.

Where every parameter's dim0 is a multiple of N, rank N−1 holds exactly what rank 0 holds, and
the fast path steps rank 0 alone and gives rank N−1 its figures (`uniform_shards`; the job row's
``estimated_ranks`` is ``[0]`` and its ``ranks_note`` says why). What differs between FSDP2
ranks, from torch 2.13's ``torch/distributed/fsdp/_fully_shard/``: ``FSDPParam._init_sharded_param``
splits each parameter with ``_chunk_with_empty`` (``torch.chunk`` along dim 0, the only sharded
dim without a placement function: ``Shard(0)``), chunks of ``ceil(dim0 / N)`` rows, the last
ones shorter and, when ``dim0`` is small, empty (``torch.chunk`` of 10 rows in 8 gives 5 chunks
of 2; ranks 5-7 get none); rank r's local tensor (hence its optimizer state and
``reset_sharded_param``'s re-padding at lazy init) is chunk r, everything else is sized by
chunk 0 (``padded_sharded_param_size``: the sharded storage, all-gather inputs and outputs,
the reduce-scatter output of which the gradient is a view). The rank number itself only offsets
views (``all_gather_copy_in``'s ``narrow``, the post-forward shard's). Buffers are not sharded,
the batch and the loss are the same on every rank (nothing in velora reads the rank but
VeLoRA's in-place broadcast of its vectors from rank 0), and the fake group's collectives
allocate nothing. So with every dim0 a multiple of N every chunk is ``dim0 / N`` rows and every
rank makes the same allocations in the same order. Anything else (a dim0 that is not, a
parameter of a tensor subclass, a 0-d one, QLoRA's packed weights) steps both ranks, and so
does the reference path (``VELORA_ESTIMATE_REFERENCE=1``), against which the fast path is tested
(tests/test_fsdp_uniform_shards.py).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from velora_cli import gcpause
from velora_cli.estimate.backend import REFERENCE_ENV
from velora_cli.measure import failed_row
from velora_cli.measure.tracker import AllocationTrace
from velora_cli.measure.train_step import SpecError, StepSpec


def estimated_ranks(spec: StepSpec, ranks: str | tuple[int, ...] | None = None) -> list[int]:
    """The ranks the estimate runs: the given ones, ``"all"``, or the default (module docstring)."""
    world = spec.world_size
    if ranks == "all":
        return list(range(world))
    if ranks is not None:
        bad = [r for r in ranks if not 0 <= r < world]
        if bad:
            raise SpecError(f"ranks {bad} outside world size {world}")
        return sorted(set(ranks))
    if spec.parallel == "ddp":
        return [0]
    return sorted({0, world - 1})


def estimate_rank(
    spec: StepSpec,
    rank: int,
    *,
    warmup: int = 1,
    breakdown: bool = False,
    device_memory: Callable[[Any, AllocationTrace], dict[str, Any]] | None = None,
    shortcut: Any = None,
):
    """Estimate one rank of ``spec``'s job.

    Args:
        device_memory: ``(prepared, trace) -> row fields`` of what the GPU must hold
            (`EstimateBackend.device_memory_of`: the caching allocator replayed over the rank's
            trace, the CUDA context); with ``--cpu-offload`` it sees only the storages that stay
            on the device.
        shortcut: a `rank_shortcut.RankShortcuts`: the rank's step from three shallow ones
            where that is exact (the row's ``estimate_method`` says); None: the real depth.

    Returns:
        (row, trace): the rank's row (`rank_step.tracked_rank_step`, with ``rank``) and its
        `AllocationTrace` (synthesized by the shortcut), for the allocator model and the
        memory timeline.

    Raises:
        SpecError: the model or strategy cannot be built as asked.
    """
    from velora_cli.parallel.fake import run_rank
    from velora_cli.parallel.rank_step import tracked_rank_step

    done, method = None, "full depth (reference: every rank at its real depth)"
    if shortcut is not None:
        done, method = shortcut.rank_step(spec, rank, warmup=warmup, breakdown=breakdown)
    if done is not None:
        row, trace, prepared, _ = done
    else:
        row, trace, prepared = run_rank(
            spec,
            rank,
            lambda prepared, roles: (
                *tracked_rank_step(prepared, roles, breakdown=breakdown),
                prepared,
            ),
            warmup=warmup,
            warm=getattr(shortcut, "warm", None),
        )
    device_trace = trace
    if spec.cpu_offload:
        from velora_cli.parallel.offload import device_resident, offloaded_row

        row = offloaded_row(row, trace)
        device_trace = device_resident(trace)
    if device_memory is not None:
        row.update(device_memory(prepared, device_trace))
        row["device_memory_notes"] += (
            "; not modelled: NCCL's own communicator buffers (allocated outside PyTorch's caching "
            "allocator)"
        )
    row.update(rank=rank, status="ok", step_seconds=None, estimate_method=method)
    return row, trace


def uniform_shards(spec: StepSpec) -> str | None:
    """Why every rank of ``spec``'s FSDP2 job holds exactly what rank 0 holds (the ranks note's
    words), or None where ranks may differ (module docstring): every parameter of the model
    the rank builds (`train_step.prepare` on meta, as `fake.run_rank` does, strategy and LoRA
    adapters included) a plain ``nn.Parameter`` of at least one dimension whose dim0 is a
    positive multiple of the world size."""
    import torch

    from velora_cli.measure.train_step import prepare
    from velora_cli.parallel import FSDP
    from velora_cli.parallel.fake import register_rank_attention

    world = spec.world_size
    if spec.parallel not in FSDP or world < 2 or spec.mode == "qlora":
        return None
    try:
        prepared = prepare(spec, "meta", attn_implementation=register_rank_attention())
    except Exception:  # noqa: BLE001 - not known: the ranks are stepped, which raise it
        return None
    for p in prepared.model.parameters():
        if type(p) is not torch.nn.Parameter or p.ndim == 0:
            return None
        if p.shape[0] == 0 or p.shape[0] % world:
            return None
    return (
        f"every sharded parameter's dim0 is a multiple of {world}, so FSDP2's torch.chunk "
        "gives every rank a local shard, gradient and optimizer state of the same size"
    )


class DdpRows:
    """A DDP rank's rows, the same at every world size (module docstring), by what they depend on
    (`key`): one object shared by the rounds of a GPU-count tune (`search.world_sizes`), so that
    a candidate's DDP rank is stepped in the first round with ranks and reused in the others.
    The per-rank shortcut's alone: the reference path steps every rank.

    Rows made in another process (the tune's helper, `estimate.pool`) come back as job rows; the
    rank row is read back from them (`learn`), so the helper's work is reused too.
    """

    KEPT = 256  # rows of one tune; a GPU-count tune asks for a few dozen

    def __init__(self) -> None:
        self.rows: dict[tuple, dict[str, Any]] = {}

    @staticmethod
    def key(backend: ParallelEstimateBackend, spec: StepSpec, rank: int, breakdown: bool):
        """What a DDP rank's row depends on, all but the world size (None: not reusable)."""
        from velora_cli.parallel import fake

        if spec.parallel != "ddp" or not backend.shortcuts:
            return None
        key = (
            replace(spec, world_size=2), rank, breakdown, backend.warmup, backend.gpu,
            backend.alloc_conf, backend.expandable, fake.FEWEST_WARMUP,
        )  # fmt: skip
        try:
            hash(key)
        except TypeError:
            return None
        return key

    def get(self, key) -> dict[str, Any] | None:
        row = self.rows.get(key) if key is not None else None
        return None if row is None else copy.deepcopy(row)

    def put(self, key, row: dict[str, Any]) -> None:
        if key is None or row.get("status") != "ok":
            return
        if key not in self.rows and len(self.rows) >= self.KEPT:
            self.rows.pop(next(iter(self.rows)))
        self.rows[key] = copy.deepcopy(row)

    def learn(self, backend: ParallelEstimateBackend, spec: StepSpec, job: dict[str, Any]) -> None:
        """Keep the rank row behind ``job``, a DDP job row of one estimated rank made by
        ``backend``'s twin in another process (`rank_of_job`)."""
        if job.get("estimated_ranks") != [0] or job.get("status") != "ok":
            return
        key = self.key(backend, spec, 0, False)
        if key is not None and key not in self.rows:
            row = rank_of_job(job)
            if row.get("estimate_method", "").endswith(REUSED):
                row["estimate_method"] = row["estimate_method"][: -len(REUSED)]
            self.put(key, row)


REUSED = "; reused: a DDP rank is the same at every world size"
# What `job.job_row` and `ParallelEstimateBackend.measure` add after a rank row's own fields.
_JOB_FIELDS = ("backend", "world_size", "parallel", "cpu_offload", "global_batch_size", "ranks",
               "peak_rank", "estimated_ranks", "tokens_per_second", "ranks_note")  # fmt: skip


def rank_of_job(job: dict[str, Any]) -> dict[str, Any]:
    """The row of the one rank behind a job row (`job.job_row` of a single rank: its fields in
    order, without ``rank``, then the job's; ``rank`` went just before ``status``)."""
    row: dict[str, Any] = {}
    for k, v in job.items():
        if k in _JOB_FIELDS:
            continue
        if k == "status":
            row["rank"] = job["peak_rank"]
        row[k] = copy.deepcopy(v)
    return row


@dataclass
class ParallelEstimateBackend:
    """Predicted per-rank memory of a DDP/FSDP2 step (rows: `job.job_row`); no timing.

    Each rank's row has the tracker's allocated figures and, from its allocation trace, what the
    GPU must hold (`EstimateBackend.device_memory_of`: reserved, fragmentation, device level), so
    one-process and multi-rank candidates are compared with a budget alike.

    Args:
        warmup: warm-up steps before the tracked one (DDP always takes at least 2).
        gpu: what the estimate predicts for (`velora_cli.gpus` key); None: the default.
        ranks: None (ranks 0 and N−1 under FSDP, 0 under DDP), ``"all"``, or a tuple.
    """

    warmup: int = 1
    gpu: str | None = None
    ranks: str | tuple[int, ...] | None = None
    name: str = "estimate"
    alloc_conf: str | None = None  # the allocator model's settings (EstimateBackend's)
    expandable: bool = True  # also replay with expandable_segments:True
    # the depth shortcut per rank (`rank_shortcut`); False (or VELORA_ESTIMATE_REFERENCE=1):
    # every rank at its real depth, the reference path
    shortcuts: bool = field(default_factory=lambda: os.environ.get(REFERENCE_ENV, "") != "1")
    # DDP rank rows reused at other world sizes; a GPU-count tune hands every round one object
    ddp_rows: DdpRows = field(default_factory=lambda: DdpRows())

    def __post_init__(self) -> None:
        from velora_cli.estimate.backend import EstimateBackend

        # the single-process estimate's device-memory model, applied to each rank's trace
        self.device = EstimateBackend(
            gpu=self.gpu, alloc_conf=self.alloc_conf, expandable=self.expandable
        )
        self.gpu, self.alloc_conf = self.device.gpu, self.device.alloc_conf
        self._shortcut = None
        self._keep_warm = False  # `keep_warm`

    def shortcut(self):
        """The `rank_shortcut.RankShortcuts` of this backend (None on the reference path)."""
        if self.shortcuts and self._shortcut is None:
            from velora_cli.parallel.rank_shortcut import RankShortcuts

            self._shortcut = RankShortcuts(self.device.fast_path())
            self._shortcut.warm = self._warm()
        return self._shortcut

    def keep_warm(self) -> None:
        """Keep warmed FSDP2 ranks between estimates (`fake.WarmRanks`: a candidate differing
        only in micro-batch size is stepped on the rank already warmed) until `release`; the
        fast path's alone. The caller must `release` before anything else in the process
        opens a process group or runs a step that looks for one (the tune's estimator does,
        once its estimates are done)."""
        self._keep_warm = True
        if self._shortcut is not None and self._shortcut.warm is None:
            self._shortcut.warm = self._warm()

    def _warm(self):
        """A `fake.WarmRanks` for this backend's shortcut, once `keep_warm` asked for one."""
        from velora_cli.parallel.fake import WarmRanks

        return WarmRanks() if self._keep_warm else None

    def release(self) -> None:
        """Forget the warmed ranks and close their fake process group (`keep_warm`)."""
        shortcut = self._shortcut
        self._keep_warm = False
        if shortcut is not None and shortcut.warm is not None:
            shortcut.warm.release()
            shortcut.warm = None

    def _rank_row(self, spec: StepSpec, rank: int, breakdown: bool) -> dict[str, Any]:
        """`estimate_rank`'s row, or a DDP rank's row already made at another world size."""
        key = DdpRows.key(self, spec, rank, breakdown)
        row = self.ddp_rows.get(key)
        if row is not None:
            row["estimate_method"] += REUSED
            return row
        row, _trace = estimate_rank(
            spec,
            rank,
            warmup=self.warmup,
            breakdown=breakdown,
            device_memory=self.device.device_memory_of,
            shortcut=self.shortcut(),
        )
        self.ddp_rows.put(key, row)
        return row

    def learn(self, spec: StepSpec, job: dict[str, Any]) -> None:
        """A job row of ``spec`` made elsewhere (the tune's helper process): keep its DDP rank
        row for the other world sizes (`DdpRows.learn`)."""
        if spec.parallel == "ddp":
            self.ddp_rows.learn(self, spec, job)

    def measure(self, spec: StepSpec, *, breakdown: bool = False) -> dict[str, Any]:
        from velora_cli.emulation.attention import padded_batches, target_gpu
        from velora_cli.measure.cpu import _is_user_error
        from velora_cli.parallel.job import job_row

        @contextlib.contextmanager
        def as_the_rank():
            # attention kernels as torch picks them on this GPU, masks as the batches pad
            with (
                gcpause.paused(),  # as an estimate row: collections walked the whole heap
                target_gpu(self.gpu),
                padded_batches(spec.padding, spec.real_tokens(), spec.packed_sequences),
            ):
                yield

        def step(rank: int) -> dict[str, Any]:
            try:
                with as_the_rank():
                    return self._rank_row(spec, rank, breakdown)
            except (SpecError, ValueError, RuntimeError, NotImplementedError) as exc:
                if isinstance(exc, SpecError) or _is_user_error(exc):
                    raise
                return {**failed_row(self.name, exc), "rank": rank}

        ranks = estimated_ranks(spec, self.ranks)
        last = spec.world_size - 1
        same = None  # why rank N − 1 holds what rank 0 holds (module docstring)
        if self.shortcuts and self.ranks is None and spec.parallel != "ddp" and ranks == [0, last]:
            with as_the_rank():
                same = uniform_shards(spec)
        rows = [step(rank) for rank in ([0] if same else ranks)]
        if same and rows[0].get("status") == "ok":
            rows.append({**copy.deepcopy(rows[0]), "rank": last})  # rank 0's figures
            ranks = [0]
        elif same:  # a failed rank 0: rank N − 1's own failure too, as the reference path
            rows.append(step(last))
            same = None
        row = job_row(spec, rows, backend=self.name)
        row.update(estimated_ranks=ranks, step_seconds=None, tokens_per_second=None)
        if same and row["status"] == "ok":
            row["ranks_note"] = (
                f"rank 0 of {spec.world_size} estimated; rank {last} given rank 0's figures: "
                + same
            )
        elif len(ranks) < spec.world_size and row["status"] == "ok":
            row["ranks_note"] = (
                f"ranks {', '.join(map(str, ranks))} of {spec.world_size} estimated: "
                + (
                    "DDP ranks are identical"
                    if spec.parallel == "ddp"
                    else "FSDP2 pads every shard to rank 0's size; only the optimizer state of "
                    "the last ranks can be smaller"
                )
            )
        return row
