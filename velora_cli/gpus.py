"""Facts about the GPUs velora predicts for, in one table: every figure with its source.

The estimate backend runs without a GPU; what it predicts for one (device-level memory, step
time) needs that GPU's figures. They live here, once, for every model that uses them. Peak
throughputs are the vendor's datasheet figures for *dense* math (NVIDIA's headline tensor figures
from Ampere on assume 2:4 sparsity and are twice these; Volta and Turing have no sparsity, so
their headline figures are dense); bandwidth is the datasheet's DRAM bandwidth. Both are upper
bounds that no kernel reaches: models that use them apply their own efficiencies and say so.
Where no vendor table gives a figure, it is derived (SM count x boost clock x the per-SM rate
of that architecture's whitepaper) and the source says so.

Memory is the advertised capacity (datasheet "GB", taken as 10^9 bytes); the driver reports a
little less as usable (ECC, reserved regions), so a budget taken from this table is labelled as
nominal. What CUDA reports (cudaMemGetInfo's total: below the nominal figure on a T4 with ECC,
above it on an A100 or H100 80GB, whose 80 GiB of HBM are more than 80e9 bytes) is
`GpuSpec.total_bytes`, a published reading with its source where one was found;
`GpuSpec.device_total` gives it, or a stated lower figure labelled as not measured. The device
memory model replays the allocator within it, less the CUDA context.

Beyond the caching allocator's segments a training process holds the CUDA context (driver state
and the kernels loaded, lazily since CUDA 11.7) and per-thread cuBLAS workspaces; the latter are
allocated through the caching allocator (``CublasHandlePool.cpp::setWorkspaceForHandle`` calls
``CUDACachingAllocator::get()->allocate``), so they are part of allocated and reserved memory and
the device-memory model places them there (allocator/device_memory.py). Their sizes come from
``parseChosenWorkspaceSize`` (`GpuSpec.cublas_workspace_bytes`); the context comes from
measurements per GPU chip and CUDA version where there are any, else a conservative default
(`GpuSpec.cuda_context`; `GpuSpec.context_bytes` is its figure for a current CUDA).

Also here, because they are facts of a GPU's compute capability: the host link (PCIe) each part
has (`GpuSpec.host_link_bandwidth`, an upper bound for activation offload), which precisions it
runs natively (`check_dtype`), and which fused attention kernels PyTorch's SDPA can pick on it
(`sdpa_backends`). Nothing here imports torch.

Example:
    >>> gpu = get_gpu("h100")
    >>> gpu.name, gpu.flops("bf16") / 1e12
    ('NVIDIA H100 SXM5 80GB', 989.4)
    >>> get_gpu("t4").supports("bf16")
    False
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DEFAULT_GPU = "h100"  # the most common training GPU velora's users rent (stated in --gpu's help)

MiB = 1 << 20
GiB = 1 << 30
GB = 10**9

# CublasHandlePool.cpp parseChosenWorkspaceSize (torch 2.11/2.13): 32 MiB on compute capability
# 9.x and 10.x-12.x (Hopper, Blackwell: cuBLAS's recommendation), else ":4096:2:16:8" = 2 x 4096 KiB
# + 8 x 16 KiB. CUBLAS_WORKSPACE_CONFIG overrides both.
CUBLAS_WORKSPACE_LARGE = 32 * MiB
CUBLAS_WORKSPACE_DEFAULT = 2 * 4096 * 1024 + 8 * 16 * 1024


class GpuError(ValueError):
    """An unknown GPU name (the message lists the known ones), or a request the GPU cannot run."""


class UnsupportedPrecisionError(GpuError):
    """A precision the GPU has no hardware for (bf16 below compute capability 8.0); the message
    is one line naming the flag, the GPU and what to use instead."""


# -- host link ------------------------------------------------------------------------------------
# What activation offload streams over: the GPU's host interface, one direction. Datasheets give
# PCIe as both directions together ("PCIe Gen5: 128GB/s", "PCIe Gen4: 64GB/s", "32 GB/s" for
# Gen3); one direction is half. That is the raw signalling rate (GT/s x lanes / 8): PCIe 3.0 and
# later encode 128b/130b, so at most 98.5% of it carries data (15.75 / 31.5 / 63.0 GB/s for
# x16 Gen3/4/5), and packet headers, DMA setup and the host's memory system take more. Pinned
# (page-locked) host memory copies come closest; pageable copies go through a staging buffer and
# are slower. None of this is measured here: the figure is an upper bound, like the DRAM
# bandwidth, and a model that uses it must apply an efficiency and say so.
PCIE_LINKS: dict[str, float] = {
    "PCIe 3.0 x16": 16 * GB,  # 8 GT/s x 16 lanes / 8
    "PCIe 4.0 x8": 16 * GB,  # 16 GT/s x 8 lanes / 8
    "PCIe 4.0 x16": 32 * GB,  # 16 GT/s x 16 lanes / 8
    "PCIe 5.0 x16": 64 * GB,  # 32 GT/s x 16 lanes / 8
}
HOST_LINK_NOTE = (
    "one direction, the link's raw rate (half the datasheet's both-directions figure); an upper "
    "bound: 128b/130b encoding and packet overheads leave less, pinned-memory copies come "
    "closest, pageable ones are slower; not measured here"
)


def _link(name: str, source: str) -> dict[str, object]:
    return {"host_link": name, "host_link_bandwidth": PCIE_LINKS[name], "host_link_source": source}


# -- CUDA context ---------------------------------------------------------------------------------
# What NVML counts as used beyond the caching allocator's reserved memory: the CUDA context and
# the kernels loaded into it. How many kernels are loaded is the module-loading mode: lazy loading
# came with CUDA 11.7 (off by default) and became the Linux default in CUDA 12.2 (CUDA
# Programming Guide §4.7 "Lazy Loading"); libraries built with an older CUDA runtime load every
# module eagerly. PyTorch sets CUDA_MODULE_LOADING=LAZY itself when unset (CUDAHooks::init, since
# 1.13: pytorch/pytorch#86509, whose test read 287 MB against 667 MB without it).
# velora requires torch >= 2.4, whose CUDA builds use CUDA >= 11.8: lazy unless told otherwise.
LAZY_LOADING_SINCE = (11, 7)
# Where nothing was measured with lazy loading: PyTorch maintainers quote ~300-400 MB at context
# creation with lazy loading (pytorch/pytorch#107667, #109888), and a training step loads more
# kernels (cuBLAS, attention, optimizer). 1 GiB is the stated conservative default; the cuda
# backend's estimate_error fields measure the real figure.
DEFAULT_CUDA_CONTEXT_BYTES = 1024 * MiB
CUDA_CONTEXT_SOURCE = (
    "stated conservative default (1 GiB): context creation takes ~300-400 MB with lazy loading "
    "(pytorch/pytorch#107667, #109888), kernels loaded by the step add to it; not measured"
)
# With eager loading every kernel of torch's CUDA libraries is loaded at context creation, so the
# figure follows the torch build more than the GPU: transformers' guide measured 1343 MiB on a
# V100 and states "1-2GB" for it; the upper end is kept for GPUs not measured (conservative).
EAGER_CONTEXT_BYTES = 2 * GiB


@dataclass(frozen=True)
class ContextMeasurement:
    """One published reading of the memory a process holds outside the allocator."""

    chip: str  # the GPU die: a measurement carries over to parts with the same die
    device_name: str
    cuda: tuple[int, int]  # the CUDA version of the measuring process
    lazy: bool  # module loading: lazy (CUDA >= 11.7 and not CUDA_MODULE_LOADING=EAGER)
    nbytes: int
    when: str
    source: str


CONTEXT_MEASUREMENTS: tuple[ContextMeasurement, ...] = (
    # fitcheck's manifest.json: four Tesla T4 sessions, all cuda_context_mib 140.875 (the rows'
    # measured.cuda_context_mib; final-t4-20260921.json and t4-sweep-2026-09-15.json agree).
    ContextMeasurement(
        chip="TU104",
        device_name="Tesla T4",
        cuda=(12, 8),
        lazy=True,
        nbytes=int(140.875 * MiB),
        when="after a QLoRA/LoRA training step: total - free - reserved",
        source="fitcheck (github Anassbzdd/fitcheck) data/measurements/manifest.json, sessions "
        "t4-2026-09-01/-16/-21: torch 2.10.0+cu128, cuda_context_mib 140.875",
    ),
    ContextMeasurement(
        chip="TU104",
        device_name="Tesla T4",
        cuda=(13, 0),
        lazy=True,
        nbytes=int(140.875 * MiB),
        when="after a QLoRA/LoRA training step: total - free - reserved",
        source="fitcheck (github Anassbzdd/fitcheck) data/measurements/t4-sweep-2026-09-15.json: "
        "torch 2.14.0+cu130, cuda_context_mib 140.875 on all 40 rows",
    ),
    # transformers docs, model_memory_anatomy.md (the "Efficient training on a single GPU" guide
    # of v4.18-4.26): print_gpu_utilization() reads NVML used // 1024**2 after
    # torch.ones((1, 1)).to("cuda"): "GPU memory occupied: 1343 MB"; its nvidia-smi shows Tesla
    # V100-SXM2 16160MiB, driver 460.91.03, "CUDA Version: 11.2" (the driver's; torch's own
    # runtime is at most that, < 11.7: eager loading).
    ContextMeasurement(
        chip="GV100",
        device_name="Tesla V100-SXM2-16GB",
        cuda=(11, 2),
        lazy=False,
        nbytes=1343 * MiB,
        when="at context creation (a 1x1 tensor moved to the GPU), NVML used",
        source="transformers docs model_memory_anatomy.md / perf_train_gpu_one: 'GPU memory "
        "occupied: 1343 MB' on a V100-SXM2 16GB, driver CUDA 11.2",
    ),
)


@dataclass(frozen=True)
class CudaContext:
    """The CUDA context's figure for one GPU and CUDA version, and how much to trust it.

    ``basis`` is ``"measured"`` (the same die, the same module-loading mode and CUDA major
    version, or no version given), ``"extrapolated"`` (a measurement of another configuration,
    named in ``source``) or ``"conservative default"`` (nothing measured applies).
    """

    nbytes: int
    basis: str
    source: str

    @property
    def measured(self) -> bool:
        return self.basis == "measured"


@dataclass(frozen=True)
class DeviceTotal:
    """A GPU's total memory as CUDA reports it, and whether a reading was published
    (``basis`` "measured") or a stated rule gave it ("not measured")."""

    nbytes: int
    basis: str
    source: str


def parse_cuda_version(version: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"12.8"``, ``"12.8.1"`` or ``(12, 8)`` as ``(12, 8)``; None stays None.

    Raises:
        ValueError: a version that is neither (the message shows the form expected).
    """
    if version is None:
        return None
    if isinstance(version, tuple):
        return (int(version[0]), int(version[1]))
    match = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.\d+)?\s*", str(version))
    if match is None:
        raise ValueError(f"CUDA version {version!r}: expected MAJOR.MINOR such as '12.8'")
    return (int(match.group(1)), int(match.group(2)))


