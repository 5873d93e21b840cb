"""RMSNorm on meta tensors saves what CUDA's fused kernel saves: the input and an (M,) rstd."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from velora_cli.emulation.rms_norm import MetaFusedRmsNorm, fused_on_cuda
from velora_cli.measure.accounting import SavedTensorCounter

ROWS, WIDTH = 2 * 16, 64  # (2, 16, 64) inputs: M = 32 rows of N = 64


def saved_bytes(module: nn.Module, x: torch.Tensor, mode=None) -> int:
    counter = SavedTensorCounter(module, exclude=[x])
    with mode or contextlib.nullcontext(), counter:
        module(x * 1)  # a fresh activation, as inside a model
    return counter.result.total_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_rms_norm_saves_input_and_fp32_rstd(dtype):
    with torch.device("meta"):
        norm = nn.RMSNorm(WIDTH, dtype=dtype)
    x = torch.empty(2, 16, WIDTH, device="meta", dtype=dtype, requires_grad=True)
    s = torch.finfo(dtype).bits // 8
    fused = saved_bytes(norm, x, MetaFusedRmsNorm())
    assert fused == ROWS * WIDTH * s + ROWS * 4  # input + rstd in the accumulate type
    # ATen's composite (meta and CPU) keeps the normalised x * rstd as well, in fp32, and for
    # half inputs an fp32 copy of the input instead of the input
    composite = saved_bytes(norm, x)
    assert composite - fused == ROWS * WIDTH * (4 if dtype == torch.float32 else 2 * 4 - s)


def test_meta_rms_norm_output_and_gradients():
    x = torch.empty(2, 16, WIDTH, device="meta", requires_grad=True)
    w = torch.empty(WIDTH, device="meta", requires_grad=True)
    with MetaFusedRmsNorm():
        y = F.rms_norm(x, (WIDTH,), w, 1e-6)
    real = F.rms_norm(x, (WIDTH,), w, 1e-6)
    assert (y.shape, y.dtype, y.is_contiguous()) == (real.shape, real.dtype, True)
    y.sum().backward()
    assert (x.grad.shape, w.grad.shape) == (x.shape, w.shape)
    with MetaFusedRmsNorm():
        assert F.rms_norm(x, (WIDTH,)).grad_fn.name() == "FusedRmsNormMetaBackward"


def test_composite_fallbacks_and_other_devices_are_left_alone():
    x = torch.empty(2, 16, WIDTH, device="meta", dtype=torch.bfloat16, requires_grad=True)
    assert not fused_on_cuda(x, torch.empty(WIDTH, device="meta"))  # weight dtype differs
    assert fused_on_cuda(x, None) and fused_on_cuda(x, torch.empty_like(x[0, 0]))
    image = torch.empty(2, 8, 4, 4, device="meta").to(memory_format=torch.channels_last)
    assert not fused_on_cuda(image, None)
    with MetaFusedRmsNorm():
        # ATen itself says so (layer_norm.cpp, rms_norm_symint), on meta as on CUDA
        with pytest.warns(UserWarning, match="Cannot dispatch to fused implementation"):
            y = F.rms_norm(x, (WIDTH,), torch.empty(WIDTH, device="meta"))
        assert y.grad_fn.name() != "FusedRmsNormMetaBackward"
        cpu = torch.ones(2, 16, WIDTH, requires_grad=True)
        assert F.rms_norm(cpu, (WIDTH,)).grad_fn.name() != "FusedRmsNormMetaBackward"
