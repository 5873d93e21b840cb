"""The GPU facts table: lookup by name and alias, device names, figures that are sane, host links,
precisions, the SDPA backends torch would pick, and the CUDA context per GPU and CUDA version."""

import pytest

from velora_cli.gpus import (
    CONTEXT_MEASUREMENTS,
    DEFAULT_CUDA_CONTEXT_BYTES,
    DEFAULT_GPU,
    EAGER_CONTEXT_BYTES,
    GPUS,
    PCIE_LINKS,
    GpuError,
    UnsupportedPrecisionError,
    check_dtype,
    get_gpu,
    gpu_from_device_name,
    parse_cuda_version,
    sdpa_backends,
)

MiB = 1 << 20
GiB = 1 << 30

# -- lookup ---------------------------------------------------------------------------------------


def test_lookup_by_key_alias_and_case():
    assert get_gpu(None).key == DEFAULT_GPU
    assert get_gpu("H100").key == "h100"
    assert get_gpu("a100").key == "a100-80gb"
    assert get_gpu("RTX 4090").key == "rtx4090"
    assert get_gpu("a100_40gb").key == "a100-40gb"


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("t4", "t4"),
        ("Tesla T4", "t4"),
        ("tesla-t4", "t4"),
        ("v100", "v100-16gb"),  # the smaller memory: a plan that fits it fits the 32 GB part
        ("V100-SXM2", "v100-16gb"),
        ("tesla_v100", "v100-16gb"),
        ("v100-32gb", "v100-32gb"),
        ("V100 SXM2 32GB", "v100-32gb"),
        ("a10g", "a10g"),
        ("A10", "a10"),
        ("a6000", "a6000"),
        ("RTX A6000", "a6000"),
        ("rtx6000-ada", "rtx6000-ada"),
        ("RTX 6000 Ada", "rtx6000-ada"),
        ("rtx 6000 ada generation", "rtx6000-ada"),
        ("3060", "rtx3060"),
        ("RTX 3060 12GB", "rtx3060"),
        ("3080", "rtx3080"),
        ("rtx-3080", "rtx3080"),
        ("4060ti", "rtx4060ti"),
        ("RTX 4060 Ti", "rtx4060ti"),
        ("rtx-4060-ti-16gb", "rtx4060ti"),
        ("4070", "rtx4070"),
        ("rtx-4070", "rtx4070"),
        ("RTX 4080", "rtx4080"),
        ("5090", "rtx5090"),
        ("RTX 5090", "rtx5090"),
        ("b200", "b200"),
        ("HGX B200", "b200"),
        # a CUDA device name works as --gpu too
        ("NVIDIA GeForce RTX 3060", "rtx3060"),
        ("NVIDIA RTX 6000 Ada Generation", "rtx6000-ada"),
    ],
)
def test_new_gpus_resolve_by_key_and_alias(name, key):
    assert get_gpu(name).key == key


def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(GpuError, match="unknown GPU; choose one of h100, h100-pcie, h200"):
        get_gpu("tpu-v5")
    with pytest.raises(GpuError, match="t4, rtx5090"):
        get_gpu("rtx-3060-ti")


def test_every_name_names_one_gpu():
    names = [name for gpu in GPUS.values() for name in (gpu.key, *gpu.aliases)]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    for gpu in GPUS.values():
        for name in (gpu.key, *gpu.aliases):
            assert get_gpu(name) is gpu, name


