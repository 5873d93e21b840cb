"""Predicted step time: a per-op roofline over the ops of one counted step (timing/opcount.py).

Each op takes

    time = max(FLOPs / achievable FLOP/s, bytes / achievable bandwidth) + launches × overhead

with achievable = the device's peak (velora_cli/gpus.py: dense FLOP/s of the op's math
precision, DRAM bandwidth) × an efficiency of the op's class, and for GEMMs an efficiency that
depends on the shape (tile and wave quantization, see `gemm_efficiency`). Ops are summed: one
stream, no overlap between kernels, as PyTorch's eager mode runs a training step. The host's
dispatch cost hides behind the kernels except for tiny ones, which the launch overhead covers.

Math precision: GEMMs and attention in bf16/fp16 run on tensor cores. fp32 matmuls run on CUDA
cores unless TF32 is allowed: PyTorch disables TF32 for matmuls by default since 1.12
(``torch.backends.cuda.matmul.allow_tf32`` is False, ``fp32_precision`` "ieee"), and velora's
steps do not enable it, so fp32 GEMMs use the datasheet's fp32 peak. The prediction reads the
flag when it runs, so ``torch.set_float32_matmul_precision("high")`` or
``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1`` switch it to the TF32 peak. Elementwise, reduction,
copy and optimizer kernels are bandwidth-bound; their FLOPs are charged at the fp32 peak.

Every efficiency and the launch overhead below is an ASSUMPTION (each with its reasoning), except:
the bf16 large-GEMM and the copy figures, measured on an H200 in this workplace (REFERENCE.md §5),
and the per-chip CALIBRATIONS (`CALIBRATIONS`), fitted to published timed training steps of the
validation corpus (validation/published/) and checked on cases left out of the fit:

    TU104 (T4)    fp16 tensor-core GEMMs 0.35, memory-efficient SDPA 0.17 (fp16) / 0.25 (fp32),
                  13 µs per kernel: fitcheck's 57 timed T4 rows of 2026-09-15/16 (5 models),
                  held out its 12 rows of 2026-09-21 (6 other models)
    GV100 (V100)  fp16 tensor-core GEMMs 0.45: the transformers guide's 4 fp16-AMP bert-large
                  rows, each checked left out of the fit; fp32 GEMMs 0.916: not fitted, a
                  published torch.mm 8192³ measurement of a V100-SXM2 (the guide's fp32 rows
                  checked against it)

Everything else (fp32 GEMMs of other chips, memory-bound classes, every other GPU) stays assumed.
``benchmarks/roofline_calibration.py`` prints what the corpus implies for each class. The cuda
backend reports the prediction beside each measured step (``predicted_step_seconds``), so every
GPU run is a calibration point for these numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from velora_cli.gpus import GpuSpec
    from velora_cli.timing.opcount import OpCost, StepCounts

# -- efficiencies (assumptions until a GPU run calibrates them) ------------------------------------

# Large GEMMs: 8192³ bf16 through PyTorch on an H200 ran at 769–798 TFLOP/s of 989.4 (REFERENCE.md
# §5): 0.78–0.81. Taken for every GPU and precision (assumption beyond bf16 on Hopper).
GEMM_EFFICIENCY = 0.80
# GEMM tiles: (rows, cols, relative efficiency). cuBLAS/CUTLASS run large bf16 GEMMs in 128×128
# (or larger) output tiles, one tile per SM at a time; for small or skinny outputs they pick
# smaller tiles that fill more SMs but reuse each loaded byte less (assumption: a 64×64 tile
# reaches half the throughput of a 128×128 one). The better of the two is taken.
GEMM_TILES = ((128, 128, 1.0), (64, 64, 0.5))
# Each tile's prologue/epilogue (loading the first K slab, writing the output) costs about as
# much as this many K steps of its main loop (assumption), so short reductions run slower:
# k / (k + GEMM_K_OVERHEAD), relative to k = 8192 (the measured size).
GEMM_K_OVERHEAD = 128
# Split-K: for a small output with a long reduction (LoRA's and VeLoRA's skinny weight
# gradients) cuBLAS splits K over several tiles and adds the partial sums. Modelled as splits of
# 1, 2, 4, 8 or 16, each at least this long in K (assumption); the partial sums' extra traffic
# (m·n fp32 per split, small when split-K pays) is not charged.
GEMM_SPLITS = (1, 2, 4, 8, 16)
GEMM_MIN_SPLIT_K = 256
# Fused attention (PyTorch's SDPA flash kernel is FlashAttention-2): "FlashAttention-2 achieves
# only 35% utilization on H100" (FlashAttention-3 paper, Shah et al. 2024, §1); on A100 it
# reaches 50–73% forward and less backward (FlashAttention-2 paper, Dao 2023, §4.1): 0.55 taken.
# Ada: assumption between the two.
ATTENTION_EFFICIENCY = {"hopper": 0.35, "ampere": 0.55, "ada": 0.45}
# SVD/QR (cuSOLVER): bidiagonalization and Householder panels are BLAS-2 heavy and latency-bound;
# a few percent of the fp32 peak (assumption, e.g. a 4096×4096 fp32 SVD takes on the order of a
# second on an A100 against 0.08 s at its fp32 peak).
LINALG_EFFICIENCY = 0.05
# Bandwidth efficiencies: device-to-device copies ran at 4.3 of 4.8 TB/s on an H200 (REFERENCE.md
# §5): 0.90. Elementwise kernels and multi-tensor (optimizer) kernels a little lower, reductions
# lower still (assumptions); a bandwidth-bound GEMM or attention kernel streams like a copy.
BANDWIDTH_EFFICIENCY = {
    "copy": 0.90,
    "gemm": 0.90,
    "attention": 0.90,
    "elementwise": 0.85,
    "foreach": 0.85,
    "reduction": 0.80,
    "linalg": 0.50,
}
# Per kernel: launch latency (≈2–4 µs) plus the gaps eager PyTorch leaves between tiny kernels
# while the host dispatches the next op (assumption: 5 µs per kernel, a typical eager-mode
# figure for small ops).
LAUNCH_SECONDS = 5e-6


@dataclass(frozen=True)
class Calibration:
    """Efficiencies a GPU chip's published timed steps imply (or, where the source says so, a
    published kernel measurement of the chip gives), replacing the assumptions above.

    ``efficiency``: op class -> math precision -> efficiency of the dense peak of that precision
    (``gemm``: of a large GEMM, before the shape model; ``attention``: of the fused kernel).
    ``launch_seconds``: the per-kernel overhead, when the timed steps imply one. ``source``: the
    corpus rows fitted, the rows held out and the error on them.
    """

    efficiency: dict[str, dict[str, float]]
    source: str
    launch_seconds: float | None = None


# torch.mm of two 8192 x 8192 fp32 matrices on a Tesla V100-SXM2-16GB, FLOP/s (see "GV100" below)
V100_SGEMM_8192 = 14.38e12

# Per GPU die (`GpuSpec.chip`): fitted by benchmarks/roofline_holdout.py, least squares on the
# relative step-time error (measured ≈ Σ_class factor × assumed time of the class + seconds per
# kernel × kernels), factor = assumed / calibrated efficiency, on one part of the corpus; the
# rest predicted with the fitted values. Only classes the fitted and held-out cases agree on are
# here. Reproduce:
#   python benchmarks/roofline_holdout.py --gpu t4 --hold-out 2026-09-21
#   python benchmarks/roofline_holdout.py --gpu v100-16gb --only fp16 --leave-one-out \
#       --fixed gemm32=1,memory=1,kernel_us=5,attention16=1,attention32=1
CALIBRATIONS: dict[str, Calibration] = {
    # fitcheck T4 (validation/published/fitcheck_t4.json; Kaggle T4, torch 2.10/2.14, fp16 base or
    # NF4, LoRA r32, checkpointing; one timed step each). Fitted on its 57 timed rows of the
    # 2026-09-15 and 2026-09-16 sessions (SmolLM2-135M/360M/1.7B, TinyLlama-1.1B, Qwen2.5-1.5B;
    # eager and SDPA, LoRA and QLoRA): fp16 GEMMs took 2.29x the assumed time (0.80 -> 0.35:
    # ~23 of 65 TFLOP/s; a plausible reason, not measured here: the datasheet's peak is at the
    # 1590 MHz boost clock and the card is held to 70 W), memory-efficient SDPA 2.03x in fp16
    # and 1.41x in fp32 (0.35 -> 0.17 / 0.25), 13.1 µs per kernel instead of 5 (read as eager
    # PyTorch's per-op host cost on Kaggle's CPUs: only the small-model rows, SmolLM2-135M,
    # whose kernels are shorter than that, pin it down). fp32 GEMMs and memory-bound ops keep
    # their assumed efficiencies (fitted free they come out 0.90x and 1.15x, and the held-out
    # error does not improve). Held out: the 12 rows of 2026-09-21 (Qwen2.5-7B, Mistral-7B-v0.3,
    # deepseek-coder-1.3b, Qwen2.5-Coder-1.5B, Llama-3.2-1B/3B, QLoRA r16): tokens/s error
    # −7.6 … +12.4% (mean |err| 6.4%) with these values (−7.8 … +12.3% with the unrounded
    # fit), +14 … +65% before. fitcheck's repeated
    # rows of one setup differ by 10–15% in step time (one timed step on a shared host): the
    # floor of what any calibration can reach on this source.
    "TU104": Calibration(
        efficiency={"gemm": {"fp16": 0.35}, "attention": {"fp16": 0.17, "fp32": 0.25}},
        launch_seconds=13e-6,
        source="fitcheck T4 rows 2026-09-15/16 (57 fitted), 2026-09-21 (12 held out)",
    ),
    # The transformers guide's V100 rows (validation/published/hf_guide_v100.json; bert-large,
    # 4 x 512, Trainer throughput over 128 steps). Its 4 fp16-AMP rows (bs 4; bs 1 x 4
    # accumulated with checkpointing; with Adafactor; with 8-bit Adam) imply fp16 GEMMs 1.78x
    # the assumed time (0.80 -> 0.45), with every other class as assumed; each row left out of
    # the fit in turn is predicted within −10 … +9%. Independent of the T4's source, it agrees
    # that pre-Ampere tensor cores reach well under the assumed 0.80 in these steps (the same
    # benchmark as below puts a V100's fp16 8192³ torch.mm at 97.36 TFLOP/s, 0.78: the gap to
    # 0.45 is in the AMP step, not in the large GEMM, and is not explained).
    #
    # fp32 GEMMs (CUDA cores, no tensor cores for fp32 on Volta) are NOT fitted to the guide: they
    # are a published measurement of the chip. torch.mm of two 8192 x 8192 fp32 matrices on a
    # Tesla V100-SXM2-16GB ran at 14.38 TFLOP/s (zzc0721/torch-performance-test-data, issue #140,
    # 2026-02-14, torch 2.7.0+cu128; its test.py: 6 warm-up products, then 30 timed back to back):
    # 14.38 / 15.7 = 0.916 of the datasheet's fp32 peak, where 0.80 was assumed. The same run's
    # other sizes (1024³ 10.56, 2048³ 12.71, 4096³ 13.85 TFLOP/s) are reproduced by the GEMM
    # shape model from that one point within 6 % (tests/test_roofline_measured.py). The guide's
    # 4 fp32 rows, not used to set it, then come out −14 … −4 % (−22 … −13 % before). The same
    # source's T4 (4.43 TFLOP/s on Kaggle, 0.55 of 8.1) is not taken: fitcheck's T4 rows, whose
    # fp32 GEMMs are LoRA's skinny ones, disagree with it (docs/validation.md).
    "GV100": Calibration(
        efficiency={"gemm": {"fp16": 0.45, "fp32": V100_SGEMM_8192 / 15.7e12}},
        source="transformers guide V100 fp16-AMP rows (4, each held out in turn); fp32 GEMMs: "
        "torch.mm 8192³ measured on a V100-SXM2 (torch-performance-test-data #140)",
    ),
}

# CUDA's multi_tensor_apply (aten/src/ATen/native/cuda/MultiTensorApply.cuh) launches a kernel
# when it has collected depth_to_max_tensors[lists − 1] tensors or 320 chunks of 65536 elements.
_MAX_TENSORS = (110, 64, 48, 36, 30)
_MAX_CHUNKS = 320


@dataclass(frozen=True)
class Device:
    """What the roofline needs of a device: peaks, efficiencies and the launch overhead.

    Built from the GPU table by `gpu_device`, or from measured figures (benchmarks/
    roofline_cpu.py builds a CPU one with `measured_device`).

    Args:
        peak_flops: dense FLOP/s per math precision (``bf16``, ``fp16``, ``tf32``, ``fp32``).
        bandwidth: DRAM bytes/s.
        sms: parallel units for GEMM tile/wave quantization; 0: no shape model (GEMMs run at
            ``gemm_efficiency`` whatever their shape).
        compute_efficiency: per op class, of the peak (GEMMs: ``gemm_efficiency`` instead).
        precision_efficiency: per op class and math precision, replacing ``gemm_efficiency`` or
            ``compute_efficiency`` for that precision (a chip's `Calibration`).
        bandwidth_efficiency: per op class, of the bandwidth.
        multi_tensor_apply: ``_foreach_*`` ops launch as CUDA's multi_tensor_apply does; False:
            one kernel per tensor (the CPU's per-tensor loop).
        fp32_matmul: the precision fp32 GEMMs run in, ``fp32`` or ``tf32``.
        fresh_seconds_per_byte: extra cost of writing a large new allocation (a CPU's page
            faults, `opcount.FRESH_ALLOCATION`); 0 on a GPU, whose caching allocator reuses memory.
    """

    key: str
    name: str
    peak_flops: dict[str, float]
    bandwidth: float
    sms: int
    compute_efficiency: dict[str, float]
    bandwidth_efficiency: dict[str, float]
    gemm_efficiency: float = GEMM_EFFICIENCY
    launch_seconds: float = LAUNCH_SECONDS
    # op class -> math precision -> efficiency, over the per-class ones (`CALIBRATIONS`)
    precision_efficiency: dict[str, dict[str, float]] = field(default_factory=dict)
    multi_tensor_apply: bool = True
    fp32_matmul: str = "fp32"
    fresh_seconds_per_byte: float = 0.0
    notes: tuple[str, ...] = field(default=())

    def peak(self, precision: str) -> float:
        """Peak FLOP/s of ``precision``; a precision the device lacks falls back to fp32."""
        return self.peak_flops.get(precision) or self.peak_flops["fp32"]


def fp32_matmul_precision() -> str:
    """``tf32`` when PyTorch would run fp32 CUDA matmuls in TF32 now, else ``fp32`` (default)."""
    import torch

    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def gpu_device(gpu: GpuSpec, *, fp32_matmul: str | None = None) -> Device:
    """The roofline device of a GPU from the table, with this module's efficiencies.

    Args:
        gpu: a `velora_cli.gpus.GpuSpec`.
        fp32_matmul: override the fp32 GEMM precision (default: `fp32_matmul_precision()`).
    """
    calibration = CALIBRATIONS.get(gpu.chip)
    extra = {}
    if calibration is not None:
        extra["precision_efficiency"] = {k: dict(v) for k, v in calibration.efficiency.items()}
        extra["notes"] = (f"calibrated ({gpu.chip}): {calibration.source}",)
        if calibration.launch_seconds is not None:
            extra["launch_seconds"] = calibration.launch_seconds
    return Device(
        key=gpu.key,
        name=gpu.name,
        peak_flops=dict(gpu.dense_flops),
        bandwidth=gpu.bandwidth,
        sms=gpu.sms,
        compute_efficiency={
            "attention": ATTENTION_EFFICIENCY.get(gpu.arch, min(ATTENTION_EFFICIENCY.values())),
            "linalg": LINALG_EFFICIENCY,
        },
        bandwidth_efficiency=dict(BANDWIDTH_EFFICIENCY),
        fp32_matmul=fp32_matmul or fp32_matmul_precision(),
        **extra,
    )


def measured_device(
    name: str,
    *,
    gemm_flops: float,
    bandwidth: float,
    launch_seconds: float,
    fresh_seconds_per_byte: float = 0.0,
) -> Device:
    """A device from measured achievable figures (efficiency 1 for every class, no GEMM shape
    model, one kernel per tensor in ``_foreach_*`` ops): the CPU check's device."""
    ones = {kind: 1.0 for kind in BANDWIDTH_EFFICIENCY}
    return Device(
        key=name,
        name=name,
        peak_flops={"fp32": gemm_flops},
        bandwidth=bandwidth,
        sms=0,
        compute_efficiency=dict(ones),
        bandwidth_efficiency=dict(ones),
        gemm_efficiency=1.0,
        launch_seconds=launch_seconds,
        multi_tensor_apply=False,
        fresh_seconds_per_byte=fresh_seconds_per_byte,
    )


# -- one op -------------------------------------------------------------------------------------


def gemm_efficiency(
    device: Device, batch: int, m: int, n: int, k: int, precision: str | None = None
) -> float:
    """The fraction of the peak a (batch × m×k·k×n) GEMM reaches on ``device``.

    ``device.gemm_efficiency`` (or the device's calibrated efficiency of ``precision``, the math
    precision the GEMM runs in) is the efficiency of an 8192³ GEMM (the measured point); other
    shapes scale it by their utilization relative to 8192³. Utilization, for the best tile of
    `GEMM_TILES` and split of `GEMM_SPLITS`: the output splits into ceil(m/tm)·ceil(n/tn) tiles
    per batch and split, which run ``sms`` at a time (the padding of partial tiles and the idle
    SMs of a last, partial wave are wasted), × the tile's relative efficiency × the K ramp of one
    split, (k/s) / (k/s + `GEMM_K_OVERHEAD`).
    """
    large = device.precision_efficiency.get("gemm", {}).get(precision, device.gemm_efficiency)
    if device.sms <= 0:
        return large
    shape = _utilization(device.sms, batch, m, n, k)
    reference = _utilization(device.sms, 1, 8192, 8192, 8192)
    return large * min(1.0, shape / reference)


def _utilization(sms: int, batch: int, m: int, n: int, k: int) -> float:
    best = 0.0
    for tm, tn, relative in GEMM_TILES:
        for splits in GEMM_SPLITS:
            if splits > 1 and k / splits < GEMM_MIN_SPLIT_K:
                break
            tiles = batch * math.ceil(m / tm) * math.ceil(n / tn) * splits
            waves = math.ceil(tiles / sms)
            busy = batch * m * n * splits / (waves * sms * tm * tn)
            slab = k / splits
            best = max(best, relative * busy * slab / (slab + GEMM_K_OVERHEAD))
    return best


def op_launches(op: OpCost, device: Device) -> int:
    """Kernels one op launches: one, or for a multi-tensor op as multi_tensor_apply chunks it."""
    if op.kind != "foreach":
        return 1
    if not device.multi_tensor_apply:
        return max(1, op.tensors)
    per_launch = _MAX_TENSORS[min(op.lists, len(_MAX_TENSORS)) - 1]
    return max(1, math.ceil(op.tensors / per_launch), math.ceil(op.chunks / _MAX_CHUNKS))


def op_seconds(op: OpCost, device: Device) -> float:
    """Predicted seconds of one op on ``device`` (see the module docstring)."""
    precision = op.precision
    if op.kind == "gemm" and precision == "fp32":
        precision = device.fp32_matmul
    if op.kind in ("gemm", "attention", "linalg"):
        peak = device.peak(precision)
    else:
        peak = device.peak("fp32")  # CUDA cores, whatever the storage dtype
    if op.kind == "gemm":
        efficiency = gemm_efficiency(device, *op.gemm, precision=precision)
    else:
        efficiency = device.precision_efficiency.get(op.kind, {}).get(
            precision, device.compute_efficiency.get(op.kind, 1.0)
        )
    compute = op.flops / (peak * efficiency) if op.flops else 0.0
    memory = op.bytes / (device.bandwidth * device.bandwidth_efficiency.get(op.kind, 1.0))
    fresh = op.fresh_bytes * device.fresh_seconds_per_byte
    return max(compute, memory) + fresh + op_launches(op, device) * device.launch_seconds


# -- the step -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """The predicted time of one step, with where it goes; seconds, FLOPs and bytes as numbers.

    ``by_phase``: forward / backward (a checkpoint's recomputation included) / optimizer /
    zero_grad / other; ``by_kind``: per op class (`opcount.KINDS`).
    """

    device: str
    seconds: float
    by_phase: dict[str, float]
    by_kind: dict[str, float]
    flops: int
    bytes: int
    kernels: int


def predict(counts: StepCounts, device: Device, *, micro_batches: int | None = None) -> Prediction:
    """Sum the roofline over every counted op of a step.

    Args:
        counts: the step's ops (`OpCounter.counts()`).
        device: what to predict for.
        micro_batches: the real number of micro-batches when fewer were counted: the last counted
            micro-batch's forward and backward are repeated for the rest (every micro-batch after
            the second runs the second's ops: same shapes, gradients accumulated in place).

    Returns:
        The `Prediction`.
    """
    counted = counts.micro_batches
    extra = max(0, (micro_batches or counted) - counted)
    last = max((s.micro for s in counts.segments if s.micro is not None), default=None)
    by_phase: dict[str, float] = {}
    by_kind: dict[str, float] = {}
    flops = nbytes = kernels = 0
    for segment in counts.segments:
        repeat = 1 + (extra if segment.micro is not None and segment.micro == last else 0)
        for op, n in segment.ops:
            seconds = op_seconds(op, device) * n * repeat
            by_phase[segment.phase] = by_phase.get(segment.phase, 0.0) + seconds
            by_kind[op.kind] = by_kind.get(op.kind, 0.0) + seconds
            flops += op.flops * n * repeat
            nbytes += op.bytes * n * repeat
            kernels += op_launches(op, device) * n * repeat
    return Prediction(
        device=device.key,
        seconds=sum(by_phase.values()),
        by_phase=by_phase,
        by_kind=dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        flops=flops,
        bytes=nbytes,
        kernels=kernels,
    )
