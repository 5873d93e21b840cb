"""Facts about the GPUs velora predicts for, in one table: every figure with its source.

The estimate backend runs without a GPU; what it predicts for one (device-level memory, step
time) needs that GPU's figures. They live here, once, for every model that uses them. Peak
throughputs are the vendor's datasheet figures for *dense* math (NVIDIA's headline tensor figures
assume 2:4 sparsity and are twice these); bandwidth is the datasheet's DRAM bandwidth. Both are
upper bounds that no kernel reaches: models that use them apply their own efficiencies and say so.

Memory is the advertised capacity (datasheet "GB", taken as 10^9 bytes); the driver reports a
little less as usable (ECC, reserved regions), so a budget taken from this table is labelled as
nominal.

Beyond the caching allocator's segments a training process holds the CUDA context (driver state
and the kernels loaded, lazily since CUDA 11.7) and per-thread cuBLAS workspaces; the latter are
allocated through the caching allocator (``CublasHandlePool.cpp::setWorkspaceForHandle`` calls
``CUDACachingAllocator::get()->allocate``), so they are part of allocated and reserved memory and
the device-memory model places them there (allocator/device_memory.py). Their sizes come from
``parseChosenWorkspaceSize`` (`GpuSpec.cublas_workspace_bytes`); the context is a constant
(`GpuSpec.context_bytes`).

Example:
    >>> gpu = get_gpu("h100")
    >>> gpu.name, gpu.flops("bf16") / 1e12
    ('NVIDIA H100 SXM5 80GB', 989.4)
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_GPU = "h100"  # the most common training GPU velora's users rent (stated in --gpu's help)

MiB = 1 << 20
# What NVML counts as used beyond the caching allocator's reserved memory: the CUDA context and the
# kernels loaded into it. Not measured here for any GPU in the table; PyTorch maintainers quote
# ~300-400 MB at context creation with lazy module loading (CUDA >= 11.7; pytorch/pytorch#107667,
# #109888), and a training step loads more kernels (cuBLAS, attention, optimizer). 1 GiB is the
# stated conservative default; the cuda backend's estimate_error fields measure the real figure.
DEFAULT_CUDA_CONTEXT_BYTES = 1024 * MiB
CUDA_CONTEXT_SOURCE = (
    "stated conservative default (1 GiB): context creation takes ~300-400 MB with lazy loading "
    "(pytorch/pytorch#107667, #109888), kernels loaded by the step add to it; not measured"
)
# CublasHandlePool.cpp parseChosenWorkspaceSize (torch 2.11/2.13): 32 MiB on compute capability
# 9.x and 10.x-12.x (Hopper, Blackwell: cuBLAS's recommendation), else ":4096:2:16:8" = 2 x 4096 KiB
# + 8 x 16 KiB. CUBLAS_WORKSPACE_CONFIG overrides both.
CUBLAS_WORKSPACE_LARGE = 32 * MiB
CUBLAS_WORKSPACE_DEFAULT = 2 * 4096 * 1024 + 8 * 16 * 1024


class GpuError(ValueError):
    """An unknown GPU name; the message lists the known ones."""


@dataclass(frozen=True)
class GpuSpec:
    """One GPU's figures; throughputs in FLOP/s, bandwidth in bytes/s, memory in bytes.

    ``dense_flops`` maps a math precision (``bf16``, ``fp16``, ``tf32``, ``fp32``) to the
    datasheet's dense peak: tensor cores for bf16/fp16/tf32 (fp16 with fp32 accumulation on
    GeForce parts, where fp16 accumulation would be twice as fast), CUDA cores for fp32.
    """

    key: str
    name: str
    arch: str  # "ampere" | "ada" | "hopper"
    compute_capability: tuple[int, int]
    memory_bytes: int
    bandwidth: float  # DRAM bytes/s
    dense_flops: dict[str, float]
    source: str  # where the figures come from
    # streaming multiprocessors: how many GEMM tiles run at once (the roofline's wave
    # quantization); from NVIDIA's architecture whitepapers (`SM_SOURCE`)
    sms: int = 0
    aliases: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())
    # NVML-used bytes beyond reserved (CUDA context and loaded kernels), when measured for this
    # GPU, with where the figure comes from; None: DEFAULT_CUDA_CONTEXT_BYTES.
    cuda_context_bytes: int | None = None
    cuda_context_source: str | None = None

    @property
    def context_bytes(self) -> int:
        """The CUDA context (and loaded kernels) this GPU's process holds outside the allocator."""
        if self.cuda_context_bytes is None:
            return DEFAULT_CUDA_CONTEXT_BYTES
        return self.cuda_context_bytes

    @property
    def context_source(self) -> str:
        return self.cuda_context_source or CUDA_CONTEXT_SOURCE

    @property
    def cublas_workspace_bytes(self) -> int:
        """One cuBLAS handle's workspace by default on this architecture (parseChosenWorkspaceSize)."""
        major = self.compute_capability[0]
        return CUBLAS_WORKSPACE_LARGE if major in (9, 10, 11, 12) else CUBLAS_WORKSPACE_DEFAULT

    def flops(self, precision: str) -> float:
        """Dense peak FLOP/s of one math precision.

        Raises:
            KeyError: a precision the table does not give (the message lists those it does).
        """
        if precision not in self.dense_flops:
            raise KeyError(
                f"{self.key} has no {precision!r} figure; known: {', '.join(self.dense_flops)}"
            )
        return self.dense_flops[precision]


