"""SDPA's math path replayed as on a GPU: the same ATen ops as the real path (but for the two
documented differences), the same values, and CUDA's dropout mask in whole estimates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig

from velora_cli.emulation.math_attention import MetaMathAttention, math_attention
from velora_cli.estimate.backend import EstimateBackend
from velora_cli.measure.train_step import StepSpec

B, H, HKV, N, D = 2, 4, 2, 16, 8


class OpLog(TorchDispatchMode):
    """Every dispatched op with its tensor arguments' and outputs' (shape, dtype)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))

        def meta(v):
            return (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else None

        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((func.__name__, [meta(a) for a in args], [meta(o) for o in outs]))
        return out


def qkv(dtype=torch.float32, device="meta"):
    shapes = [(B, H, N, D), (B, HKV, N, D), (B, HKV, N, D)]
    return [torch.randn(s, dtype=dtype, device=device, requires_grad=True) for s in shapes]


CASES = {
    "causal gqa": dict(is_causal=True, enable_gqa=True),
    "causal gqa dropout": dict(is_causal=True, enable_gqa=True, dropout_p=0.1),
    "bool mask": dict(attn_mask="bool", enable_gqa=True),
    "float mask scale dropout": dict(attn_mask="float", scale=0.3, dropout_p=0.2, enable_gqa=True),
}


def _kwargs(case, dtype, device="meta"):
    kwargs = dict(CASES[case])
    if kwargs.get("attn_mask") == "bool":
        kwargs["attn_mask"] = torch.ones(B, 1, N, N, dtype=torch.bool, device=device).tril()
    elif kwargs.get("attn_mask") == "float":
        kwargs["attn_mask"] = torch.zeros(B, 1, N, N, dtype=dtype, device=device)
    return kwargs


def _ops(fn, dtype, case):
    q, k, v = qkv(dtype)
    kwargs = _kwargs(case, dtype)
    with OpLog() as log:
        fn(q, k, v, **kwargs)
    return log.ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_replay_calls_the_real_paths_ops_but_for_dropout_and_the_mask_add(case, dtype):
    real, ours = (
        _ops(F.scaled_dot_product_attention, dtype, case),
        _ops(math_attention, dtype, case),
    )
    # 1. meta tensors are subclass-like to ATen, so the real path adds the mask out of place
    real = [
        ("add_.Tensor", *rest) if name == "add.Tensor" else (name, *rest) for name, *rest in real
    ]
    # 2. the real path's at::dropout on meta is _dropout_impl; the replay's is CUDA's fused one
    impl = ["empty_like.default", "bernoulli_.float", "div_.Scalar", "mul.Tensor"]
    names = [name for name, *_ in real]
    if "bernoulli_.float" in names:
        start = names.index("empty_like.default")
        assert names[start : start + 4] == impl
        probs = real[start][1][0]  # (B, H, N, N) in the computation dtype
        outputs = [probs, (probs[0], torch.bool)]
        fused = ("native_dropout.default", [probs, None, None], outputs)  # p and train: None
        real = real[:start] + [fused] + real[start + 4 :]
    assert ours == real


@pytest.mark.parametrize("case", ["causal gqa", "bool mask"])
def test_replay_gives_sdpas_values(case):
    q, k, v = qkv(device="cpu")
    kwargs = _kwargs(case, torch.float32, "cpu")
    torch.testing.assert_close(
        math_attention(q, k, v, **kwargs), F.scaled_dot_product_attention(q, k, v, **kwargs)
    )


def test_mode_replays_meta_calls_only():
    q, k, v = qkv()
    with MetaMathAttention(), OpLog() as log:
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True, enable_gqa=True)
    assert "native_dropout.default" in [name for name, *_ in log.ops]
    q, k, v = qkv(device="cpu")
    with MetaMathAttention(), OpLog() as log:
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True, enable_gqa=True)
    assert "native_dropout.default" not in [name for name, *_ in log.ops]


def test_fp32_gqa_estimate_keeps_a_bool_mask_of_the_probabilities(tmp_path):
    """fp32 with grouped-query attention runs SDPA's math path on a GPU as on meta: with
    attention dropout, each layer keeps the probabilities, a bool mask and the dropped-out
    probabilities (saved by the second matmul) instead of the probabilities alone."""
    rows = {}
    for p in (0.0, 0.1):
        path = tmp_path / str(p)
        LlamaConfig(
            hidden_size=H * D,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=H,
            num_key_value_heads=HKV,
            vocab_size=64,
            max_position_embeddings=64,
            attention_dropout=p,
        ).save_pretrained(path)
        rows[p] = EstimateBackend().measure(StepSpec(model=str(path), batch_size=B, seq_len=N))
        assert rows[p]["status"] == "ok", rows[p].get("error")
    probabilities = 2 * B * H * N * N  # elements of (B, H, N, N), both layers
    extra = rows[0.1]["activation_bytes"] - rows[0.0]["activation_bytes"]
    assert extra == probabilities * (1 + 4)  # bool mask + fp32 dropout output
