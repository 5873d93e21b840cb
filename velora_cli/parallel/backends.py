"""A backend that measures single-process steps as before and DDP/FSDP2 steps per rank.

`with_ranks` pairs each single-process backend (cuda, cpu, estimate) with its per-rank twin:

    estimate  ->  `estimate.ParallelEstimateBackend` (fake process group, fake tensors)
    cpu       ->  `launch.RanksBackend("cpu")`  (N gloo processes, the tracker, wall clock)
    cuda      ->  `launch.RanksBackend("cuda")` (N NCCL processes, one GPU each)

A step without ``parallel`` (``--world-size 1``, the default) goes to the single-process backend,
unchanged; with ``parallel`` to the twin. The tuner mixes both in one search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class RankAware:
    """``measure(spec)`` on ``single`` without ``spec.parallel``, on ``ranks`` with it."""

    single: Any
    ranks: Any

    @property
    def name(self) -> str:
        return self.single.name

    @property
    def gpu(self) -> str | None:
        return getattr(self.single, "gpu", None)

    def measure(self, spec, *, breakdown: bool = False) -> dict[str, Any]:
        backend = self.ranks if spec.parallel is not None else self.single
        return backend.measure(spec, breakdown=breakdown)

    def time_only(self, spec) -> dict[str, Any]:
        """The single backend's wall-clock-only run (cpu); per-rank steps are always tracked."""
        if spec.parallel is not None:
            return self.ranks.measure(spec)
        return self.single.time_only(spec)


def with_ranks(
    single: Any,
    *,
    warmup: int | None = None,
    steps: int | None = None,
    gpu: str | None = None,
    ddp_rows: Any = None,
) -> RankAware:
    """``single`` paired with the per-rank backend of the same kind (module docstring);
    ``ddp_rows``: the estimate's `estimate.DdpRows` to share (None: its own)."""
    from velora_cli.parallel.estimate import ParallelEstimateBackend
    from velora_cli.parallel.launch import RanksBackend

    if single.name in ("cuda", "cpu"):
        options = {k: v for k, v in (("warmup", warmup), ("steps", steps)) if v is not None}
        ranks: Any = RanksBackend(device=single.name, **options)
    else:
        ranks = ParallelEstimateBackend(
            gpu=gpu,
            alloc_conf=getattr(single, "alloc_conf", None),
            expandable=getattr(single, "expandable", True),
        )
        if ddp_rows is not None:
            ranks.ddp_rows = ddp_rows
    return RankAware(single, ranks)