def _tflops(**figures: float) -> dict[str, float]:
    return {k: v * 1e12 for k, v in figures.items()}


_DATASHEET = "NVIDIA {} datasheet (dense figures: half of the with-sparsity tensor peaks)"
SM_SOURCE = (
    "SM counts: NVIDIA H100 Tensor Core GPU Architecture whitepaper (H100 SXM5 132, PCIe 114; "
    "H200 is the same GH100 SXM part), NVIDIA A100 Tensor Core GPU Architecture whitepaper (108), "
    "NVIDIA Ada GPU Architecture whitepaper (RTX 4090 128; L40S 142, L4 58 per their datasheets), "
    "NVIDIA Ampere GA102 GPU Architecture whitepaper (RTX 3090 82, A10 72)"
)

GPUS: dict[str, GpuSpec] = {
    g.key: g
    for g in (
        GpuSpec(
            key="h100",
            name="NVIDIA H100 SXM5 80GB",
            arch="hopper",
            compute_capability=(9, 0),
            memory_bytes=80 * 10**9,
            bandwidth=3.35e12,
            sms=132,
            dense_flops=_tflops(bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9),
            source=_DATASHEET.format("H100 Tensor Core GPU"),
            aliases=("h100-sxm", "h100-sxm5", "h100-80gb"),
        ),
        GpuSpec(
            key="h100-pcie",
            name="NVIDIA H100 PCIe 80GB",
            arch="hopper",
            compute_capability=(9, 0),
            memory_bytes=80 * 10**9,
            bandwidth=2.0e12,
            sms=114,
            dense_flops=_tflops(bf16=756.5, fp16=756.5, tf32=378.0, fp32=51.2),
            source=_DATASHEET.format("H100 Tensor Core GPU"),
        ),
        GpuSpec(
            key="h200",
            name="NVIDIA H200 SXM 141GB",
            arch="hopper",
            compute_capability=(9, 0),
            memory_bytes=141 * 10**9,
            bandwidth=4.8e12,
            sms=132,
            dense_flops=_tflops(bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9),
            source=_DATASHEET.format("H200 Tensor Core GPU"),
            aliases=("h200-sxm",),
            notes=(
                "measured on a lent H200 in this workplace (REFERENCE.md §5): device-to-device "
                "copy ≈ 4.3 TB/s, 8192³ bf16 matmul 769–798 TFLOP/s on random data",
            ),
        ),
        GpuSpec(
            key="a100-80gb",
            name="NVIDIA A100 SXM4 80GB",
            arch="ampere",
            compute_capability=(8, 0),
            memory_bytes=80 * 10**9,
            bandwidth=2.039e12,
            sms=108,
            dense_flops=_tflops(bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5),
            source=_DATASHEET.format("A100 Tensor Core GPU"),
            aliases=("a100", "a100-80g", "a100-sxm"),
        ),
        GpuSpec(
            key="a100-40gb",
            name="NVIDIA A100 SXM4 40GB",
            arch="ampere",
            compute_capability=(8, 0),
            memory_bytes=40 * 10**9,
            bandwidth=1.555e12,
            sms=108,
            dense_flops=_tflops(bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5),
            source=_DATASHEET.format("A100 Tensor Core GPU"),
            aliases=("a100-40g",),
        ),
        GpuSpec(
            key="l40s",
            name="NVIDIA L40S 48GB",
            arch="ada",
            compute_capability=(8, 9),
            memory_bytes=48 * 10**9,
            bandwidth=0.864e12,
            sms=142,
            dense_flops=_tflops(bf16=362.05, fp16=362.05, tf32=183.0, fp32=91.6),
            source=_DATASHEET.format("L40S GPU"),
        ),
        GpuSpec(
            key="l4",
            name="NVIDIA L4 24GB",
            arch="ada",
            compute_capability=(8, 9),
            memory_bytes=24 * 10**9,
            bandwidth=0.300e12,
            sms=58,
            dense_flops=_tflops(bf16=121.0, fp16=121.0, tf32=60.0, fp32=30.3),
            source=_DATASHEET.format("L4 Tensor Core GPU"),
        ),
        GpuSpec(
            key="a10",
            name="NVIDIA A10 24GB",
            arch="ampere",
            compute_capability=(8, 6),
            memory_bytes=24 * 10**9,
            bandwidth=0.600e12,
            sms=72,
            dense_flops=_tflops(bf16=125.0, fp16=125.0, tf32=62.5, fp32=31.2),
            source=_DATASHEET.format("A10 Tensor Core GPU"),
        ),
        GpuSpec(
            key="rtx4090",
            name="NVIDIA GeForce RTX 4090 24GB",
            arch="ada",
            compute_capability=(8, 9),
            memory_bytes=24 * 10**9,
            bandwidth=1.008e12,
            sms=128,
            dense_flops=_tflops(bf16=165.2, fp16=165.2, tf32=82.6, fp32=82.6),
            source="NVIDIA Ada Lovelace architecture whitepaper (RTX 4090: tensor figures with "
            "fp32 accumulation, dense)",
            aliases=("4090", "rtx-4090"),
        ),
        GpuSpec(
            key="rtx3090",
            name="NVIDIA GeForce RTX 3090 24GB",
            arch="ampere",
            compute_capability=(8, 6),
            memory_bytes=24 * 10**9,
            bandwidth=0.936e12,
            sms=82,
            dense_flops=_tflops(bf16=71.0, fp16=71.0, tf32=35.6, fp32=35.6),
            source="NVIDIA Ampere GA102 GPU architecture whitepaper (RTX 3090: tensor figures "
            "with fp32 accumulation, dense)",
            aliases=("3090", "rtx-3090"),
        ),
    )
}