def _lazy_loading(cuda: tuple[int, int] | None, module_loading: str | None) -> bool:
    if module_loading is not None:
        mode = module_loading.strip().upper()
        if mode not in ("LAZY", "EAGER"):
            raise ValueError(f"CUDA_MODULE_LOADING {module_loading!r}: expected LAZY or EAGER")
        if mode == "EAGER":
            return False
    return cuda is None or cuda >= LAZY_LOADING_SINCE


def _version(cuda: tuple[int, int]) -> str:
    return f"{cuda[0]}.{cuda[1]}"


# -- the table's record ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuSpec:
    """One GPU's figures; throughputs in FLOP/s, bandwidths in bytes/s, memory in bytes.

    ``dense_flops`` maps a math precision (``bf16``, ``fp16``, ``tf32``, ``fp32``) to the
    datasheet's dense peak: tensor cores for bf16/fp16/tf32 (fp16 with fp32 accumulation on
    GeForce parts, where fp16 accumulation would be twice as fast), CUDA cores for fp32. A
    precision the hardware lacks has no entry: bf16 and tf32 tensor cores came with Ampere
    (compute capability 8.0), so Volta and Turing parts have fp16 and fp32 only.

    Example:
        >>> t4 = get_gpu("t4")
        >>> t4.compute_capability, sorted(t4.dense_flops), t4.host_link
        ((7, 5), ['fp16', 'fp32'], 'PCIe 3.0 x16')
    """

    key: str
    name: str
    arch: str  # "volta" | "turing" | "ampere" | "ada" | "hopper" | "blackwell"
    compute_capability: tuple[int, int]
    memory_bytes: int
    bandwidth: float  # DRAM bytes/s
    dense_flops: dict[str, float]
    source: str  # where the figures come from
    # streaming multiprocessors: how many GEMM tiles run at once (the roofline's wave
    # quantization); from NVIDIA's architecture whitepapers and datasheets (`SM_SOURCE`)
    sms: int = 0
    aliases: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())
    chip: str = ""  # the GPU die: CUDA-context measurements carry over between parts sharing it
    host_link: str | None = None  # e.g. "PCIe 4.0 x16"
    # bytes/s, one direction: an upper bound (`PCIE_LINKS`; `HOST_LINK_NOTE` says why)
    host_link_bandwidth: float | None = None
    host_link_source: str | None = None
    # the device's total memory as CUDA reports it (cudaMemGetInfo's total, torch's
    # ``get_device_properties().total_memory``), where a published reading exists, with its source;
    # None: not measured (`device_total` then applies a stated rule)
    total_bytes: int | None = None
    total_source: str | None = None

    def device_total(self) -> DeviceTotal:
        """The device's memory as CUDA reports it (what the caching allocator and the CUDA context
        share), with where the figure comes from.

        A published reading when the table has one (``basis`` "measured"); else the nominal
        memory times the lowest measured/nominal ratio among the table's measured GPUs (``basis``
        "not measured"): the lower side, so that a fit verdict says "won't fit" earlier rather
        than later.
        """
        if self.total_bytes is not None:
            return DeviceTotal(self.total_bytes, "measured", self.total_source or "")
        ratio, ref = lowest_total_ratio()
        return DeviceTotal(
            int(self.memory_bytes * ratio),
            "not measured",
            f"not measured for {self.name}: nominal {self.memory_bytes / GB:g} GB x {ratio:.4f}, "
            f"the lowest total/nominal ratio among the measured GPUs of this table ({ref}; a "
            "lower capacity is the safe side for a fit verdict)",
        )

    def cuda_context(
        self,
        cuda_version: str | tuple[int, int] | None = None,
        *,
        module_loading: str | None = None,
    ) -> CudaContext:
        """The memory this GPU's training process holds outside the allocator (CUDA context and
        loaded kernels), for a CUDA version, with where the figure comes from.

        Args:
            cuda_version: the CUDA runtime torch was built with (``torch.version.cuda``, e.g.
                ``"12.8"``); None: one that torch >= 2.4 ships (>= 11.8, lazy loading).
            module_loading: ``CUDA_MODULE_LOADING`` if the user set it (``LAZY``/``EAGER``).

        Returns:
            A measured figure for this die in the same loading mode and CUDA major version; else
            one extrapolated from the nearest measurement (labelled "extrapolated from ...");
            else the conservative default, which says that nothing was measured. Unknowns
            resolve upwards: under-predicting memory is the dangerous direction.

        Raises:
            ValueError: an unreadable ``cuda_version`` or ``module_loading``.
        """
        cuda = parse_cuda_version(cuda_version)
        lazy = _lazy_loading(cuda, module_loading)
        mode = "lazy" if lazy else "eager"
        asked = f"CUDA {_version(cuda)}" if cuda else "CUDA not given (taken as >= 11.8)"
        same_die = [m for m in CONTEXT_MEASUREMENTS if m.chip == self.chip and m.lazy == lazy]
        exact = [m for m in same_die if cuda is None or m.cuda[0] == cuda[0]]
        if exact:
            top = max(exact, key=lambda m: m.nbytes)
            versions = ", ".join(_version(m.cuda) for m in exact)
            return CudaContext(
                top.nbytes,
                "measured",
                f"measured on a {top.device_name} (CUDA {versions}, {mode} loading, {top.when}; "
                f"{asked}): " + "; ".join(m.source for m in exact),
            )
        if same_die:
            top = max(same_die, key=lambda m: m.nbytes)
            return CudaContext(
                top.nbytes,
                "extrapolated",
                f"extrapolated from a {top.device_name} on CUDA {_version(top.cuda)} (same die, "
                f"{mode} loading; {asked} not measured): {top.source}",
            )
        if not lazy:
            eager = [m for m in CONTEXT_MEASUREMENTS if not m.lazy]
            ref = max(eager, key=lambda m: m.nbytes)
            return CudaContext(
                max(EAGER_CONTEXT_BYTES, ref.nbytes),
                "extrapolated",
                f"extrapolated from a {ref.device_name} on CUDA {_version(ref.cuda)} "
                f"({ref.nbytes // MiB} MiB, eager loading; {asked}): eager loading loads every "
                "kernel of torch's CUDA libraries, so the figure follows the build more than the "
                "GPU; the transformers guide's stated 1-2GB, upper end kept (conservative): "
                f"{ref.source}",
            )
        return CudaContext(
            DEFAULT_CUDA_CONTEXT_BYTES,
            "conservative default",
            f"not measured for {self.name} ({self.chip or 'die unknown'}) with lazy loading "
            f"({asked}); the {CUDA_CONTEXT_SOURCE}. The only lazy-loading measurement (141 MiB "
            "after a step on a Tesla T4, fitcheck) is not carried to another die: the context "
            "varies with the GPU and with the kernels a workload loads",
        )

    @property
    def context_bytes(self) -> int:
        """The CUDA context (and loaded kernels) this GPU's process holds outside the allocator,
        for a current CUDA (`cuda_context` with no version)."""
        return self.cuda_context().nbytes

    @property
    def context_source(self) -> str:
        return self.cuda_context().source

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

    def supports(self, precision: str) -> bool:
        """Whether the hardware runs ``precision`` (``fp32``, ``tf32``, ``fp16``, ``bf16``) natively.

        bf16 and tf32 need compute capability 8.0 (Ampere): torch's
        ``torch.cuda.is_bf16_supported(including_emulation=False)`` is ``major >= 8``; below it
        bf16 tensors can be created but no tensor core computes in bf16.

        Raises:
            ValueError: an unknown precision (the message lists the known ones).
        """
        if precision not in PRECISION_MIN_CC:
            raise ValueError(
                f"precision {precision!r}: choose one of {', '.join(PRECISION_MIN_CC)}"
            )
        return self.compute_capability >= PRECISION_MIN_CC[precision]