# -- device names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA A10", "a10"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("NVIDIA GeForce RTX 3090", "rtx3090"),
        # the new parts
        ("Tesla T4", "t4"),
        ("NVIDIA T4", "t4"),
        ("Tesla V100-SXM2-16GB", "v100-16gb"),
        ("Tesla V100-SXM2-32GB", "v100-32gb"),
        ("Tesla V100-DGXS-32GB", "v100-32gb"),
        ("NVIDIA A10G", "a10g"),
        ("NVIDIA RTX A6000", "a6000"),
        ("NVIDIA RTX 6000 Ada Generation", "rtx6000-ada"),
        ("NVIDIA GeForce RTX 3060", "rtx3060"),
        ("NVIDIA GeForce RTX 3080", "rtx3080"),
        ("NVIDIA GeForce RTX 4060 Ti", "rtx4060ti"),
        ("NVIDIA GeForce RTX 4070", "rtx4070"),
        ("NVIDIA GeForce RTX 4080", "rtx4080"),
        ("NVIDIA GeForce RTX 5090", "rtx5090"),
        ("NVIDIA B200", "b200"),
    ],
)
def test_device_names_map_to_the_table(device, key):
    assert gpu_from_device_name(device).key == key


@pytest.mark.parametrize(
    "device",
    [
        "NVIDIA GH200 480GB",  # contains "h200" but is not one
        "NVIDIA GB200",  # contains "b200"
        "NVIDIA L40",  # " l4" used to match it
        "NVIDIA RTX A1000",  # contains "a100"
        "NVIDIA RTX A5000",
        "Quadro RTX 6000",  # Turing, not the Ada part
        "NVIDIA RTX PRO 6000 Blackwell Workstation Edition",
        "Tesla V100-PCIE-16GB",  # lower peaks than the SXM2 entries
        "Tesla V100S-PCIE-32GB",
        "NVIDIA GeForce RTX 3060 Ti",
        "NVIDIA GeForce RTX 3060 Laptop GPU",
        "NVIDIA GeForce RTX 3080 Ti",
        "NVIDIA GeForce RTX 3090 Ti",
        "NVIDIA GeForce RTX 4060",
        "NVIDIA GeForce RTX 4070 SUPER",
        "NVIDIA GeForce RTX 4070 Ti",
        "NVIDIA GeForce RTX 4080 SUPER",
        "NVIDIA GeForce RTX 4090 D",
        "NVIDIA GeForce RTX 4090 Laptop GPU",
        "NVIDIA GeForce RTX 2080 Ti",
        "AMD Instinct MI300X",
    ],
)
def test_near_misses_map_to_nothing(device):
    assert gpu_from_device_name(device) is None


def test_a10_a10g_and_a100_do_not_overlap():
    assert gpu_from_device_name("NVIDIA A10").key == "a10"
    assert gpu_from_device_name("NVIDIA A10G").key == "a10g"
    assert gpu_from_device_name("NVIDIA A100 80GB PCIe").key == "a100-80gb"
    assert gpu_from_device_name("NVIDIA RTX A6000").key == "a6000"
    assert gpu_from_device_name("NVIDIA RTX 6000 Ada Generation").key == "rtx6000-ada"


def test_every_table_name_maps_back_to_its_entry():
    for gpu in GPUS.values():
        assert gpu_from_device_name(gpu.name) is gpu, gpu.name
        assert gpu_from_device_name(gpu.name, total_memory=gpu.memory_bytes) is gpu, gpu.name


def test_total_memory_tells_parts_with_one_name_apart():
    name = "NVIDIA GeForce RTX 3060"
    assert gpu_from_device_name(name, total_memory=12 * GiB).key == "rtx3060"
    assert gpu_from_device_name(name, total_memory=8 * GiB) is None  # the 8 GB RTX 3060
    assert gpu_from_device_name("NVIDIA GeForce RTX 3080", total_memory=12 * GiB) is None
    assert gpu_from_device_name("NVIDIA GeForce RTX 4060 Ti", total_memory=8 * GiB) is None
    # what drivers report: a T4 with ECC on (fitcheck), an A100 40GB (40 GiB), an H100 80GB
    assert gpu_from_device_name("Tesla T4", total_memory=14912 * MiB).key == "t4"
    assert gpu_from_device_name("NVIDIA A100-SXM4-40GB", total_memory=40 * GiB).key == "a100-40gb"
    assert gpu_from_device_name("NVIDIA H100 80GB HBM3", total_memory=85_031_714_816).key == "h100"


