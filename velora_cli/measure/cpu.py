"""The ``cpu`` backend: real tensors on the CPU.

Memory comes from the storage tracker (the CPU allocator has no peak counter), counted as the CUDA
caching allocator would round it, so rows are comparable with the estimate and a GPU. Step time
is the median wall clock of timed steps after warm-up.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from velora_cli.measure import failed_row
from velora_cli.measure.train_step import SpecError, StepSpec


@dataclass
class CpuBackend:
    """Real CPU training steps: tracked memory, wall-clock time."""

    warmup: int = 1
    steps: int = 2
    name: str = "cpu"

    def measure(self, spec: StepSpec, *, breakdown: bool = False) -> dict[str, Any]:
        """Tracked memory and wall-clock time of one row."""
        return self._run(spec, breakdown=breakdown, track=True)

    def time_only(self, spec: StepSpec) -> dict[str, Any]:
        """Wall-clock time only (no tracked step): for rows whose memory comes from elsewhere."""
        return self._run(spec, breakdown=False, track=False)

    def _run(self, spec: StepSpec, *, breakdown: bool, track: bool) -> dict[str, Any]:
        import torch

        from velora_cli.emulation.attention import register_estimate_attention
        from velora_cli.measure.observe import force_refresh, timed_steps, tracked_step
        from velora_cli.measure.train_step import prepare, train_step

        try:
            prepared = prepare(spec, "cpu", attn_implementation=register_estimate_attention())
            for _ in range(self.warmup):
                train_step(prepared)
            row = tracked_step(prepared, breakdown=breakdown)[0] if track else {}
            before = prepared.subspace_refreshes()
            times = timed_steps(prepared, self.steps)
            if before is not None:  # refreshes the convergence test made in the timed steps
                row["timed_refreshes"] = prepared.subspace_refreshes() - before
            if force_refresh(prepared):  # galore/adarankgrad: the subspace refresh step apart
                row["refresh_step_seconds"] = timed_steps(prepared, 1)[0]
        except (SpecError, ValueError, RuntimeError, MemoryError) as exc:
            if isinstance(exc, SpecError) or _is_user_error(exc):
                raise
            return failed_row(self.name, exc)
        seconds = statistics.median(times)
        tokens = spec.batch_size * spec.seq_len
        row.update(
            status="ok",
            backend=self.name,
            step_seconds=seconds,
            step_seconds_source="measured (cpu wall clock, median of "
            f"{len(times)} after {self.warmup + int(track)} warm-up)",
            tokens_per_second=tokens / seconds,
            threads=torch.get_num_threads(),
        )
        return row


def _is_user_error(exc: BaseException) -> bool:
    """Errors about the request (model, placement, sub-token size) end the run, not just a row."""
    from velora_cli.methods.placement import PlacementError
    from velora_cli.methods.velora import SubTokenSizeError

    names = {"ModelError"}
    return isinstance(exc, (PlacementError, SubTokenSizeError)) or type(exc).__name__ in names