# bf16 and tf32 tensor cores: NVIDIA A100 Tensor Core GPU Architecture whitepaper (new in Ampere);
# torch.cuda.is_bf16_supported(including_emulation=False) (torch 2.13): major >= 8.
PRECISION_MIN_CC: dict[str, tuple[int, int]] = {
    "fp32": (0, 0),
    "fp16": (5, 3),  # native half arithmetic; tensor cores from 7.0
    "tf32": (8, 0),
    "bf16": (8, 0),
}


def _tflops(**figures: float) -> dict[str, float]:
    return {k: v * 1e12 for k, v in figures.items()}


_DATASHEET = "NVIDIA {} datasheet (dense figures: half of the with-sparsity tensor peaks)"
_GEFORCE_DERIVED = (
    "derived: {sms} SMs x {clock} GHz boost (NVIDIA's {card} specifications) x the {arch} "
    "per-SM rates of GeForce parts ({whitepaper}: 512 dense fp16 FLOP/clock/SM with fp32 "
    "accumulation, 256 fp32 FLOP/clock/SM){check}; no NVIDIA table gives it"
)
SM_SOURCE = (
    "SM counts: NVIDIA H100 Tensor Core GPU Architecture whitepaper (H100 SXM5 132, PCIe 114; "
    "H200 is the same GH100 SXM part), NVIDIA A100 Tensor Core GPU Architecture whitepaper (108), "
    "NVIDIA Ada GPU Architecture whitepaper (RTX 4090 128, RTX 4080 76; L40S 142, L4 58 per their "
    "datasheets), NVIDIA Ampere GA102 GPU Architecture whitepaper (RTX 3090 82, RTX 3080 68, A10 "
    "72, RTX A6000 84), NVIDIA Tesla V100 GPU Architecture whitepaper (V100 80), NVIDIA Turing "
    "GPU Architecture whitepaper (T4: 2560 CUDA cores / 64 per Turing SM = 40), NVIDIA RTX "
    "Blackwell GPU Architecture whitepaper (RTX 5090 170); from CUDA cores / 128 per SM on "
    "NVIDIA's spec pages: RTX 3060 28, RTX 4060 Ti 34, RTX 4070 46, RTX 6000 Ada 142; A10G 80 "
    "(AWS EC2 G5: 320 Tensor Cores, 4 per SM); B200 148 (CUDA device query quoted in "
    "pytorch/ao#4002: NVIDIA publishes no per-GPU SM count for it)"
)

# torch's OOM message on an H100 80GB (form factor not stated): "GPU 0 has a total capacity of
# 79.11 GiB" (github vllm-project/vllm#27508); the lowest total that prints so is taken. It is
# carried to the PCIe part, whose HBM is the same 80 GB.
_TOTAL_H100 = int(79.105 * GiB)
_TOTAL_H100_SOURCE = (
    "torch's OOM message 'GPU 0 has a total capacity of 79.11 GiB' on an H100 80GB (github "
    "vllm-project/vllm#27508; form factor not stated); the lowest total that prints as 79.11 "
    "(79.105 GiB) is taken. nvidia-smi's 81559MiB total (modal-labs/modal-client#2797) is not what "
    "CUDA reports"
)