# -- figures --------------------------------------------------------------------------------------


def test_figures_are_consistent():
    for gpu in GPUS.values():
        assert gpu.source and gpu.chip, gpu.key
        assert 1e11 < gpu.bandwidth < 1e13 and gpu.memory_bytes >= 10e9, gpu.key
        ampere_or_newer = gpu.compute_capability >= (8, 0)
        # bf16 and tf32 tensor cores only from Ampere; every part has fp16 tensor cores and fp32
        assert ("bf16" in gpu.dense_flops) == ampere_or_newer, gpu.key
        assert ("tf32" in gpu.dense_flops) == ampere_or_newer, gpu.key
        assert gpu.flops("fp16") > gpu.flops("fp32") > 0, gpu.key
        if ampere_or_newer:
            # tensor-core bf16 is never slower than tf32, tf32 never slower than CUDA-core fp32
            assert gpu.flops("bf16") >= gpu.flops("tf32") >= gpu.flops("fp32"), gpu.key
    with pytest.raises(KeyError, match="no 'fp8' figure"):
        get_gpu("h100").flops("fp8")
    with pytest.raises(KeyError, match="t4 has no 'bf16' figure; known: fp16, fp32"):
        get_gpu("t4").flops("bf16")


@pytest.mark.parametrize(
    ("key", "cc", "memory_gb", "sms", "fp16_tflops"),
    [
        ("t4", (7, 5), 16, 40, 65.0),
        ("v100-16gb", (7, 0), 16, 80, 125.0),
        ("v100-32gb", (7, 0), 32, 80, 125.0),
        ("a10g", (8, 6), 24, 80, 70.0),
        ("a6000", (8, 6), 48, 84, 154.8),
        ("rtx6000-ada", (8, 9), 48, 142, 364.2),
        ("rtx3060", (8, 6), 12, 28, 25.5),
        ("rtx3080", (8, 6), 10, 68, 59.5),
        ("rtx4060ti", (8, 9), 16, 34, 44.1),
        ("rtx4070", (8, 9), 12, 46, 58.3),
        ("rtx4080", (8, 9), 16, 76, 97.5),
        ("rtx5090", (12, 0), 32, 170, 209.5),
        ("b200", (10, 0), 180, 148, 2250.0),
    ],
)
def test_new_gpus_carry_their_figures(key, cc, memory_gb, sms, fp16_tflops):
    gpu = GPUS[key]
    assert gpu.compute_capability == cc and gpu.memory_bytes == memory_gb * 10**9
    assert gpu.sms == sms and gpu.flops("fp16") == pytest.approx(fp16_tflops * 1e12)


def test_derived_geforce_figures_follow_sms_and_clock():
    # GeForce per-SM rates (Ada/GA10x whitepapers): 512 dense fp16 FLOP/clock/SM with fp32
    # accumulation, 256 fp32 FLOP/clock/SM; boost clocks from NVIDIA's spec pages
    for key, clock_ghz in (("rtx3060", 1.777), ("rtx4060ti", 2.535), ("rtx4070", 2.475)):
        gpu = GPUS[key]
        assert gpu.flops("fp16") == pytest.approx(gpu.sms * 512 * clock_ghz * 1e9, rel=0.005)
        assert gpu.flops("fp32") == pytest.approx(gpu.sms * 256 * clock_ghz * 1e9, rel=0.005)
        assert "derived" in gpu.source


# -- host link ------------------------------------------------------------------------------------


def test_every_gpu_has_a_host_link_with_its_source():
    for gpu in GPUS.values():
        assert gpu.host_link in PCIE_LINKS and gpu.host_link_source, gpu.key
        assert gpu.host_link_bandwidth == PCIE_LINKS[gpu.host_link], gpu.key
        assert gpu.host_link_bandwidth < gpu.bandwidth / 4, gpu.key  # far below DRAM


