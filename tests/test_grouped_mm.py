"""MoE experts' grouped GEMM (``torch._grouped_mm``) on meta runs as CUDA runs it, fp16 included.

transformers 5.25's Mixtral experts call ``F.grouped_mm`` in the weights' dtype; torch 2.13's
meta kernel takes bf16 only, so an fp16 Mixtral failed to estimate. The independent check is a
real CPU step: the CPU kernel of ``_grouped_mm`` (torch 2.13) allocates the same output tensor
as CUDA's (``create_grouped_gemm_output_tensor``, GroupedMMUtils.h, shared by both) and runs the
same autograd formulas (derivatives.yaml: ``_grouped_mm_mat1_backward`` /
``_grouped_mm_mat2_backward``), so an MoE block stepped on CPU through the tracker must allocate,
free and save what the emulation does on meta.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from velora_cli.emulation.grouped_mm import output_layout
from velora_cli.emulation.step import cuda_emulation
from velora_cli.estimate.backend import EstimateBackend
from velora_cli.measure.accounting import SavedTensorCounter
from velora_cli.measure.tracker import MemoryTracker
from velora_cli.measure.train_step import StepSpec, Strategy
from velora_cli.timing.opcount import OpCounter

HIDDEN, INTER, EXPERTS, TOP_K = 64, 96, 4, 2
BATCH, SEQ = 4, 32
ROUTED = BATCH * SEQ * TOP_K  # S: (token, expert) pairs, the grouped GEMMs' rows
DTYPES = [torch.float16, torch.bfloat16]
GROUPED = ("aten::_grouped_mm", "velora::grouped_mm")


def moe_block(device: str, dtype: torch.dtype) -> MixtralSparseMoeBlock:
    config = MixtralConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
    )
    config._experts_implementation = "grouped_mm"  # transformers' default where it can
    torch.manual_seed(0)
    with torch.device(device):
        block = MixtralSparseMoeBlock(config).to(dtype)
    if device == "cpu":
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return block


def block_step(device: str, dtype: torch.dtype, counter: OpCounter | None = None) -> dict:
    """Forward and backward of the MoE block, tracked: peak, allocations per grouped GEMM, bytes
    saved for backward, the weight gradients' strides."""
    block = moe_block(device, dtype)
    if device == "cpu":
        x = torch.randn(BATCH, SEQ, HIDDEN, dtype=dtype, requires_grad=True)
    else:
        x = torch.empty(BATCH, SEQ, HIDDEN, dtype=dtype, device=device, requires_grad=True)
    tracker = MemoryTracker(block, torch.optim.SGD(block.parameters(), lr=0.1), round_to=1,
                            trace=True)  # fmt: skip
    saved = SavedTensorCounter(block, exclude=[x])
    emulation = cuda_emulation() if device == "meta" else contextlib.nullcontext()
    with tracker, emulation, counter or contextlib.nullcontext():
        with saved:
            out = block(x * 1)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()
    trace = tracker.trace
    grouped = [
        [n for op, _, n in trace.events if op == index and n > 0]
        for index, name in enumerate(trace.op_names, start=1)
        if name in GROUPED
    ]
    return {
        "peak": tracker.peak_bytes,
        "grouped": grouped,
        "saved": saved.result.total_bytes,
        "strides": {n: p.grad.stride() for n, p in block.named_parameters()},
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_meta_moe_block_allocates_and_saves_what_a_real_cpu_step_does(dtype):
    cpu, meta = block_step("cpu", dtype), block_step("meta", dtype)
    # forward: gate_up (S, 2I), down (S, H); backward, per GEMM: the weight gradient
    # (E, N, K) first, then the input gradient (S, K) (the real autograd node's order)
    s = torch.finfo(dtype).bits // 8
    expected = [
        [ROUTED * 2 * INTER * s],
        [ROUTED * HIDDEN * s],
        [EXPERTS * HIDDEN * INTER * s],
        [ROUTED * INTER * s],
        [EXPERTS * 2 * INTER * HIDDEN * s],
        [ROUTED * HIDDEN * s],
    ]
    assert cpu["grouped"] == expected, cpu["grouped"]
    assert meta["grouped"] == cpu["grouped"]
    assert meta["saved"] == cpu["saved"]
    assert meta["peak"] == cpu["peak"], (meta["peak"], cpu["peak"])
    assert meta["strides"] == cpu["strides"]  # gradients stolen by AccumulateGrad alike


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_gemms_count_as_gemms_of_their_flops(dtype):
    """FLOPs worked out from CUDA's fallback (GroupedMMUtils.h, ``_grouped_mm_fallback``): one
    (m_g x K)·(K x N) mm per group, 2·m_g·K·N each, the m_g summing to S; per layer forward
    gate_up (K=H, N=2I) and down (K=I, N=H), backward twice each: 3·(2·S·H·2I + 2·S·I·H)."""
    flops = {}
    for device in ("cpu", "meta"):
        counter = OpCounter(device)
        block_step(device, dtype, counter)
        gemms = [
            (cost, n)
            for segment in counter.counts().segments
            for cost, n in segment.ops
            if cost.op in ("_grouped_mm", "grouped_mm")
        ]
        assert {cost.kind for cost, _ in gemms} == {"gemm"}
        assert sum(n for _, n in gemms) == 6
        flops[device] = sum(cost.flops * n for cost, n in gemms)
    assert flops["meta"] == flops["cpu"] == 3 * (2 * ROUTED * HIDDEN * 2 * INTER
                                                  + 2 * ROUTED * INTER * HIDDEN)  # fmt: skip


def test_cuda_output_layout_pads_the_last_stride_to_16_bytes():
    a = torch.empty(10, 64, device="meta", dtype=torch.float16)
    b = torch.empty(4, 64, 36, device="meta", dtype=torch.float16)
    offs = torch.empty(4, device="meta", dtype=torch.int32)
    assert output_layout(a, b, offs) == ((10, 36), (40, 1))  # 36 halves -> 80 bytes -> 40
    grad_t = torch.empty(36, 10, device="meta", dtype=torch.float32)  # 2-D x 2-D, fp32
    assert output_layout(grad_t, a.float(), offs) == ((4, 36, 64), (36 * 64, 64, 1))


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_a_tiny_mixtral_estimates_in_every_dtype(tmp_path, dtype):
    MixtralConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        vocab_size=128,
        max_position_embeddings=SEQ,
    ).save_pretrained(tmp_path)
    spec = StepSpec(model=str(tmp_path), batch_size=2, seq_len=SEQ, dtype=dtype,
                    strategy=Strategy(gc=True))  # fmt: skip
    row = EstimateBackend(gpu="a100-80gb").measure(spec)
    assert row["status"] == "ok", row.get("error")
    assert row["predicted_step_seconds"] > 0


def test_only_meta_calls_in_a_cuda_layout_are_replayed():
    def grad_fn(device, dtype, a_rows=8):
        a = torch.ones(a_rows, 16, device=device, dtype=dtype, requires_grad=True)
        w = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
        offs = torch.tensor([3, 8], device=device, dtype=torch.int32)
        with cuda_emulation():
            return torch._grouped_mm(a, w.transpose(-2, -1), offs=offs).grad_fn.name()

    assert grad_fn("meta", torch.float16) == "GroupedMmBackward"
    assert grad_fn("meta", torch.float32) == "GroupedMmBackward"
    assert grad_fn("cpu", torch.float16) == "GroupedMmBackward0"  # the real kernel, untouched
    with cuda_emulation(), pytest.raises(RuntimeError, match="BF16"):  # torch's own meta check
        a = torch.empty(2, 8, 16, device="meta", dtype=torch.float16)  # 3-D x 3-D: not replayed
        torch._grouped_mm(a, torch.empty(2, 16, 16, device="meta", dtype=torch.float16))