GPUS: dict[str, GpuSpec] = {
    g.key: g
    for g in (
        GpuSpec(
            key="h100",
            name="NVIDIA H100 SXM5 80GB",
            arch="hopper",
            compute_capability=(9, 0),
            memory_bytes=80 * GB,
            bandwidth=3.35e12,
            sms=132,
            dense_flops=_tflops(bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9),
            source=_DATASHEET.format("H100 Tensor Core GPU"),
            aliases=("h100-sxm", "h100-sxm5", "h100-80gb"),
            chip="GH100",
            total_bytes=_TOTAL_H100,
            total_source=_TOTAL_H100_SOURCE,
            **_link("PCIe 5.0 x16", "H100 datasheet: 'PCIe Gen5: 128GB/s' (both directions)"),
        ),
        GpuSpec(
            key="h100-pcie",
            name="NVIDIA H100 PCIe 80GB",
            arch="hopper",
            compute_capability=(9, 0),
            memory_bytes=80 * GB,
            bandwidth=2.0e12,
            sms=114,
            dense_flops=_tflops(bf16=756.5, fp16=756.5, tf32=378.0, fp32=51.2),
            source=_DATASHEET.format("H100 Tensor Core GPU"),
            chip="GH100",
            total_bytes=_TOTAL_H100,
            total_source=_TOTAL_H100_SOURCE,
            **_link("PCIe 5.0 x16", "H100 datasheet: 'PCIe Gen5: 128GB/s' (both directions)"),
        ),
        GpuSpec(
            key="h200",
            name="NVIDIA H200 SXM 141GB",
            arch="hopper",
            compute_capability=(9, 0),
            memory_bytes=141 * GB,
            bandwidth=4.8e12,
            sms=132,
            dense_flops=_tflops(bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9),
            source=_DATASHEET.format("H200 Tensor Core GPU"),
            aliases=("h200-sxm",),
            notes=(
                "measured on a lent H200 in this workplace (REFERENCE.md §5): device-to-device "
                "copy ≈ 4.3 TB/s, 8192³ bf16 matmul 769–798 TFLOP/s on random data",
            ),
            chip="GH100",
            **_link("PCIe 5.0 x16", "H200 datasheet: 'PCIe Gen5: 128GB/s' (both directions)"),
        ),
        GpuSpec(
            key="b200",
            name="NVIDIA B200 180GB",
            arch="blackwell",
            compute_capability=(10, 0),
            memory_bytes=180 * GB,
            bandwidth=7.7e12,
            sms=148,
            dense_flops=_tflops(bf16=2250.0, fp16=2250.0, tf32=1100.0, fp32=75.0),
            source="NVIDIA HGX B200 specifications, per GPU (preliminary): FP16/BF16 4.5 PFLOPS "
            "and TF32 2.2 PFLOPS with sparsity (dense: half), FP32 75 TFLOPS, 180GB HBM3E at "
            "7.7TB/s",
            aliases=("b200-sxm", "hgx-b200", "nvidia-b200"),
            notes=(
                "announced as 192 GB; HGX B200 systems expose 180 GB per GPU (the table's figure)",
            ),
            chip="GB100",
            **_link("PCIe 5.0 x16", "HGX B200 specifications: 'PCIe Gen5: 128GB/s'"),
        ),
        GpuSpec(
            key="a100-80gb",
            name="NVIDIA A100 SXM4 80GB",
            arch="ampere",
            compute_capability=(8, 0),
            memory_bytes=80 * GB,
            bandwidth=2.039e12,
            sms=108,
            dense_flops=_tflops(bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5),
            source=_DATASHEET.format("A100 Tensor Core GPU"),
            aliases=("a100", "a100-80g", "a100-sxm"),
            chip="GA100",
            total_bytes=int(79.135 * GiB),
            total_source="torch's OOM message 'GPU 0 has a total capacity of 79.14 GiB' on an A100 "
            "80GB (github lianqi1008/Control-GIC#6); the lowest total that prints as 79.14 "
            "(79.135 GiB) is taken. Others agree: mixbench on an A100 80GB PCIe, driver 12.3, "
            "'Total global mem: 81049 MB' (= 79.15 GiB; ekondis/mixbench#47); '79.25 GiB total "
            "capacity' (levihsu/OOTDiffusion#235). nvidia-smi's 81920MiB total (modal-labs/"
            "modal-client#2797) is not what CUDA reports",
            **_link("PCIe 4.0 x16", "A100 datasheet: 'PCIe Gen4: 64 GB/s' (both directions)"),
        ),
        GpuSpec(
            key="a100-40gb",
            name="NVIDIA A100 SXM4 40GB",
            arch="ampere",
            compute_capability=(8, 0),
            memory_bytes=40 * GB,
            bandwidth=1.555e12,
            sms=108,
            dense_flops=_tflops(bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5),
            source=_DATASHEET.format("A100 Tensor Core GPU"),
            aliases=("a100-40g",),
            chip="GA100",
            total_bytes=42_298_834_944,
            total_source="deviceQuery on an A100-SXM4-40GB, driver 12.2: 'Total amount of global "
            "memory: 40339 MBytes (42298834944 bytes)' (github bottlerocket-os/bottlerocket#3873)",
            **_link("PCIe 4.0 x16", "A100 datasheet: 'PCIe Gen4: 64 GB/s' (both directions)"),
        ),
        GpuSpec(
            key="l40s",
            name="NVIDIA L40S 48GB",
            arch="ada",
            compute_capability=(8, 9),
            memory_bytes=48 * GB,
            bandwidth=0.864e12,
            sms=142,
            dense_flops=_tflops(bf16=362.05, fp16=362.05, tf32=183.0, fp32=91.6),
            source=_DATASHEET.format("L40S GPU"),
            chip="AD102",
            total_bytes=int(44.415 * GiB),
            total_source="torch's OOM message 'GPU has a total capacity of 44.42 GiB' on 8 x L40S "
            "(github stepfun-ai/Step-Video-T2V#8); the lowest total that prints as 44.42 "
            "(44.415 GiB) is taken",
            **_link("PCIe 4.0 x16", "L40S datasheet: 'PCIe Gen4 x16: 64GB/s bidirectional'"),
        ),
        GpuSpec(
            key="l4",
            name="NVIDIA L4 24GB",
            arch="ada",
            compute_capability=(8, 9),
            memory_bytes=24 * GB,
            bandwidth=0.300e12,
            sms=58,
            dense_flops=_tflops(bf16=121.0, fp16=121.0, tf32=60.0, fp32=30.3),
            source=_DATASHEET.format("L4 Tensor Core GPU"),
            chip="AD104",
            **_link("PCIe 4.0 x16", "L4 datasheet: 'PCIe Gen4 x16 64GB/s'"),
        ),
        GpuSpec(
            key="a10",
            name="NVIDIA A10 24GB",
            arch="ampere",
            compute_capability=(8, 6),
            memory_bytes=24 * GB,
            bandwidth=0.600e12,
            sms=72,
            dense_flops=_tflops(bf16=125.0, fp16=125.0, tf32=62.5, fp32=31.2),
            source=_DATASHEET.format("A10 Tensor Core GPU"),
            chip="GA102",
            **_link("PCIe 4.0 x16", "A10 datasheet: 'PCIe Gen4: 64GB/s'"),
        ),
        GpuSpec(
            key="a10g",
            name="NVIDIA A10G 24GB",
            arch="ampere",
            compute_capability=(8, 6),
            memory_bytes=24 * GB,
            bandwidth=0.600e12,
            sms=80,
            dense_flops=_tflops(bf16=70.0, fp16=70.0, tf32=35.0, fp32=35.0),
            source="no NVIDIA datasheet (an AWS-only part): AWS EC2 G5 documentation for 24 GB "
            "and 320 Tensor Cores (80 SMs); 600 GB/s and the dense throughputs (tensor at half "
            "the A10's per-SM rate, GeForce-like; fp32 80 SMs x 256 x 1.71 GHz) as tabulated in "
            "Baseten's 'NVIDIA A10 vs A10G for ML model inference' — derived, not vendor figures",
            aliases=("nvidia-a10g", "a10g-24gb"),
            chip="GA102",
            **_link(
                "PCIe 4.0 x16",
                "assumed as the A10's (same GA102 PCIe board); AWS does not state it",
            ),
        ),
        GpuSpec(
            key="a6000",
            name="NVIDIA RTX A6000 48GB",
            arch="ampere",
            compute_capability=(8, 6),
            memory_bytes=48 * GB,
            bandwidth=0.768e12,
            sms=84,
            dense_flops=_tflops(bf16=154.8, fp16=154.8, tf32=77.4, fp32=38.7),
            source="NVIDIA RTX A6000 datasheet (tensor 309.7 TFLOPS with sparsity, 38.7 TFLOPS "
            "fp32) and the Ampere GA102 GPU architecture whitepaper v2.0, appendix C (dense: "
            "half; the professional part accumulates fp32 at full rate)",
            aliases=("rtx-a6000", "rtxa6000", "a6000-48gb"),
            chip="GA102",
            **_link("PCIe 4.0 x16", "RTX A6000 datasheet: 'PCI Express Gen 4 x 16'"),
        ),
        GpuSpec(
            key="rtx6000-ada",
            name="NVIDIA RTX 6000 Ada Generation 48GB",
            arch="ada",
            compute_capability=(8, 9),
            memory_bytes=48 * GB,
            bandwidth=0.960e12,
            sms=142,
            dense_flops=_tflops(bf16=364.2, fp16=364.2, tf32=182.1, fp32=91.1),
            source="NVIDIA RTX 6000 Ada Generation datasheet (tensor 1,457 TFLOPS = fp8 with "
            "sparsity: dense fp16/bf16 a quarter, tf32 an eighth; fp32 91.1 TFLOPS; the "
            "professional part accumulates fp32 at full rate, as the L40S on the same die)",
            aliases=("rtx-6000-ada", "6000-ada", "rtx6000ada", "rtx-6000-ada-generation"),
            chip="AD102",
            **_link("PCIe 4.0 x16", "RTX 6000 Ada Generation datasheet: 'PCIe 4.0 x16'"),
        ),
        GpuSpec(
            key="v100-16gb",
            name="NVIDIA Tesla V100 SXM2 16GB",
            arch="volta",
            compute_capability=(7, 0),
            memory_bytes=16 * GB,
            bandwidth=0.900e12,
            sms=80,
            dense_flops=_tflops(fp16=125.0, fp32=15.7),
            source="NVIDIA Tesla V100 datasheet (SXM2: 125 tensor TFLOPS, fp16 multiply with fp32 "
            "accumulate, dense: Volta has no sparsity; 15.7 TFLOPS fp32); no bf16 or tf32 "
            "tensor cores before Ampere",
            # "v100" means the 16 GB part: the smaller memory, so a plan checked against it
            # also fits the 32 GB one (their throughputs are the same)
            aliases=("v100", "v100-16g", "v100-sxm2", "v100-sxm2-16gb", "tesla-v100"),
            chip="GV100",
            total_bytes=int(15.775 * GiB),
            total_source="torch's OOM message '15.78 GiB total capacity' on a 16G V100 (github "
            "kchengiva/Shift-GCN#34); the lowest total that prints as 15.78 (15.775 GiB) is taken",
            **_link(
                "PCIe 3.0 x16",
                "NVIDIA Tesla V100 GPU architecture whitepaper: GV100's host "
                "interface is PCIe Gen3 (the V100 datasheet's 'PCIe 32 GB/s', both directions); "
                "NVLink 300 GB/s joins GPUs, not the host",
            ),
        ),
        GpuSpec(
            key="v100-32gb",
            name="NVIDIA Tesla V100 SXM2 32GB",
            arch="volta",
            compute_capability=(7, 0),
            memory_bytes=32 * GB,
            bandwidth=0.900e12,
            sms=80,
            dense_flops=_tflops(fp16=125.0, fp32=15.7),
            source="NVIDIA Tesla V100 datasheet (SXM2: 125 tensor TFLOPS, fp16 multiply with fp32 "
            "accumulate, dense: Volta has no sparsity; 15.7 TFLOPS fp32); no bf16 or tf32 "
            "tensor cores before Ampere",
            aliases=("v100-32g", "v100-sxm2-32gb"),
            chip="GV100",
            total_bytes=int(31.735 * GiB),
            total_source="torch's OOM message '31.74 GiB total capacity' on a V100 32GB (github "
            "liucongg/ChatGLM-Finetuning#73); the lowest total that prints as 31.74 (31.735 GiB) "
            "is taken",
            **_link(
                "PCIe 3.0 x16",
                "NVIDIA Tesla V100 GPU architecture whitepaper: GV100's host "
                "interface is PCIe Gen3 (the V100 datasheet's 'PCIe 32 GB/s', both directions); "
                "NVLink 300 GB/s joins GPUs, not the host",
            ),
        ),
        GpuSpec(
            key="t4",
            name="NVIDIA T4 16GB",
            arch="turing",
            compute_capability=(7, 5),
            memory_bytes=16 * GB,
            bandwidth=0.320e12,
            sms=40,
            dense_flops=_tflops(fp16=65.0, fp32=8.1),
            source="NVIDIA T4 Tensor Core GPU datasheet (65 TFLOPS 'mixed precision (FP16/FP32)', "
            "dense: Turing has no sparsity; 8.1 TFLOPS fp32; 320 GB/s); no bf16 or tf32 tensor "
            "cores before Ampere",
            aliases=("tesla-t4", "nvidia-t4", "t4-16gb"),
            notes=("the driver reports 14,912 MiB usable with ECC on (fitcheck's T4 sessions)",),
            chip="TU104",
            total_bytes=15_636_365_312,
            total_source="fitcheck (github Anassbzdd/fitcheck) data/measurements: gpu_total_bytes "
            "15636365312 (torch total_memory, ECC on; validation/published/fitcheck_t4.json)",
            **_link("PCIe 3.0 x16", "T4 datasheet: 'x16 PCIe Gen3'"),
        ),
        GpuSpec(
            key="rtx5090",
            name="NVIDIA GeForce RTX 5090 32GB",
            arch="blackwell",
            compute_capability=(12, 0),
            memory_bytes=32 * GB,
            bandwidth=1.792e12,
            sms=170,
            dense_flops=_tflops(bf16=209.5, fp16=209.5, tf32=104.8, fp32=104.8),
            source="NVIDIA RTX Blackwell GPU architecture whitepaper (RTX 5090: tensor figures "
            "with fp32 accumulation, dense; fp32 170 SMs x 128 x 2 x 2.407 GHz)",
            aliases=("5090", "rtx-5090"),
            chip="GB202",
            **_link("PCIe 5.0 x16", "NVIDIA GeForce RTX 5090 specifications: PCIe Gen 5"),
        ),
        GpuSpec(
            key="rtx4090",
            name="NVIDIA GeForce RTX 4090 24GB",
            arch="ada",
            compute_capability=(8, 9),
            memory_bytes=24 * GB,
            bandwidth=1.008e12,
            sms=128,
            dense_flops=_tflops(bf16=165.2, fp16=165.2, tf32=82.6, fp32=82.6),
            source="NVIDIA Ada Lovelace architecture whitepaper (RTX 4090: tensor figures with "
            "fp32 accumulation, dense)",
            aliases=("4090", "rtx-4090"),
            chip="AD102",
            total_bytes=int(23.635 * GiB),
            total_source="torch's OOM message 'GPU 0 has a total capacty of 23.64 GiB' on an RTX "
            "4090 (github 3DTopia/Phidias-Diffusion#8; zai-org/CogVideo#36 read 23.68 GiB); the "
            "lowest total that prints as 23.64 (23.635 GiB) is taken",
            **_link("PCIe 4.0 x16", "NVIDIA GeForce RTX 4090 specifications: PCIe Gen 4"),
        ),
        GpuSpec(
            key="rtx4080",
            name="NVIDIA GeForce RTX 4080 16GB",
            arch="ada",
            compute_capability=(8, 9),
            memory_bytes=16 * GB,
            bandwidth=0.7168e12,
            sms=76,
            dense_flops=_tflops(bf16=97.5, fp16=97.5, tf32=48.7, fp32=48.7),
            source="NVIDIA Ada Lovelace architecture whitepaper (RTX 4080 16GB: tensor figures "
            "with fp32 accumulation, dense; 22.4 Gbps x 256 bits = 716.8 GB/s)",
            aliases=("4080", "rtx-4080"),
            chip="AD103",
            **_link("PCIe 4.0 x16", "NVIDIA GeForce RTX 4080 specifications: PCIe Gen 4"),
        ),
        GpuSpec(
            key="rtx4070",
            name="NVIDIA GeForce RTX 4070 12GB",
            arch="ada",
            compute_capability=(8, 9),
            memory_bytes=12 * GB,
            bandwidth=0.504e12,
            sms=46,
            dense_flops=_tflops(bf16=58.3, fp16=58.3, tf32=29.1, fp32=29.1),
            source=_GEFORCE_DERIVED.format(
                sms=46,
                clock=2.475,
                card="GeForce RTX 4070",
                arch="Ada",
                whitepaper="Ada whitepaper: RTX 4090 165.2 TFLOPS / (128 SMs x 2.52 GHz)",
                check="; agrees with NVIDIA's 466 'AI TOPS' (fp8, sparse) / 8",
            ),
            aliases=("4070", "rtx-4070"),
            chip="AD104",
            **_link("PCIe 4.0 x16", "NVIDIA GeForce RTX 4070 specifications: PCIe Gen 4"),
        ),
        GpuSpec(
            key="rtx4060ti",
            name="NVIDIA GeForce RTX 4060 Ti 16GB",
            arch="ada",
            compute_capability=(8, 9),
            memory_bytes=16 * GB,
            bandwidth=0.288e12,
            sms=34,
            dense_flops=_tflops(bf16=44.1, fp16=44.1, tf32=22.1, fp32=22.1),
            source=_GEFORCE_DERIVED.format(
                sms=34,
                clock=2.535,
                card="GeForce RTX 4060 Ti",
                arch="Ada",
                whitepaper="Ada whitepaper: RTX 4090 165.2 TFLOPS / (128 SMs x 2.52 GHz)",
                check="; agrees with NVIDIA's 353 'AI TOPS' (fp8, sparse) / 8",
            ),
            aliases=(
                "4060ti",
                "4060-ti",
                "rtx-4060-ti",
                "rtx4060-ti",
                "rtx4060ti-16gb",
                "4060-ti-16gb",
                "rtx-4060-ti-16gb",
            ),
            notes=("an 8 GB RTX 4060 Ti has the same device name, SMs and bandwidth",),
            chip="AD106",
            # x8, not x16: half the host bandwidth of the other cards of its generation
            **_link("PCIe 4.0 x8", "NVIDIA GeForce RTX 4060 Ti specifications: PCIe 4.0 x8"),
        ),
        GpuSpec(
            key="rtx3090",
            name="NVIDIA GeForce RTX 3090 24GB",
            arch="ampere",
            compute_capability=(8, 6),
            memory_bytes=24 * GB,
            bandwidth=0.936e12,
            sms=82,
            dense_flops=_tflops(bf16=71.0, fp16=71.0, tf32=35.6, fp32=35.6),
            source="NVIDIA Ampere GA102 GPU architecture whitepaper (RTX 3090: tensor figures "
            "with fp32 accumulation, dense)",
            aliases=("3090", "rtx-3090"),
            chip="GA102",
            **_link("PCIe 4.0 x16", "Ampere GA102 GPU architecture whitepaper: PCIe Gen 4"),
        ),
        GpuSpec(
            key="rtx3080",
            name="NVIDIA GeForce RTX 3080 10GB",
            arch="ampere",
            compute_capability=(8, 6),
            memory_bytes=10 * GB,
            bandwidth=0.760e12,
            sms=68,
            dense_flops=_tflops(bf16=59.5, fp16=59.5, tf32=29.8, fp32=29.8),
            source="NVIDIA Ampere GA102 GPU architecture whitepaper (RTX 3080: tensor figures "
            "with fp32 accumulation, dense; 19 Gbps x 320 bits = 760 GB/s)",
            aliases=("3080", "rtx-3080", "rtx3080-10gb", "3080-10gb"),
            notes=(
                "the 12 GB RTX 3080 (70 SMs, 912 GB/s) has the same device name: "
                "gpu_from_device_name tells them apart only by total memory",
            ),
            chip="GA102",
            **_link("PCIe 4.0 x16", "Ampere GA102 GPU architecture whitepaper: PCIe Gen 4"),
        ),
        GpuSpec(
            key="rtx3060",
            name="NVIDIA GeForce RTX 3060 12GB",
            arch="ampere",
            compute_capability=(8, 6),
            memory_bytes=12 * GB,
            bandwidth=0.360e12,
            sms=28,
            dense_flops=_tflops(bf16=25.5, fp16=25.5, tf32=12.7, fp32=12.7),
            source=_GEFORCE_DERIVED.format(
                sms=28,
                clock=1.777,
                card="GeForce RTX 3060",
                arch="Ampere GA10x",
                whitepaper="GA102 whitepaper: RTX 3090 71 TFLOPS / (82 SMs x 1.695 GHz)",
                check="; 15 Gbps x 192 bits = 360 GB/s",
            ),
            aliases=("3060", "rtx-3060", "rtx3060-12gb", "3060-12gb"),
            notes=(
                "the 8 GB RTX 3060 (128-bit, 240 GB/s) has the same device name: "
                "gpu_from_device_name tells them apart only by total memory",
            ),
            chip="GA106",
            **_link("PCIe 4.0 x16", "NVIDIA GeForce RTX 3060 specifications: PCIe Gen 4"),
        ),
    )
}