@pytest.mark.parametrize(
    ("key", "link", "gb_per_s"),
    [
        ("h100", "PCIe 5.0 x16", 64),
        ("h200", "PCIe 5.0 x16", 64),
        ("b200", "PCIe 5.0 x16", 64),
        ("a100-80gb", "PCIe 4.0 x16", 32),
        ("v100-16gb", "PCIe 3.0 x16", 16),
        ("t4", "PCIe 3.0 x16", 16),
        ("rtx4060ti", "PCIe 4.0 x8", 16),  # an x8 card
        ("rtx5090", "PCIe 5.0 x16", 64),
    ],
)
def test_host_links(key, link, gb_per_s):
    gpu = GPUS[key]
    assert (gpu.host_link, gpu.host_link_bandwidth) == (link, gb_per_s * 10**9)


# -- precisions -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "flag", "message"),
    [
        (
            "t4",
            "--dtype",
            "--dtype bf16: NVIDIA T4 16GB (compute capability 7.5) has no bfloat16 support (it "
            "needs 8.0 or newer); use --dtype fp16 or --amp fp16",
        ),
        (
            "v100-16gb",
            "--dtype",
            "--dtype bf16: NVIDIA Tesla V100 SXM2 16GB (compute capability 7.0) has no bfloat16 "
            "support (it needs 8.0 or newer); use --dtype fp16 or --amp fp16",
        ),
        (
            "t4",
            "--amp",
            "--amp bf16: NVIDIA T4 16GB (compute capability 7.5) has no bfloat16 support (it "
            "needs 8.0 or newer); use --amp fp16",
        ),
    ],
)
def test_bf16_is_refused_below_ampere_with_what_to_use(key, flag, message):
    with pytest.raises(UnsupportedPrecisionError) as err:
        check_dtype(GPUS[key], "bf16", flag=flag)
    assert str(err.value) == message and "\n" not in message
    assert isinstance(err.value, GpuError)


def test_supported_precisions_pass():
    for key in ("t4", "v100-32gb"):
        for dtype in ("fp32", "fp16", None):
            check_dtype(GPUS[key], dtype)
        assert not GPUS[key].supports("bf16") and not GPUS[key].supports("tf32")
    for key in ("a100-80gb", "rtx3060", "a10g", "rtx5090", "b200"):
        check_dtype(GPUS[key], "bf16", flag="--amp")
        assert GPUS[key].supports("bf16") and GPUS[key].supports("tf32")
    with pytest.raises(ValueError, match="precision 'int8': choose one of fp32, fp16, tf32, bf16"):
        check_dtype(GPUS["t4"], "int8")


# -- SDPA backends --------------------------------------------------------------------------------
# Expected lists written from aten/src/ATen/native/transformers/cuda/sdp_utils.cpp (pytorch/pytorch
# commit 001f694a) and torch 2.13.0's ATen/Context.h; the function each case exercises is named.

FLASH, EFFICIENT, MATH, CUDNN = "flash_attention", "efficient_attention", "math", "cudnn_attention"


