"""The GPU facts table: lookup by name and alias, device names, and figures that are sane."""

import pytest

from velora_cli.gpus import DEFAULT_GPU, GPUS, GpuError, get_gpu, gpu_from_device_name


def test_lookup_by_key_alias_and_case():
    assert get_gpu(None).key == DEFAULT_GPU
    assert get_gpu("H100").key == "h100"
    assert get_gpu("a100").key == "a100-80gb"
    assert get_gpu("RTX 4090").key == "rtx4090"
    assert get_gpu("a100_40gb").key == "a100-40gb"


def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(GpuError, match="unknown GPU; choose one of h100, h100-pcie, h200"):
        get_gpu("tpu-v5")


@pytest.mark.parametrize(
    ("device", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA A10", "a10"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
    ],
)
def test_device_names_map_to_the_table(device, key):
    assert gpu_from_device_name(device).key == key


def test_unknown_device_name_maps_to_nothing():
    assert gpu_from_device_name("Tesla T4") is None


def test_figures_are_consistent():
    for gpu in GPUS.values():
        assert gpu.source, gpu.key
        # tensor-core bf16 is never slower than tf32, tf32 never slower than CUDA-core fp32
        assert gpu.flops("bf16") >= gpu.flops("tf32") >= gpu.flops("fp32") > 0, gpu.key
        assert 1e11 < gpu.bandwidth < 1e13 and gpu.memory_bytes >= 16e9, gpu.key
    with pytest.raises(KeyError, match="no 'fp8' figure"):
        get_gpu("h100").flops("fp8")
