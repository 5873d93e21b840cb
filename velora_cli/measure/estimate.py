"""The ``estimate`` backend: the same training step on meta tensors, no allocation, no GPU.

The model is built on the meta device and runs forward, backward and AdamW exactly as on a GPU,
with an attention function whose saved tensors match the fused SDPA kernels (on meta, SDPA's math
path would save the N×N matrix). The storage tracker, rounding each allocation to 512 bytes like
the CUDA caching allocator, gives the predicted peak and its breakdown. What it cannot see:
kernel workspaces (cuBLAS), the CUDA context, fragmentation. The same tracked step's ops are
counted (FLOPs, bytes) and give the step time predicted for ``gpu`` by a per-op roofline
(measure/roofline.py): ``predicted_step_seconds``, not a measurement (``step_seconds`` stays None).

Mixed precision (``--amp``): autocast does not apply to meta tensors, so the estimate emulates
CUDA autocast's cast policy for matmul-class ops (see ``amp_emulation``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from velora_cli.measure import failed_row
from velora_cli.measure.train_step import SpecError, StepSpec


@dataclass
class EstimateBackend:
    """Predicted memory of one step from meta tensors, and its step time predicted for ``gpu``."""

    warmup: int = 1
    gpu: str | None = None  # what it predicts for (velora_cli.gpus key); None: gpus.DEFAULT_GPU
    name: str = "estimate"

    def __post_init__(self) -> None:
        from velora_cli.gpus import get_gpu

        self.gpu = get_gpu(self.gpu).key  # an unknown name fails here, before anything runs

    def measure(self, spec: StepSpec, *, breakdown: bool = False) -> dict[str, Any]:
        from velora_cli.measure.attention import register_estimate_attention
        from velora_cli.measure.cpu import _is_user_error
        from velora_cli.measure.observe import tracked_step
        from velora_cli.measure.opcount import OpCounter
        from velora_cli.measure.step_time import prediction_fields, prediction_source
        from velora_cli.measure.train_step import prepare, train_step

        try:
            prepared = prepare(spec, "meta", attn_implementation=register_estimate_attention())
            # Every micro-batch after the second repeats the second exactly (same live storages:
            # params, accumulated grads, optimizer state, one micro-batch of activations), so two
            # give the step's peak; 7B at 4 accumulation steps estimates in half the time.
            prepared.micro_batches = prepared.micro_batches[:2]
            with amp_emulation(spec.amp):
                for _ in range(self.warmup):
                    train_step(prepared)
                ops = OpCounter("meta")
                row, _trace = tracked_step(prepared, breakdown=breakdown, op_counter=ops)
                row.update(prediction_fields(prepared, ops.counts(), self.gpu))
        except (SpecError, ValueError, RuntimeError, NotImplementedError) as exc:
            if isinstance(exc, SpecError) or _is_user_error(exc):
                raise
            return failed_row(self.name, exc)
        row.update(
            status="ok",
            backend=self.name,
            step_seconds=None,
            tokens_per_second=None,
            step_seconds_source=prediction_source(self.gpu),
        )
        return row


def amp_emulation(amp: str | None):
    """Emulate CUDA autocast on meta tensors (which autocast ignores); a no-op without amp."""
    import contextlib

    if amp is None:
        return contextlib.nullcontext()
    from velora_cli.measure.amp import MetaAutocast

    return MetaAutocast(amp)