@pytest.mark.parametrize(
    ("key", "dtype", "kwargs", "expected"),
    [
        # Context.h sdp_priority_order: flash, efficient, math, cudnn
        ("h100", "bf16", {}, [FLASH, EFFICIENT, MATH]),
        ("a100-80gb", "fp16", {}, [FLASH, EFFICIENT, MATH]),
        ("b200", "bf16", {}, [FLASH, EFFICIENT, MATH]),  # sm100 inside [sm80, sm121]
        ("rtx5090", "bf16", {}, [FLASH, EFFICIENT, MATH]),  # sm120 inside [sm80, sm121]
        # check_for_attn_mask: flash takes no attn_mask; efficient does
        ("h100", "bf16", {"has_mask": True}, [EFFICIENT, MATH]),
        # check_flash_attention_hardware_support [sm80, sm121]: not on a T4 or V100;
        # check_mem_efficient_hardware_support [sm50, sm121] (fitcheck's T4 rows record
        # EFFICIENT_ATTENTION for fp16 SDPA)
        ("t4", "fp16", {}, [EFFICIENT, MATH]),
        ("v100-16gb", "fp16", {}, [EFFICIENT, MATH]),
        # can_use_mem_efficient_attention: below sm80 only fp16/fp32, so bf16 falls to math
        ("t4", "bf16", {}, [MATH]),
        ("v100-16gb", "bf16", {"has_mask": True}, [MATH]),
        # check_dtypes_low_precision: flash is fp16/bf16 only; efficient takes fp32
        ("a100-80gb", "fp32", {}, [EFFICIENT, MATH]),
        # minimum_gemm_alignment: sm7x fp16 (tensor cores) 8; sm7x fp32 (no tensor cores) 1;
        # sm80+ fp32 4, fp16/bf16 8
        ("v100-16gb", "fp16", {"head_dim": 60}, [MATH]),
        ("v100-16gb", "fp32", {"head_dim": 60}, [EFFICIENT, MATH]),
        ("a100-80gb", "fp32", {"head_dim": 62}, [MATH]),
        ("a100-80gb", "bf16", {"head_dim": 100}, [FLASH, MATH]),  # flash has no alignment rule
        # check_head_dim_size_flash: head_dim <= 256; efficient has no upper limit on CUDA
        ("h100", "bf16", {"head_dim": 288}, [EFFICIENT, MATH]),
        # check_requires_grad_and_head_dim_gt192_constraints_on_sm86_89_or_120: training on
        # sm86-89/sm120-121 needs head_dim <= 192, or > 224 without dropout
        ("rtx4090", "bf16", {"head_dim": 208}, [EFFICIENT, MATH]),
        ("rtx4090", "bf16", {"head_dim": 208, "training": False}, [FLASH, EFFICIENT, MATH]),
        ("rtx4090", "bf16", {"head_dim": 256}, [FLASH, EFFICIENT, MATH]),
        ("rtx4090", "bf16", {"head_dim": 256, "dropout": 0.1}, [EFFICIENT, MATH]),
        ("rtx3060", "fp16", {"head_dim": 192}, [FLASH, EFFICIENT, MATH]),
        ("rtx5090", "bf16", {"head_dim": 208}, [EFFICIENT, MATH]),
        ("a100-80gb", "bf16", {"head_dim": 208}, [FLASH, EFFICIENT, MATH]),  # sm80: no limit
    ],
)
def test_sdpa_backends_follow_torchs_checks(key, dtype, kwargs, expected):
    assert sdpa_backends(GPUS[key], dtype, **kwargs) == expected