def _lookup() -> dict[str, str]:
    table: dict[str, str] = {}
    for key, gpu in GPUS.items():
        for name in (key, *gpu.aliases):
            assert table.setdefault(name, key) == key, f"{name!r} names {table[name]} and {key}"
    return table


def lowest_total_ratio() -> tuple[float, str]:
    """The lowest measured total / nominal memory among the table's GPUs, and which GPU it is
    (`GpuSpec.device_total`'s rule for a GPU without a reading)."""
    measured = [g for g in GPUS.values() if g.total_bytes is not None]
    gpu = min(measured, key=lambda g: g.total_bytes / g.memory_bytes)
    return gpu.total_bytes / gpu.memory_bytes, f"{gpu.name}: {gpu.total_bytes:,} B measured"


def get_gpu(name: str | None) -> GpuSpec:
    """The GPU named ``name`` (case-insensitive, aliases accepted, or a CUDA device name such as
    ``"NVIDIA GeForce RTX 3060"``); None gives `DEFAULT_GPU`.

    Raises:
        GpuError: an unknown name (the message lists the known ones).
    """
    if name is None:
        return GPUS[DEFAULT_GPU]
    key = _lookup().get(name.strip().lower().replace("_", "-").replace(" ", "-"))
    if key is not None:
        return GPUS[key]
    gpu = gpu_from_device_name(name)
    if gpu is None:
        raise GpuError(f"--gpu {name!r}: unknown GPU; choose one of {', '.join(GPUS)}")
    return gpu


