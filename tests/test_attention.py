"""The estimate attention: same numbers as eager/sdpa on CPU, flash-sized saved tensors on meta."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

from velora_cli.emulation.attention import (
    ESTIMATE_ATTENTION,
    EstimateAttentionWarning,
    flash_attention_saved_bytes,
    gpu_attention_kernel,
    register_estimate_attention,
    target_gpu,
    velora_estimate_attention,
)

# The flash kernel's tests plan for an A100: on the default H100 with torch 2.13's CUDA 13 wheel,
# torch tries cuDNN attention first (tests/test_sdpa_gqa_cudnn.py)
FLASH_GPU = "a100-80gb"

LAYERS, HEADS, HEAD_DIM = 2, 4, 16


def tiny_llama(
    attn: str, device: str = "cpu", kv_heads: int = HEADS, dtype=torch.float32
) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype)


def saved_bytes(fn, exclude=()) -> tuple[int, list[torch.Tensor]]:
    """Run `fn` and count the distinct storages autograd saves, minus those of `exclude`."""
    excluded = {id(t.untyped_storage()) for t in exclude}
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t.untyped_storage()) not in excluded:
            saved.setdefault(id(t.untyped_storage()), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(t.untyped_storage().nbytes() for t in saved.values()), list(saved.values())


def model_saved_bytes(model: LlamaForCausalLM, seq: int, batch: int = 2) -> int:
    ids = torch.zeros(batch, seq, dtype=torch.long, device=model.device)
    return saved_bytes(lambda: model(input_ids=ids, labels=ids), exclude=model.parameters())[0]


class _Attention(nn.Module):
    """The two attributes transformers' attention functions read from the module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def test_register_is_idempotent():
    assert "flash" not in ESTIMATE_ATTENTION
    assert register_estimate_attention() == ESTIMATE_ATTENTION
    assert register_estimate_attention() == ESTIMATE_ATTENTION
    assert AttentionInterface()[ESTIMATE_ATTENTION] is velora_estimate_attention
    model = tiny_llama(ESTIMATE_ATTENTION)
    assert model.config._attn_implementation == ESTIMATE_ATTENTION