def _lookup() -> dict[str, str]:
    table = {}
    for key, gpu in GPUS.items():
        for name in (key, *gpu.aliases):
            table[name] = key
    return table


def get_gpu(name: str | None) -> GpuSpec:
    """The GPU named ``name`` (case-insensitive, aliases accepted); None gives `DEFAULT_GPU`.

    Raises:
        GpuError: an unknown name (the message lists the known ones).
    """
    if name is None:
        return GPUS[DEFAULT_GPU]
    key = _lookup().get(name.strip().lower().replace("_", "-").replace(" ", "-"))
    if key is None:
        raise GpuError(f"--gpu {name!r}: unknown GPU; choose one of {', '.join(GPUS)}")
    return GPUS[key]


def gpu_from_device_name(device_name: str) -> GpuSpec | None:
    """The table's entry for a CUDA device name (``torch.cuda.get_device_name()``), if any.

    Matching is by the model number and, where the table has several, the memory size or form
    factor in the name: "NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H100 PCIe" the PCIe one.
    """
    text = device_name.lower()
    if "h200" in text:
        return GPUS["h200"]
    if "h100" in text:
        return GPUS["h100-pcie" if "pcie" in text else "h100"]
    if "a100" in text:
        return GPUS["a100-40gb" if "40gb" in text else "a100-80gb"]
    for key, token in (("l40s", "l40s"), ("l4", " l4"), ("a10", " a10"), ("rtx4090", "4090"),
                       ("rtx3090", "3090")):  # fmt: skip
        if token in text:
            return GPUS[key]
    return None