@pytest.mark.parametrize(
    ("key", "kwargs", "expected"),
    [
        # check_prefer_cudnn_attention: cuDNN > 9.15.0 on sm90/sm100 puts cuDNN first
        ("h100", {"cudnn_version": 91600}, [CUDNN, FLASH, EFFICIENT, MATH]),
        ("b200", {"cudnn_version": 91600}, [CUDNN, FLASH, EFFICIENT, MATH]),
        ("h100", {"cudnn_version": 91500}, [FLASH, EFFICIENT, MATH]),  # not > 9.15.0
        ("a100-80gb", {"cudnn_version": 91600}, [FLASH, EFFICIENT, MATH]),  # major 8
        ("rtx5090", {"cudnn_version": 92300}, [FLASH, EFFICIENT, MATH]),  # major 12
        # check_cudnn_tensor_shapes: head_dim <= 128 unless sm90/sm10x with cuDNN > 9.22
        ("h100", {"cudnn_version": 91600, "head_dim": 256}, [FLASH, EFFICIENT, MATH]),
        ("h100", {"cudnn_version": 92300, "head_dim": 256}, [CUDNN, FLASH, EFFICIENT, MATH]),
        # check_cudnn_d256_bprop_head_dim: training with d256 support needs d <= 128 or 256
        ("h100", {"cudnn_version": 92300, "head_dim": 192}, [FLASH, EFFICIENT, MATH]),
        (
            "h100",
            {"cudnn_version": 92300, "head_dim": 192, "training": False},
            [CUDNN, FLASH, EFFICIENT, MATH],
        ),
        # check_cudnn_dropout: multiples of 1/16 only; cuDNN accepts masks (flash does not)
        ("h100", {"cudnn_version": 91600, "dropout": 0.1}, [FLASH, EFFICIENT, MATH]),
        ("h100", {"cudnn_version": 91600, "dropout": 0.125}, [CUDNN, FLASH, EFFICIENT, MATH]),
        ("h100", {"cudnn_version": 91600, "has_mask": True}, [CUDNN, EFFICIENT, MATH]),
    ],
)
def test_sdpa_backends_with_cudnn(key, kwargs, expected):
    assert sdpa_backends(GPUS[key], "bf16", **kwargs) == expected


def test_sdpa_backends_end_with_math_and_refuse_unknown_dtypes():
    for gpu in GPUS.values():
        for dtype in ("fp16", "bf16", "fp32"):
            for has_mask in (False, True):
                assert sdpa_backends(gpu, dtype, has_mask)[-1] == MATH
    with pytest.raises(ValueError, match="SDPA dtype 'fp8': choose one of fp16, bf16, fp32"):
        sdpa_backends(GPUS["h100"], "fp8")


# -- CUDA context ---------------------------------------------------------------------------------

T4_CONTEXT = int(140.875 * MiB)  # fitcheck's cuda_context_mib on every T4 row


@pytest.mark.parametrize("cuda", [None, "12.8", "12.4", "13.0", (13, 0)])
def test_t4_context_is_measured_on_cuda_12_and_13(cuda):
    context = GPUS["t4"].cuda_context(cuda)
    assert (context.nbytes, context.basis, context.measured) == (T4_CONTEXT, "measured", True)
    assert "fitcheck" in context.source and "lazy loading" in context.source


def test_existing_properties_give_the_version_free_figure():
    t4 = GPUS["t4"]
    assert t4.context_bytes == T4_CONTEXT and "measured on a Tesla T4" in t4.context_source
    for gpu in GPUS.values():
        assert gpu.context_bytes == gpu.cuda_context().nbytes > 0, gpu.key
        assert gpu.context_source == gpu.cuda_context().source, gpu.key
    # nothing measured for the H100: the conservative default as before, saying so
    h100 = GPUS["h100"]
    assert h100.context_bytes == DEFAULT_CUDA_CONTEXT_BYTES == GiB
    assert h100.cuda_context().basis == "conservative default"
    assert "not measured" in h100.context_source and "conservative" in h100.context_source


def test_v100_context_is_measured_with_eager_loading_only():
    for key in ("v100-16gb", "v100-32gb"):  # one die: the 16 GB measurement carries over
        context = GPUS[key].cuda_context("11.2")
        assert (context.nbytes, context.basis) == (1343 * MiB, "measured"), key
        assert "transformers" in context.source and "eager loading" in context.source
    # CUDA >= 11.7 loads lazily: the eager figure does not apply, nor does the T4's
    context = GPUS["v100-16gb"].cuda_context("12.1")
    assert (context.nbytes, context.basis) == (DEFAULT_CUDA_CONTEXT_BYTES, "conservative default")