# -- CUDA device names ----------------------------------------------------------------------------
# torch.cuda.get_device_name() strings, lower-cased with "-" and "_" as spaces. Whole-word
# patterns: "a10" must not match "a100"/"a10g", "l4" not "l40", "a100" not "RTX A1000", "b200"
# not "GB200", "h200" not "GH200". Checked in order; the first match decides.
_DEVICE_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bh200\b", "h200"),
    (r"\bh100\b.*\bpcie\b", "h100-pcie"),
    (r"\bh100\b", "h100"),
    (r"\bb200\b", "b200"),
    (r"\ba100\b.*\b40gb\b", "a100-40gb"),
    (r"\ba100\b", "a100-80gb"),
    (r"\bl40s\b", "l40s"),
    (r"\bl4\b", "l4"),
    (r"\ba10g\b", "a10g"),
    (r"\ba10\b", "a10"),
    (r"\brtx a6000\b", "a6000"),
    (r"\brtx 6000 ada\b", "rtx6000-ada"),
    # SXM2 (and the DGX Station's DGXS) only: V100 PCIe boards and the V100S have other peaks
    (r"\bv100 (?:sxm2|dgxs)\b.*\b32gb\b", "v100-32gb"),
    (r"\bv100 (?:sxm2|dgxs)\b", "v100-16gb"),
    (r"\bt4\b", "t4"),
)
# GeForce: "NVIDIA GeForce RTX 4060 Ti" -> ("4060", "ti"); Ti/SUPER/D variants and laptop parts
# of other numbers are different GPUs and map to nothing.
_GEFORCE = {
    ("5090", ""): "rtx5090",
    ("4090", ""): "rtx4090",
    ("4080", ""): "rtx4080",
    ("4070", ""): "rtx4070",
    ("4060", "ti"): "rtx4060ti",
    ("3090", ""): "rtx3090",
    ("3080", ""): "rtx3080",
    ("3060", ""): "rtx3060",
}
# A name's part is confirmed by total memory when given: the driver reports a little less or a
# little more than the nominal capacity (T4 14,912 MiB of "16 GB"; A100 "40GB" is 40 GiB).
_MEMORY_TOLERANCE = (0.85, 1.2)


