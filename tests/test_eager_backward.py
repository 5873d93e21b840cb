"""Eager attention's softmax backward on CUDA takes a temporary the size of the scores
(``Tensor tmp = grad * output;`` in ``softmax_backward_cuda_out``, aten/src/ATen/native/cuda/
SoftMax.cu), in the gradient's dtype: fp32 for HF eager attention, which runs its softmax with
``dtype=torch.float32``. The CPU kernel takes none; fitcheck's T4 measured it (eager attention at
2048-4096 tokens was predicted one fp32 (B, H, N, N) tensor low before it was counted)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from velora_cli.emulation.softmax import cuda_kernel_temporaries
from velora_cli.estimate.backend import EstimateBackend
from velora_cli.measure.cpu import CpuBackend
from velora_cli.measure.train_step import StepSpec, Strategy

BATCH, HEADS, SEQ = 1, 4, 512


@pytest.fixture(scope="module")
def eager_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("eager")
    LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        vocab_size=256,
        max_position_embeddings=SEQ,
    ).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(("dtype", "gc"), [("fp32", True), ("bf16", False)])
def test_estimate_is_a_real_cpu_step_plus_the_cuda_softmax_temporary(eager_dir, dtype, gc):
    """A real CPU step through the cpu backend's tracker against the estimate: at the peak (the
    last layer's, or the recomputed layer's, attention backward) the same activations, and the
    estimate's temporaries hold one more fp32 (B, H, N, N) tensor, CUDA's ``grad * output``."""
    spec = StepSpec(
        model=eager_dir,
        batch_size=BATCH,
        seq_len=SEQ,
        attn="eager",
        dtype=dtype,
        strategy=Strategy(gc=gc),
    )
    est = EstimateBackend(trace_fields=False, step_time=False).measure(spec)
    cpu = CpuBackend(warmup=1, steps=1).measure(spec)
    assert est["status"] == cpu["status"] == "ok"
    at_est, at_cpu = est["peak_breakdown"], cpu["peak_breakdown"]
    assert at_est["activations"] == at_cpu["activations"]
    assert at_est["temporaries"] - at_cpu["temporaries"] == BATCH * HEADS * SEQ * SEQ * 4


def test_only_softmax_backward_on_meta_takes_the_temporary():
    grad = torch.empty(2, 3, 8, 8, device="meta")
    out = torch.empty(2, 3, 8, 8, device="meta")
    softmax_backward = torch.ops.aten._softmax_backward_data.default
    (name, tmp), *rest = cuda_kernel_temporaries(softmax_backward, (grad, out, -1, torch.float16))
    assert (name, tmp.shape, tmp.dtype, rest) == ("aten::mul", grad.shape, torch.float32, [])
    assert (
        cuda_kernel_temporaries(
            softmax_backward, (torch.ones(2, 8), torch.ones(2, 8), -1, torch.float32)
        )
        == []
    )
    assert cuda_kernel_temporaries(torch.ops.aten._log_softmax_backward_data.default, (grad,)) == []