def test_unmeasured_configurations_are_extrapolated_and_labelled():
    t4 = GPUS["t4"]
    # same die and loading mode, another CUDA major
    context = t4.cuda_context("11.8")
    assert (context.nbytes, context.basis) == (T4_CONTEXT, "extrapolated")
    assert context.source.startswith("extrapolated from a Tesla T4 on CUDA 12.8")
    # eager loading (CUDA < 11.7, or CUDA_MODULE_LOADING=EAGER) on a die not measured that way
    for context in (
        t4.cuda_context("11.2"),
        t4.cuda_context("12.8", module_loading="EAGER"),
        GPUS["h100"].cuda_context("11.6"),
    ):
        assert (context.nbytes, context.basis) == (EAGER_CONTEXT_BYTES, "extrapolated")
        assert context.source.startswith("extrapolated from a Tesla V100-SXM2-16GB on CUDA 11.2")
        assert "1-2GB" in context.source


def test_unknown_figures_stay_conservative():
    eager_measured = max(m.nbytes for m in CONTEXT_MEASUREMENTS if not m.lazy)
    for gpu in GPUS.values():
        for cuda in (None, "11.4", "11.8", "12.8", "13.0"):
            context = gpu.cuda_context(cuda)
            if context.basis == "conservative default":
                assert context.nbytes == DEFAULT_CUDA_CONTEXT_BYTES, (gpu.key, cuda)
            elif context.basis == "extrapolated" and "eager" in context.source:
                assert context.nbytes >= eager_measured, (gpu.key, cuda)


def test_cuda_version_and_module_loading_are_checked():
    assert parse_cuda_version("12.8.1") == (12, 8) and parse_cuda_version((11, 2)) == (11, 2)
    assert parse_cuda_version(None) is None
    with pytest.raises(ValueError, match="expected MAJOR.MINOR"):
        parse_cuda_version("cu128")
    with pytest.raises(ValueError, match="expected LAZY or EAGER"):
        GPUS["t4"].cuda_context("12.8", module_loading="sometimes")


# -- total memory as CUDA reports it --------------------------------------------------------------


def test_every_measured_total_has_its_source_and_the_rest_are_labelled():
    measured = {k: g for k, g in GPUS.items() if g.total_bytes is not None}
    assert {"t4", "a100-40gb", "a100-80gb", "h100", "l40s", "v100-16gb"} <= set(measured)
    for gpu in measured.values():
        total = gpu.device_total()
        assert total.basis == "measured" and total.nbytes == gpu.total_bytes
        assert "github" in gpu.total_source or "fitcheck" in gpu.total_source
        # what CUDA reports lies near the datasheet's figure (ECC and driver regions aside)
        assert 0.9 * gpu.memory_bytes < gpu.total_bytes < 1.1 * gpu.memory_bytes
    for gpu in GPUS.values():
        if gpu.total_bytes is None:
            total = gpu.device_total()
            assert total.basis == "not measured" and "not measured" in total.source
            # the rule takes the lowest measured ratio: never above a measured GPU's ratio
            assert all(
                total.nbytes / gpu.memory_bytes <= m.total_bytes / m.memory_bytes + 1e-9
                for m in measured.values()
            )


def test_totals_are_cudas_not_the_datasheets():
    import json
    from pathlib import Path

    # fitcheck measured its T4 (torch total_memory, ECC on): below the datasheet's 16 GB
    corpus = Path(__file__).resolve().parents[1] / "validation/published/fitcheck_t4.json"
    records = json.loads(corpus.read_text())["records"]
    totals = {r["gpu_total_bytes"] for r in records if r.get("gpu_total_bytes")}
    assert totals == {GPUS["t4"].device_total().nbytes}
    assert GPUS["t4"].device_total().nbytes < GPUS["t4"].memory_bytes
    # the A100 80GB's HBM is 80 GiB; CUDA reports 79.1-79.4 GiB of it, above the nominal 80e9
    a100 = GPUS["a100-80gb"].device_total().nbytes
    assert GPUS["a100-80gb"].memory_bytes < a100 < 80 * GiB
    assert GPUS["a100-40gb"].device_total().nbytes == 42_298_834_944  # deviceQuery's bytes
