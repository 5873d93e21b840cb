"""The ``estimate`` backend: the same training step on meta tensors, no allocation, no GPU.

The model is built on the meta device and runs forward, backward and AdamW exactly as on a GPU,
with an attention function whose saved tensors match the fused SDPA kernels (on meta, SDPA's math
path would save the N×N matrix). The storage tracker, rounding each allocation to 512 bytes like
the CUDA caching allocator, gives the predicted peak and its breakdown. What it cannot see:
kernel workspaces (cuBLAS), the CUDA context, fragmentation.

Mixed precision (``--amp``): autocast does not apply to meta tensors, so the estimate emulates
CUDA autocast's cast policy for matmul-class ops (see ``amp_emulation``).

Two paths give the same rows: the reference (``shortcuts=False``: a fresh model per row, its
warm-up step, the tracked step at the real depth) and the default fast path
(`measure.shortcut`: models built once and reused across rows, meta-kernel results kept by input
metadata, and the step run at three shallow depths and extrapolated where that is exact). Both measure each run with `observe`, the one place
a field of the estimate row is computed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from velora_cli.measure import failed_row
from velora_cli.measure.train_step import SpecError, StepSpec

# VELORA_ESTIMATE_REFERENCE=1 makes the reference path the default (benchmarks, debugging).
REFERENCE_ENV = "VELORA_ESTIMATE_REFERENCE"

# Every micro-batch after the second repeats the second exactly (same live storages: params,
# accumulated grads, optimizer state, one micro-batch of activations), so two give the step's
# peak; 7B at 4 accumulation steps estimates in half the time.
MICRO_BATCHES = 2


def observe(prepared, *, breakdown: bool, tracker=None) -> tuple[dict[str, Any], Any]:
    """One tracked step of a prepared (warmed-up) meta model: the row's fields and the trace.

    Every run of the estimate goes through here: the reference path once per row, the fast path
    once per shallow depth (then each numeric field is extrapolated if exactly affine in depth,
    else the row is run at the real depth, `measure.shortcut`). A field added here therefore
    needs nothing more, unless it needs the real step itself (e.g. the whole trace): then
    construct the backend with ``full_depth=True``.

    Args:
        prepared: from `prepare` (or the fast path's reused model), on meta, warmed up.
        breakdown: add saved activations per module pattern.
        tracker: the tracker to use (`observe.tracked_step`); None: a plain one.

    Returns:
        (row fields, `AllocationTrace` of the tracked step).
    """
    from velora_cli.measure.observe import tracked_step

    with amp_emulation(prepared.spec.amp):
        return tracked_step(prepared, breakdown=breakdown, tracker=tracker)


@dataclass
class EstimateBackend:
    """Predicted memory of one step from meta tensors; no timing.

    ``shortcuts`` (default, unless ``VELORA_ESTIMATE_REFERENCE=1``) reuses meta models across
    rows and extrapolates depth where exact; False is the reference path (a fresh model and
    warm-up per row, full depth), slower and byte-identical. ``full_depth`` keeps model reuse
    but always steps the real depth (for rows that need the real step's trace).
    """

    warmup: int = 1
    gpu: str | None = None  # what it predicts for (velora_cli.gpus key); None: gpus.DEFAULT_GPU
    name: str = "estimate"
    shortcuts: bool = field(default_factory=lambda: os.environ.get(REFERENCE_ENV, "") != "1")
    full_depth: bool = False

    def __post_init__(self) -> None:
        from velora_cli.gpus import get_gpu

        self.gpu = get_gpu(self.gpu).key  # an unknown name fails here, before anything runs
        self._fast = None

    def measure(self, spec: StepSpec, *, breakdown: bool = False) -> dict[str, Any]:
        from velora_cli.measure.cpu import _is_user_error

        try:
            if self.shortcuts and self.warmup >= 1:
                row = self.fast_path().row(spec, breakdown=breakdown, full_depth=self.full_depth)
            else:
                row = self._reference(spec, breakdown)
        except (SpecError, ValueError, RuntimeError, NotImplementedError) as exc:
            if isinstance(exc, SpecError) or _is_user_error(exc):
                raise
            return failed_row(self.name, exc)
        row.update(
            status="ok",
            backend=self.name,
            step_seconds=None,
            tokens_per_second=None,
        )
        return row

    def _reference(self, spec: StepSpec, breakdown: bool) -> dict[str, Any]:
        """The slow reference: a fresh model per row, its warm-up, the step at the real depth."""
        from velora_cli.measure.attention import register_estimate_attention
        from velora_cli.measure.train_step import prepare, train_step

        prepared = prepare(spec, "meta", attn_implementation=register_estimate_attention())
        prepared.micro_batches = prepared.micro_batches[:MICRO_BATCHES]
        with amp_emulation(spec.amp):
            for _ in range(self.warmup):
                train_step(prepared)
        row, _trace = observe(prepared, breakdown=breakdown)
        row["estimate_method"] = "full depth (reference: a fresh model per row)"
        return row

    def fast_path(self):
        """The `measure.shortcut.Shortcuts` this backend's rows go through (made once)."""
        if self._fast is None:
            from velora_cli.measure.attention import register_estimate_attention
            from velora_cli.measure.meta_cache import MetaModels
            from velora_cli.measure.shortcut import Shortcuts

            models = MetaModels(
                attn_implementation=register_estimate_attention(),
                warmup=self.warmup,
                micro_batches=MICRO_BATCHES,
                step_context=lambda spec: amp_emulation(spec.amp),
            )
            self._fast = Shortcuts(observe, models)
        return self._fast


def amp_emulation(amp: str | None):
    """Emulate CUDA autocast on meta tensors (which autocast ignores); a no-op without amp."""
    import contextlib

    if amp is None:
        return contextlib.nullcontext()
    from velora_cli.measure.amp import MetaAutocast

    return MetaAutocast(amp)