def gpu_from_device_name(device_name: str, total_memory: int | None = None) -> GpuSpec | None:
    """The table's entry for a CUDA device name (``torch.cuda.get_device_name()``), if any.

    Matching is by whole model names and, where the table has several, the memory size or form
    factor in the name: "NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H100 PCIe" the PCIe one,
    "Tesla V100-SXM2-32GB" the 32 GB V100. Parts the table does not have map to nothing rather
    than to a neighbour: "NVIDIA L40", "NVIDIA GH200 480GB", "Tesla V100-PCIE-16GB",
    "NVIDIA GeForce RTX 3060 Ti", "NVIDIA GeForce RTX 4090 Laptop GPU".

    Args:
        device_name: what torch reports.
        total_memory: ``torch.cuda.get_device_properties().total_memory`` if known; a match whose
            nominal memory disagrees (an 8 GB RTX 3060 under the 12 GB entry's name) is dropped.
    """
    text = " ".join(re.sub(r"[-_]", " ", device_name.lower()).split())
    if re.search(r"\b(?:laptop|mobile|max q)\b", text):
        return None
    key = next((k for pattern, k in _DEVICE_PATTERNS if re.search(pattern, text)), None)
    if key is None:
        match = re.search(r"\brtx (\d{4})((?: (?:ti|super|d))*)\b", text)
        if match:
            key = _GEFORCE.get((match.group(1), match.group(2).strip()))
    if key is None:
        return None
    gpu = GPUS[key]
    if total_memory is not None:
        low, high = _MEMORY_TOLERANCE
        if not low * gpu.memory_bytes <= total_memory <= high * gpu.memory_bytes:
            return None
    return gpu


# -- precisions -----------------------------------------------------------------------------------
_PRECISION_NAMES = {"bf16": "bfloat16", "tf32": "TF32", "fp16": "float16", "fp32": "float32"}
# what to use instead, per flag, when the GPU lacks the precision asked for
_INSTEAD = {
    ("--dtype", "bf16"): "use --dtype fp16 or --amp fp16",
    ("--amp", "bf16"): "use --amp fp16",
}


def check_dtype(gpu: GpuSpec, dtype: str | None, *, flag: str = "--dtype") -> None:
    """Refuse a precision ``gpu`` has no hardware for, naming what to use instead.

    Args:
        gpu: the GPU the run or the estimate is for.
        dtype: the precision asked for (``fp32``, ``fp16``, ``bf16``); None checks nothing.
        flag: the option it came from, for the message (``--dtype`` or ``--amp``).

    Raises:
        UnsupportedPrecisionError: e.g. ``--dtype bf16: NVIDIA T4 16GB (compute capability 7.5)
            has no bfloat16 support (it needs 8.0 or newer); use --dtype fp16 or --amp fp16``.
        ValueError: an unknown precision (the message lists the known ones).
    """
    if dtype is None or gpu.supports(dtype):
        return
    major, minor = gpu.compute_capability
    need = ".".join(map(str, PRECISION_MIN_CC[dtype]))
    instead = _INSTEAD.get((flag, dtype), "use fp16 or fp32")
    raise UnsupportedPrecisionError(
        f"{flag} {dtype}: {gpu.name} (compute capability {major}.{minor}) has no "
        f"{_PRECISION_NAMES[dtype]} support (it needs {need} or newer); {instead}"
    )


# -- SDPA backends --------------------------------------------------------------------------------
# Which kernel torch.nn.functional.scaled_dot_product_attention runs on a CUDA GPU, from PyTorch's
# aten/src/ATen/native/transformers/cuda/sdp_utils.cpp as stored at pytorch/pytorch commit
# 001f694a (main, 2026: later than the cuDNN-SDPA changes of PR #171627; not pinned to a release),
# with the default order and the shared checks confirmed in torch 2.13.0's installed headers
# (ATen/Context.h ``sdp_priority_order``; ATen/native/transformers/sdp_utils_cpp.h).
# select_sdp_backend walks priority_order() and returns the first backend whose can_use_* passes.
# The default order is flash, efficient, math, cudnn (Context.h): cuDNN comes after math, which
# always passes, so it is reached only when check_prefer_cudnn_attention() moves it first
# (sm90/sm100/sm103, cuDNN > 9.15.0, TORCH_CUDNN_SDPA_DEPRIORITIZED unset).
SDPA_DEFAULT_ORDER = ("flash_attention", "efficient_attention", "math", "cudnn_attention")
SDPA_CUDNN_ORDER = ("cudnn_attention", "flash_attention", "efficient_attention", "math")
# The torch release whose SDPA choice is modelled: the installed one (2.13.0). Two facts differ
# between releases and are keyed on it:
# - Grouped-query attention (enable_gqa, Hkv < Hq) in the memory-efficient kernel. torch 2.13's
#   dense check is `check_batch_size_and_num_heads_dense<supports_gqa, requires_same_num_heads>`
#   (its installed ATen/native/transformers/sdp_utils_cpp.h). Before pytorch#191085 the
#   efficient kernel instantiated it without GQA: `check_batch_size_and_num_heads_dense<false
#   /*supports_grouped_query_attention=*/>` (an older stored sdp_utils.cpp; 2.13's own .cpp is not
#   in the CPU wheel and was not read), so with enable_gqa and Hkv < Hq it fails on "For dense
#   input, both fused kernels require query, key and value to have the same num_heads".
#   pytorch#191085 ("[SDPA] Add memory-efficient GQA",
#   opened 2026-07-25, after 2.13's branch cut; the 2.13 compatibility row is pytorch#187075 of
#   2026-06-11) made it `constexpr bool supports_gqa = true;` on CUDA with a third template
#   argument (supports_mqa) that 2.13's header does not have: stored main @001f694a. Seen on a
#   T4 with torch 2.10 (transformers#48633, fitcheck's scripts/measure.py shim): enable_gqa ->
#   MATH, K/V repeated first -> EFFICIENT_ATTENTION.
# - The cuDNN its CUDA wheels ship (check_prefer_cudnn_attention reads the runtime version):
#   RELEASE.md's 2.13 row (pytorch#187075): CUDA 12.6 with cuDNN 9.10.2.21, CUDA 13.0 and
#   13.2 with cuDNN 9.20.0.48.
SDPA_TORCH = "2.13"
EFFICIENT_SUPPORTS_GQA = False  # torch 2.13; main after pytorch#191085: True
TORCH_CUDNN = {12: 91002, 13: 92000}  # torch 2.13 wheels: CUDA major -> cuDNN (9.10.2, 9.20.0)
# `pip install torch==2.13.0` from PyPI brings the CUDA 13.0 build: its lock entries pull
# cuda-toolkit 13.0.x (seen in a public uv.lock bump to torch 2.13.0, liblaf/melon#133).
TORCH_DEFAULT_CUDA = "13.0"  # PyPI's torch 2.13 wheel, assumed when the CUDA is not given