@pytest.mark.parametrize("kv_heads", [HEADS, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("reference", ["eager", "sdpa"])
def test_outputs_and_grads_match_reference_on_cpu(kv_heads, reference):
    name = register_estimate_attention()
    ours, ref = tiny_llama(name, kv_heads=kv_heads), tiny_llama(reference, kv_heads=kv_heads)
    ref.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", EstimateAttentionWarning)  # no fallback on this path
        out = ours(input_ids=ids, labels=ids)
    expected = ref(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    expected.loss.backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "mqa"])
def test_one_meta_call_saves_exactly_what_flash_saves(kv_heads):
    """q, k, v (Hkv heads), out, fp32 logsumexp (B, H, N) and the rng state; no N x N tensor."""
    batch, heads, seq, head_dim = 2, 4, 64, 32
    q = torch.empty(batch, heads, seq, head_dim, device="meta", dtype=torch.bfloat16)
    k, v = (
        torch.empty(batch, kv_heads, seq, head_dim, device="meta", dtype=torch.bfloat16)
        for _ in range(2)
    )
    for t in (q, k, v):
        t.requires_grad_()
    module = _Attention(heads // kv_heads)
    with target_gpu(FLASH_GPU):
        total, saved = saved_bytes(lambda: velora_estimate_attention(module, q, k, v, None))
    assert total == flash_attention_saved_bytes(
        batch, heads, kv_heads, seq, head_dim, 2, round_to=1
    )
    assert all(t.numel() < batch * heads * seq * seq for t in saved), [t.shape for t in saved]
    lse = [t for t in saved if t.dtype == torch.float32]
    assert [tuple(t.shape) for t in lse] == [(batch, heads, seq)]


def test_fp32_on_meta_uses_the_efficient_kernel_shapes():
    """fp32 has no flash kernel on GPUs: the efficient kernel pads logsumexp rows to 32."""
    q, k, v = (torch.empty(1, 2, 40, 8, device="meta", requires_grad=True) for _ in range(3))
    _, saved = saved_bytes(lambda: velora_estimate_attention(_Attention(1), q, k, v, None))
    assert (1, 2, 64) in [tuple(t.shape) for t in saved]
    assert all(t.numel() < 2 * 40 * 40 for t in saved)  # no (B, H, N, N)


def test_gpu_kernel_choice():
    def qkv(dtype, kv_heads=4, head_dim=64):
        return (
            torch.empty(1, 4, 8, head_dim, dtype=dtype, device="meta"),
            torch.empty(1, kv_heads, 8, head_dim, dtype=dtype, device="meta"),
            torch.empty(1, kv_heads, 8, head_dim, dtype=dtype, device="meta"),
        )

    assert gpu_attention_kernel(*qkv(torch.bfloat16, kv_heads=2), gpu=FLASH_GPU) == "flash"
    assert gpu_attention_kernel(*qkv(torch.bfloat16, kv_heads=2)) == "cudnn"  # H100, cuDNN 9.20
    assert gpu_attention_kernel(*qkv(torch.float16, head_dim=512)) == "efficient"
    assert gpu_attention_kernel(*qkv(torch.float32)) == "efficient"
    assert gpu_attention_kernel(*qkv(torch.float32, kv_heads=2)) == "math"


@pytest.mark.parametrize("kv_heads", [HEADS, 2], ids=["mha", "gqa"])
def test_model_saved_bytes_meta_equal_cpu(kv_heads):
    name = register_estimate_attention()
    cpu = model_saved_bytes(tiny_llama(name, "cpu", kv_heads, torch.bfloat16), seq=64)
    with target_gpu(FLASH_GPU):
        meta = model_saved_bytes(tiny_llama(name, "meta", kv_heads, torch.bfloat16), seq=64)
    assert meta == pytest.approx(cpu, rel=0.01)
    # Exactly: the CPU flash kernel keeps no rng state; the CUDA one (and meta) keeps 16 + 8 bytes.
    assert meta - cpu == LAYERS * (16 + 8)


def test_default_sdpa_on_meta_overcounts():
    """The pitfall this module exists for: meta SDPA takes the math path and saves N x N."""
    name = register_estimate_attention()
    batch, seq = 2, 128
    ours = model_saved_bytes(tiny_llama(name, "meta", dtype=torch.bfloat16), seq, batch)
    sdpa = model_saved_bytes(tiny_llama("sdpa", "meta", dtype=torch.bfloat16), seq, batch)
    probabilities = LAYERS * batch * HEADS * seq * seq * 2  # bf16 (B, H, N, N) per layer
    assert sdpa - ours >= probabilities
    assert sdpa > 1.5 * ours


@pytest.mark.parametrize("kv_heads", [HEADS, 2], ids=["mha", "gqa"])
def test_padding_mask_runs_the_masked_kernel_with_sdpas_numbers(kv_heads):
    """A padding mask no longer falls back: same logits and grads as transformers' sdpa."""
    name = register_estimate_attention()
    ours, ref = tiny_llama(name, kv_heads=kv_heads), tiny_llama("sdpa", kv_heads=kv_heads)
    ref.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # right padding (left padding would leave fully masked rows: NaN in both)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EstimateAttentionWarning)
        out = ours(input_ids=ids, attention_mask=mask, labels=ids)
    expected = ref(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    expected.loss.backward()
    for (pname, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=pname)


def test_unpadded_mask_keeps_the_fused_path():
    """An all-ones mask (CPU) or any mask on meta (unreadable) means plain causal attention."""
    name = register_estimate_attention()
    with warnings.catch_warnings():
        warnings.simplefilter("error", EstimateAttentionWarning)
        for device in ("cpu", "meta"):
            model = tiny_llama(name, device)
            ids = torch.zeros(2, 12, dtype=torch.long, device=device)
            model(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_fallback_warnings_say_what_is_true_on_each_device():
    from velora_cli.emulation.attention import _fallback_warning

    meta = _fallback_warning("a position bias was passed", "meta", 0.0)
    assert "meta device" in meta and "too high" in meta
    cpu = _fallback_warning("the CPU flash kernel has no dropout (dropout=0.1)", "cpu", 0.1)
    assert "on the CPU" in cpu and "what this CPU run holds" in cpu and "math path" in cpu
    assert "meta" not in cpu and "too high" not in cpu
    assert "math path" not in _fallback_warning("an attention mask was passed", "cpu", 0.0)
    assert _fallback_warning("an attention mask was passed", "cuda", 0.1) is None  # the real kernel
    assert _fallback_warning("", "meta", 0.0) is None


def test_cpu_dropout_fallback_warns_about_the_cpu_not_the_estimate():
    name = register_estimate_attention()
    model = tiny_llama(name).train()
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    ids = torch.zeros(2, 12, dtype=torch.long)
    with pytest.warns(EstimateAttentionWarning, match="on the CPU that is its math path") as seen:
        model(input_ids=ids)
    assert not any("meta" in str(w.message) for w in seen)
