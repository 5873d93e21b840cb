"""The ``estimate`` backend: the same training step on meta tensors, no allocation, no GPU.

The model is built on the meta device and runs forward, backward and AdamW exactly as on a GPU,
with an attention function whose saved tensors match the fused SDPA kernels (on meta, SDPA's math
path would save the N×N matrix). The storage tracker, rounding each allocation to 512 bytes like
the CUDA caching allocator, gives the predicted peak and its breakdown. The step's allocation
trace, replayed through a model of the caching allocator with the cuBLAS workspaces and kernel
scratch the tracker cannot see (device_memory.py), gives what the GPU must hold: reserved
segments, fragmentation, and with the CUDA context the device-level figure. The same tracked
step's ops are counted (FLOPs, bytes) and give the step time predicted for ``gpu`` by a per-op
roofline (measure/roofline.py): ``predicted_step_seconds``, not a measurement (``step_seconds``
stays None).

Where ATen picks a kernel by device, meta tensors take the CPU-like path; the step runs inside
``emulation.cuda_emulation`` so that they save what CUDA saves: dropout's bool mask, fused
RMSNorm, SDPA's math path as on a GPU, and under ``--amp`` CUDA autocast's cast policy (autocast
does not apply to meta tensors).
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
    # PYTORCH_CUDA_ALLOC_CONF the allocator model uses; None: the environment's (as torch reads it)
    alloc_conf: str | None = None
    # the cuda backend's warm-up and timed steps, which the allocator replay follows
    cuda_warmup: int = 2
    cuda_steps: int = 5

    def __post_init__(self) -> None:
        from velora_cli.gpus import get_gpu
        from velora_cli.measure.allocator_config import alloc_conf_from_env, parse_alloc_conf

        self.gpu = get_gpu(self.gpu).key  # an unknown name fails here, before anything runs
        if self.alloc_conf is None:
            self.alloc_conf = alloc_conf_from_env()
        self.allocator = parse_alloc_conf(self.alloc_conf)  # a bad string fails here too

    def measure(self, spec: StepSpec, *, breakdown: bool = False) -> dict[str, Any]:
        from velora_cli.measure.attention import register_estimate_attention
        from velora_cli.measure.cpu import _is_user_error
        from velora_cli.measure.emulation import cuda_emulation
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
            with cuda_emulation(spec.amp):
                for _ in range(self.warmup):
                    train_step(prepared)
                ops = OpCounter("meta")
                row, trace = tracked_step(prepared, breakdown=breakdown, op_counter=ops)
                row.update(prediction_fields(prepared, ops.counts(), self.gpu))
            row.update(self.device_memory(prepared, trace))
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

    def device_memory(self, prepared, trace) -> dict[str, Any]:
        """The device-level fields of one traced step (see device_memory.device_memory_fields)."""
        from velora_cli.gpus import get_gpu
        from velora_cli.measure.device_memory import device_memory_fields, scratch_for_step

        return device_memory_fields(
            trace,
            gpu=get_gpu(self.gpu),
            config=self.allocator,
            scratch=scratch_for_step(prepared.spec, prepared.model),
            warmup=self.cuda_warmup,
            steps=self.cuda_steps,
        )