def torch_cudnn_version(cuda_version: str | tuple[int, int] | None = None) -> int | None:
    """The cuDNN (``torch.backends.cudnn.version()`` form, e.g. 92000) torch 2.13's CUDA wheel
    for ``cuda_version`` ships; None: a CUDA major it has no wheel for. No version given: the
    CUDA 13.0 wheel (`TORCH_DEFAULT_CUDA`).

    Raises:
        ValueError: an unreadable ``cuda_version``.
    """
    cuda = parse_cuda_version(cuda_version or TORCH_DEFAULT_CUDA)
    return TORCH_CUDNN.get(cuda[0]) if cuda else None


_FLASH_CC = ((8, 0), (12, 1))  # check_flash_attention_hardware_support: [sm80, sm121]
_MEM_EFFICIENT_CC = ((5, 0), (12, 1))  # check_mem_efficient_hardware_support: [sm50, sm121]
_CUDNN_CC = ((8, 0), (12, 1))  # check_cudnn_hardware_support: [sm80, sm121]
_SDPA_DTYPES = ("fp16", "bf16", "fp32")


def _within(cc: tuple[int, int], bounds: tuple[tuple[int, int], tuple[int, int]]) -> bool:
    return bounds[0] <= cc <= bounds[1]


def _flash_ok(cc, dtype, has_mask, head_dim, dropout, training) -> bool:
    if has_mask:  # check_for_attn_mask: no attn_mask at all
        return False
    if not 0 < head_dim <= 256:  # check_head_dim_size_flash: same q/k/v last dim, <= 256
        return False
    if not _within(cc, _FLASH_CC):
        return False
    # check_requires_grad_and_head_dim_gt192_constraints_on_sm86_89_or_120: training on
    # sm86..sm89 or sm120..sm121 needs head_dim <= 192, or > 224 without dropout
    limited = _within(cc, ((8, 6), (8, 9))) or _within(cc, ((12, 0), (12, 1)))
    if training and limited and not (head_dim <= 192 or (dropout == 0 and head_dim > 224)):
        return False
    # check_dtypes_flash_attention -> check_dtypes_low_precision: fp16/bf16 on sm80+
    return dtype in ("fp16", "bf16")


def _mem_efficient_ok(cc, dtype, head_dim, gqa=False) -> bool:
    if not _within(cc, _MEM_EFFICIENT_CC):
        return False
    if gqa and not EFFICIENT_SUPPORTS_GQA:  # check_batch_size_and_num_heads_dense<false>
        return False
    # check_head_dim_size_mem_efficient: q/k/v last dims divisible by minimum_gemm_alignment:
    # 4 from sm80, else 1; with tensor cores (sm80+, or sm70+ in fp16/bf16) at least 128 bits
    half = dtype in ("fp16", "bf16")
    tensor_cores = cc >= (8, 0) or (cc >= (7, 0) and half)
    alignment = 4 if cc >= (8, 0) else 1
    if tensor_cores:
        alignment = max(alignment, 128 // (16 if half else 32))
    if head_dim <= 0 or head_dim % alignment:
        return False
    # can_use_mem_efficient_attention: fp16/fp32/bf16 on sm80+, fp16/fp32 below
    return dtype != "bf16" or cc >= (8, 0)


def _cudnn_ok(cc, dtype, head_dim, dropout, training, cudnn_version) -> bool:
    if cudnn_version < 90000:  # "cuDNN version too old to use cuDNN Attention (< v9.0.0)"
        return False
    if dropout > 0 and 91100 < cudnn_version < 91400:  # no dropout on cuDNN 9.11-9.13
        return False
    if not _within(cc, _CUDNN_CC) or dtype not in ("fp16", "bf16"):
        return False
    if dropout * 16 != int(dropout * 16):  # check_cudnn_dropout: multiples of 1/16
        return False
    # check_cudnn_tensor_shapes: head_dim <= 128, or <= 256 on sm90/sm10x with cuDNN > 9.22
    # (sm107 needs > 9.25; the cuDNN frontend >= 1.24 is assumed); a multiple of 8
    sm90_or_10x = cc == (9, 0) or cc[0] == 10
    d256 = sm90_or_10x and cudnn_version > 92200 and not (cc == (10, 7) and cudnn_version <= 92500)
    if head_dim > (256 if d256 else 128) or head_dim % 8:
        return False
    # check_cudnn_d256_bprop_head_dim: with d256 support, training needs d <= 128 or d == 256
    return not (d256 and training and not (head_dim <= 128 or head_dim == 256))


def sdpa_backends(
    gpu: GpuSpec,
    dtype: str,
    has_mask: bool = False,
    head_dim: int = 128,
    dropout: float = 0.0,
    *,
    training: bool = True,
    cudnn_version: int | None = None,
    gqa: bool = False,
) -> list[str]:
    """The SDPA kernels PyTorch can run for these inputs on ``gpu``, in the order it tries them:
    the first is the one it picks; ``"math"`` (the unfused fallback, which materialises the
    attention matrix) always ends the list.

    Modelled: dense 4-D q/k/v with one head dim, equal query and key lengths, every backend
    enabled, non-deterministic mode, storage offsets aligned (what transformers passes). Not
    modelled: nested tensors, causal masks with unequal lengths, FlashAttention-3 (opt-in),
    ROCm.

    Args:
        gpu: the GPU.
        dtype: the dtype of q/k/v (``fp16``, ``bf16``, ``fp32``): under autocast, its dtype.
        has_mask: an explicit ``attn_mask`` (padding, sliding window, packed sequences without
            varlen); a causal mask passed as ``is_causal`` is not one.
        head_dim: the last dimension of q, k and v.
        dropout: ``dropout_p``.
        training: q/k/v require grad (the head-dim limits of backward apply).
        cudnn_version: ``torch.backends.cudnn.version()`` (e.g. 91600) if known; cuDNN attention
            is tried first when torch prefers it, else it is never reached (after math).
            `torch_cudnn_version` gives the one torch 2.13's wheels ship.
        gqa: ``enable_gqa=True`` with fewer key/value heads than query heads (transformers passes
            it when there is no mask). Flash and cuDNN take it; the memory-efficient kernel does
            not in torch 2.13 (`EFFICIENT_SUPPORTS_GQA`), so on a T4 or V100, or in fp32, such
            a call runs the math path.

    Returns:
        Backend names as in ``torch.nn.attention.SDPBackend``, lower case.

    Raises:
        ValueError: an unknown dtype.
    """
    if dtype not in _SDPA_DTYPES:
        raise ValueError(f"SDPA dtype {dtype!r}: choose one of {', '.join(_SDPA_DTYPES)}")
    cc = gpu.compute_capability
    order = SDPA_DEFAULT_ORDER
    # check_prefer_cudnn_attention: cuDNN > 9.15.0 on major 9 or 10; builds with CUDA < 13 also
    # need minor 0 or 3 (sm90, sm100, sm103: every table GPU of those majors qualifies)
    if cudnn_version is not None and cudnn_version > 91500 and cc[0] in (9, 10) and cc[1] in (0, 3):
        order = SDPA_CUDNN_ORDER
    usable = {
        "flash_attention": lambda: _flash_ok(cc, dtype, has_mask, head_dim, dropout, training),
        "efficient_attention": lambda: _mem_efficient_ok(cc, dtype, head_dim, gqa),
        "cudnn_attention": lambda: (
            cudnn_version is not None
            and _cudnn_ok(cc, dtype, head_dim, dropout, training, cudnn_version)
        ),
    }
    backends: list[str] = []
    for backend in order:
        if backend == "math":
            backends.append(backend)
            break
        if usable[backend]():
            backends.append(backend)
    return backends
