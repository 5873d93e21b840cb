"""The ``estimate`` backend: the same training step on meta tensors, no allocation, no GPU.

The model is built on the meta device and runs forward, backward and AdamW exactly as on a GPU,
with an attention function whose saved tensors match the fused SDPA kernels (on meta, SDPA's math
path would save the N×N matrix). The storage tracker, rounding each allocation to 512 bytes like
the CUDA caching allocator, gives the predicted peak and its breakdown. The step's allocation
trace, replayed through a model of the caching allocator with the cuBLAS workspaces and kernel
scratch the tracker cannot see (device_memory.py), gives what the GPU must hold: reserved
segments, fragmentation, and with the CUDA context the device-level figure. The same tracked
step's ops are counted (FLOPs, bytes) and give the step time predicted for ``gpu`` by a per-op
roofline (timing/roofline.py): ``predicted_step_seconds``, not a measurement (``step_seconds``
stays None).

Where ATen picks a kernel by device, meta tensors take the CPU-like path; the step runs inside
``emulation.cuda_emulation`` so that they save what CUDA saves: dropout's bool mask, fused
RMSNorm, SDPA's math path as on a GPU, and under ``--amp`` CUDA autocast's cast policy (autocast
does not apply to meta tensors).

Two paths give the same rows: the reference (``shortcuts=False``: a fresh model per row, its
warm-up step, the tracked step) and the default fast path (`measure.shortcut`: models built once
and reused across rows, meta-kernel results kept by input metadata, and, where a row needs no
trace of the real step, the step run at three shallow depths and extrapolated where that is
exact). Both measure each run with `EstimateBackend.observe`, the one place a field of the
estimate row is computed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from velora_cli import gcpause
from velora_cli.measure import failed_row
from velora_cli.measure.train_step import SpecError, StepSpec

# VELORA_ESTIMATE_REFERENCE=1 makes the reference path the default (benchmarks, debugging).
REFERENCE_ENV = "VELORA_ESTIMATE_REFERENCE"

# Every micro-batch after the second repeats the second exactly (same live storages: params,
# accumulated grads, optimizer state, one micro-batch of activations), so two give the step's
# peak; 7B at 4 accumulation steps estimates in half the time.
MICRO_BATCHES = 2


@dataclass
class EstimateBackend:
    """Predicted memory of one step from meta tensors, and its step time predicted for ``gpu``.

    ``shortcuts`` (default, unless ``VELORA_ESTIMATE_REFERENCE=1``) reuses meta models across
    rows; False is the reference path (a fresh model and warm-up per row), slower and
    byte-identical. ``trace_fields`` (default) gives each row the fields made from its step's
    allocation trace: what the GPU must hold (the caching allocator replayed over it) and the
    memory timeline; ``step_time`` (default) the roofline's step time from its ops. A row with
    either is stepped at the real depth; without both a row may be extrapolated from shallow
    steps. ``full_depth`` always steps the real depth.
    """

    warmup: int = 1
    gpu: str | None = None  # what it predicts for (velora_cli.gpus key); None: gpus.DEFAULT_GPU
    name: str = "estimate"
    # PYTORCH_CUDA_ALLOC_CONF the allocator model uses; None: the environment's (as torch reads it)
    alloc_conf: str | None = None
    # the cuda backend's warm-up and timed steps, which the allocator replay follows
    cuda_warmup: int = 2
    cuda_steps: int = 5
    # a harness that does not empty the cache before measuring (validation's published runs)
    cuda_empty_cache: bool = True
    # a harness whose peaks cover the whole run (no reset after the warm-up; validation's
    # published runs that read the peaks once after training)
    cuda_reset_peak: bool = True
    # the CUDA runtime of the run predicted (torch.version.cuda, e.g. "12.8"): the context figure
    # for that version (GpuSpec.cuda_context); None: the GPU's figure for a current CUDA
    cuda_version: str | None = None
    shortcuts: bool = field(default_factory=lambda: os.environ.get(REFERENCE_ENV, "") != "1")
    full_depth: bool = False
    trace_fields: bool = True  # device memory and the timeline, from the real step's trace
    expandable: bool = True  # also predict device memory with expandable_segments:True
    step_time: bool = True  # the roofline's predicted step time, from the real step's ops
    # the row's memory timeline (with ``trace_fields``); a tune, which drops it from every
    # candidate (search/estimator.py), leaves it out
    timeline: bool = True

    def __post_init__(self) -> None:
        from velora_cli.allocator.config import alloc_conf_from_env, parse_alloc_conf
        from velora_cli.gpus import get_gpu

        self.gpu = get_gpu(self.gpu).key  # an unknown name fails here, before anything runs
        get_gpu(self.gpu).cuda_context(self.cuda_version)  # so does an unreadable CUDA version
        if self.alloc_conf is None:
            self.alloc_conf = alloc_conf_from_env()
        self.allocator = parse_alloc_conf(self.alloc_conf)  # a bad string fails here too
        self._fast = None

    def measure(self, spec: StepSpec, *, breakdown: bool = False) -> dict[str, Any]:
        from velora_cli.emulation.attention import padded_batches, sdpa_note, target_gpu
        from velora_cli.gpus import get_gpu
        from velora_cli.measure.cpu import _is_user_error
        from velora_cli.timing.step_time import prediction_source

        gpu = get_gpu(self.gpu)
        if spec.attn == "flash_attention_2" and gpu.compute_capability < (8, 0):
            raise SpecError(
                f"--attn flash_attention_2 needs an Ampere or newer GPU (sm80+; the flash-attn "
                f"package); {gpu.key} is sm{''.join(map(str, gpu.compute_capability))}: use "
                "--attn sdpa or eager"
            )
        try:
            # attention kernels as torch picks them on this GPU, masks as the batches pad
            with (
                gcpause.paused(),  # a row's collections walked the whole heap
                target_gpu(self.gpu, self.cuda_version) as kernels,
                padded_batches(spec.padding, spec.real_tokens(), spec.packed_sequences),
            ):
                if self.shortcuts and self.warmup >= 1:
                    row = self.fast_path().row(
                        spec, breakdown=breakdown, full_depth=self.full_depth
                    )
                else:
                    row = self._reference(spec, breakdown)
            # the SDPA kernels the step ran, where the document should say so (cuDNN, or the
            # math path that grouped-query attention takes on this torch)
            note = sdpa_note(kernels, self.gpu, self.cuda_version)
            if note:
                row["sdpa_note"] = note
        except (SpecError, ValueError, RuntimeError, NotImplementedError) as exc:
            if isinstance(exc, SpecError) or _is_user_error(exc):
                raise
            return failed_row(self.name, exc)
        if row.get("predicted_step_seconds"):
            tokens = spec.batch_size * spec.seq_len
            row["predicted_tokens_per_second"] = tokens / row["predicted_step_seconds"]
        row.update(status="ok", backend=self.name, step_seconds=None, tokens_per_second=None)
        if self.step_time:
            row["step_seconds_source"] = prediction_source(self.gpu)
        return row

    def observe(
        self, prepared, *, breakdown: bool, tracker=None, counter=None
    ) -> tuple[dict[str, Any], Any]:
        """One tracked step of a prepared (warmed-up) meta model: the row's fields and the trace.

        The reference path runs it once per row, the fast path once per row at the real depth;
        the depth shortcut runs `tracked` at three shallow depths instead and `finish` on the
        real-depth trace and op counts it synthesizes from them (`measure.step_synthesis`).

        Args:
            prepared: from `prepare` (or the fast path's reused model), on meta, warmed up.
            breakdown: add saved activations per module pattern.
            tracker: the tracker to use (`observe.tracked_step`); None: a plain one.
            counter: the `OpCounter` to count the step's ops with (the fast path's shares its
                costs between rows); None: a fresh one (with ``step_time``).

        Returns:
            (row fields, `AllocationTrace` of the tracked step).
        """
        row, trace, counts = self.tracked(
            prepared, breakdown=breakdown, tracker=tracker, counter=counter
        )
        return self.finish(prepared, row, trace, counts), trace

    def tracked(
        self, prepared, *, breakdown: bool, tracker=None, counter=None, with_timeline=None
    ) -> tuple:
        """The tracked step alone: its memory fields (`observe.tracked_step`), its trace, and its
        op counts (None without ``step_time``; ``counter``: the `OpCounter` to count them with).
        The row has a timeline with ``trace_fields`` and ``timeline`` unless ``with_timeline``
        says otherwise.
        """
        from velora_cli.emulation.step import cuda_emulation
        from velora_cli.measure.observe import tracked_step
        from velora_cli.timing.opcount import OpCounter

        with cuda_emulation(prepared.spec.amp, prepared.spec.torch_version):
            ops = None
            if self.step_time:
                ops = counter if counter is not None else OpCounter("meta")
            row, trace = tracked_step(
                prepared,
                breakdown=breakdown,
                tracker=tracker,
                op_counter=ops,
                # a counter the caller gives (the fast path's) counts inside the tracker's mode;
                # the reference path's own is a mode of its own above it (the tests compare them)
                fused=counter is not None,
                with_timeline=(
                    self.trace_fields and self.timeline if with_timeline is None else with_timeline
                ),
            )
        return row, trace, None if ops is None else ops.counts()

    def finish(self, prepared, row, trace, counts, *, regular=None) -> dict[str, Any]:
        """The fields made from a step's ops and trace, added to its ``row``: the roofline's step
        time from ``counts`` (``regular``: a low-rank optimizer's regular step, else counted
        here), and with ``trace_fields`` the device memory from ``trace``. The same for a real
        step and a synthesized one.
        """
        from velora_cli.emulation.step import cuda_emulation
        from velora_cli.timing.step_time import prediction_fields

        if counts is not None:
            from velora_cli.timing.offload import offload_fields

            with cuda_emulation(prepared.spec.amp, prepared.spec.torch_version):
                row.update(prediction_fields(prepared, counts, self.gpu, regular=regular))
            row.update(offload_fields(row, self.gpu, prepared.spec.grad_accum_steps))
        # tokens/s is not a sum over ops: `measure` derives it from the time
        row.pop("predicted_tokens_per_second", None)
        if self.trace_fields:
            row.update(self.device_memory_of(prepared, trace))
            add_paged_state(row)
        return row

    def device_memory_of(self, prepared, trace) -> dict[str, Any]:
        """The device-level fields of one traced step (see device_memory.device_memory_fields)."""
        from velora_cli.allocator.device_memory import (
            LoadPlan,
            device_memory_fields,
            scratch_for_step,
        )
        from velora_cli.gpus import get_gpu

        model = getattr(prepared.model, "module", prepared.model)
        load = None
        if prepared.spec.mode == "qlora":  # quantized on load, upcast by kbit preparation
            from velora_cli.methods.quant import load_transients

            staged, upcast = load_transients(model)
            load = LoadPlan(staged=staged, upcast=upcast)
        return device_memory_fields(
            trace,
            gpu=get_gpu(self.gpu),
            config=self.allocator,
            # a DDP rank's model is the wrapped one's .module (its config names the shapes)
            scratch=scratch_for_step(prepared.spec, model),
            warmup=self.cuda_warmup,
            steps=self.cuda_steps,
            expandable=self.expandable,
            empty_cache=self.cuda_empty_cache,
            reset_peak=self.cuda_reset_peak,
            cuda_version=self.cuda_version,
            load=load,
        )

    def _reference(self, spec: StepSpec, breakdown: bool) -> dict[str, Any]:
        """The slow reference: a fresh model per row, its warm-up, the step at the real depth."""
        from velora_cli.emulation.attention import register_estimate_attention
        from velora_cli.emulation.step import cuda_emulation
        from velora_cli.measure.train_step import prepare, train_step

        prepared = prepare(spec, "meta", attn_implementation=register_estimate_attention())
        prepared.micro_batches = prepared.micro_batches[:MICRO_BATCHES]
        with cuda_emulation(spec.amp, spec.torch_version):
            for _ in range(self.warmup):
                train_step(prepared)
        row, _trace = self.observe(prepared, breakdown=breakdown)
        row["estimate_method"] = "full depth (reference: a fresh model per row)"
        return row

    def fast_path(self):
        """The `measure.shortcut.Shortcuts` this backend's rows go through (made once)."""
        if self._fast is None:
            from velora_cli.emulation.attention import register_estimate_attention
            from velora_cli.emulation.step import cuda_emulation
            from velora_cli.shortcut.meta_cache import MetaModels
            from velora_cli.shortcut.shortcuts import Shortcuts

            models = MetaModels(
                attn_implementation=register_estimate_attention(),
                warmup=self.warmup,
                micro_batches=MICRO_BATCHES,
                step_context=lambda spec: cuda_emulation(spec.amp, spec.torch_version),
            )
            self._fast = Shortcuts(self, models)
        return self._fast


def add_paged_state(row: dict[str, Any]) -> None:
    """Count a paged optimizer's managed state in the device figures, not the allocator's.

    bitsandbytes' paged state is cudaMallocManaged memory (`methods.optimizers`): torch's
    ``max_memory_allocated/reserved`` never include it, NVML's device "used" does while its pages
    are on the GPU (prefetched before each update). The predicted allocated/reserved bytes are
    what torch will report; the device bytes add the pages (the safe side for "does it fit").
    """
    paged = row.get("paged_optimizer_bytes")
    if not paged or "predicted_device_bytes" not in row:
        return
    for key in ("predicted_device_bytes", "predicted_device_expandable_bytes"):
        if key in row:
            row[key] += paged
    row["device_memory_notes"] = (
        row.get("device_memory_notes", "")
        + f"; + paged optimizer state {paged:,} B (cudaMallocManaged: in NVML's device memory "
        "while resident, never in torch's allocated/reserved counters)"
    )
