"""fp16 -> fp32 softmax on meta runs CUDA's half_to_float kernel: no fp32 copy of the scores."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from velora_cli.emulation.softmax import MetaHalfToFloatSoftmax, half_to_float_on_cuda
from velora_cli.measure.tracker import MemoryTracker

SHAPE = (2, 4, 16, 16)  # eager attention's (B, H, N, N) scores
NUMEL = 2 * 4 * 16 * 16


class Scores(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.w = nn.Parameter(torch.empty(16, device="meta", dtype=dtype))

    def forward(self, x, fn):
        return fn(x * self.w)


FUNCTIONS = {
    "F.softmax": lambda s: F.softmax(s, dim=-1, dtype=torch.float32),
    "Tensor.softmax": lambda s: s.softmax(-1, dtype=torch.float32),
    "torch.log_softmax": lambda s: torch.log_softmax(s, -1, dtype=torch.float32),
}


def forward_peak(fn, mode, dtype=torch.float16) -> tuple[int, torch.Tensor]:
    module = Scores(dtype)
    tracker = MemoryTracker(module, torch.optim.SGD(module.parameters(), lr=0.1), round_to=1)
    x = torch.empty(SHAPE, device="meta", dtype=dtype)
    with tracker, mode:
        out = module(x, fn)
    return tracker.peak_bytes, out


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_half_scores_are_not_copied_to_fp32_first(name):
    fn = FUNCTIONS[name]
    copied, reference = forward_peak(fn, contextlib.nullcontext())
    fused, out = forward_peak(fn, MetaHalfToFloatSoftmax())
    assert copied - fused == NUMEL * 4  # the fp32 copy of the fp16 scores
    assert (out.shape, out.dtype) == (reference.shape, torch.float32)
    out.sum().backward()  # _softmax_backward_data writes the fp16 gradient directly


def test_only_fp16_to_fp32_is_fused():
    x = torch.empty(SHAPE, device="meta", dtype=torch.float16)
    assert half_to_float_on_cuda(x, -1, torch.float32)
    assert not half_to_float_on_cuda(x, -1, None)
    assert not half_to_float_on_cuda(x.to(torch.bfloat16), -1, torch.float32)  # converted on CUDA
    assert not half_to_float_on_cuda(x, None, torch.float32)
    fn = FUNCTIONS["F.softmax"]
    bf16 = forward_peak(fn, contextlib.nullcontext(), torch.bfloat16)[0]
    assert forward_peak(fn, MetaHalfToFloatSoftmax(), torch.bfloat16)[0] == bf16
