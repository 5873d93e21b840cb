"""An attention function whose saved-for-backward tensors match the GPU's fused SDPA kernels.

On a GPU, transformers' `sdpa` attention runs PyTorch's flash (fp16/bf16) or memory-efficient
(fp32) kernel. Both save q, k, v, the output and a float32 logsumexp for backward, never the N x N
attention matrix. On the meta device `F.scaled_dot_product_attention` takes the math path, which
saves the softmax probabilities: 29.2 GiB instead of 11.7 GiB of activations for Llama-2-7B at
batch 1, sequence 2048 (REFERENCE.md section 2). So memory estimates on meta must call the fused
kernels' ops directly; they have meta kernels and autograd formulas.

What CUDA flash attention saves per call (PyTorch 2.13, `flash_api.cpp::mha_fwd` and the
`_scaled_dot_product_flash_attention` entry of derivatives.yaml), with s bytes per element:

    q: B*H*N*d*s   k: B*Hkv*N*d*s   v: B*Hkv*N*d*s   out: B*H*N*d*s   logsumexp: B*H*N*4 (fp32)
    rng_state: 2 uint64 + 8-byte "unused" scalar, both on the GPU (one 512-byte block each)

k and v keep their Hkv heads: flash supports grouped-query attention natively and transformers
passes `enable_gqa=True` when there is no mask. The output is allocated like q (same strides), so
transformers' `.transpose(1, 2).contiguous()` copies it and o_proj saves that copy as its input.

`velora_estimate_attention` (registered as `ESTIMATE_ATTENTION`) runs:

- on meta tensors, the op the GPU would run: `_scaled_dot_product_flash_attention` for fp16/bf16
  with head_dim <= 256 (a multiple of 8), `_scaled_dot_product_efficient_attention` otherwise
  without GQA (its logsumexp is padded to a multiple of 32 rows; its two int64 philox scalars
  count 512 bytes each here but stay on the host on a GPU), and SDPA's math path for fp32 with
  GQA, as the GPU does (the efficient kernel does not support GQA);
- on CPU tensors, the CPU flash kernel `_scaled_dot_product_flash_attention_for_cpu` (same saved
  tensors, minus the rng state; it supports GQA although `F.scaled_dot_product_attention` on CPU
  would not route GQA calls to it);
- on any other device, transformers' own `sdpa_attention_forward`.

Masks: the profiler feeds full-length batches without padding, so transformers' `sdpa_mask`
(registered for this name too) returns no mask and attention is plain causal. A 4-D mask (padding,
sliding window shorter than the sequence, packed sequences), a position bias, softcapping, a paged
cache or dropout on CPU fall back to `sdpa_attention_forward` with an `EstimateAttentionWarning`
that says what is true where it runs: on meta that is the math path, which overcounts what a GPU
keeps (replayed as a GPU runs it, `math_attention.py`); on CPU it is what the CPU holds (its math
path with N x N probabilities when dropout > 0); on a GPU it is the real kernel, with no warning.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from velora_cli.methods.velora import autocast_dtype

# Must not contain "flash": transformers treats such names as kernels to fetch from the hub.
ESTIMATE_ATTENTION = "velora_estimate"

_HALF = (torch.float16, torch.bfloat16)
# The GPU keeps two rng tensors per flash call: uint64[2] and a uint64 scalar.
FLASH_RNG_STATE_BYTES = (16, 8)


class EstimateAttentionWarning(UserWarning):
    """The estimate attention fell back to SDPA; the message says what that means on the device
    it runs on (on meta the math path saves the N x N matrix; on CPU the figures are CPU's)."""


def gpu_attention_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str:
    """Name the SDPA kernel an sm80+ GPU runs for an unmasked call with these inputs.

    Args:
        query: (B, H, N, d) queries.
        key: (B, Hkv, N, d) keys; Hkv < H means grouped-query attention.
        value: (B, Hkv, N, d_v) values.

    Returns:
        "flash", "efficient" or "math" (PyTorch's sdp_utils.cpp: flash needs fp16/bf16 and
        head_dim <= 256; the efficient kernel takes any float dtype but no GQA).
    """
    head_dim = query.shape[-1]
    if (
        query.dtype in _HALF
        and head_dim <= 256
        and head_dim % 8 == 0
        and value.shape[-1] == head_dim
    ):
        return "flash"
    if query.shape[1] == key.shape[1]:
        return "efficient"
    return "math"


def flash_attention_saved_bytes(
    batch: int,
    heads: int,
    kv_heads: int,
    seq_len: int,
    head_dim: int,
    dtype_bytes: int,
    *,
    round_to: int = 512,
) -> int:
    """Bytes one CUDA flash-attention call keeps for backward (see the module docstring).

    Args:
        batch: B.
        heads: query heads H.
        kv_heads: key/value heads Hkv (H for multi-head attention).
        seq_len: N (queries and keys).
        head_dim: d.
        dtype_bytes: bytes per element of q, k, v (2 for bf16/fp16).
        round_to: allocation granularity to round each tensor up to (512 on CUDA; 1 for exact).

    Returns:
        q + k + v + out + logsumexp + rng state, each rounded up to `round_to`.
    """

    def block(nbytes: int) -> int:
        return -(-nbytes // round_to) * round_to

    q_or_out = block(batch * heads * seq_len * head_dim * dtype_bytes)
    k_or_v = block(batch * kv_heads * seq_len * head_dim * dtype_bytes)
    lse = block(batch * heads * seq_len * 4)
    return 2 * q_or_out + 2 * k_or_v + lse + sum(block(n) for n in FLASH_RNG_STATE_BYTES)


def _fallback(
    reason: str,
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    is_causal: bool | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    message = _fallback_warning(reason, query.device.type, dropout)
    if message:
        warnings.warn(message, EstimateAttentionWarning, stacklevel=3)
    return sdpa_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        **kwargs,
    )


def _fallback_warning(reason: str, device: str, dropout: float) -> str | None:
    """What a fallback to SDPA means for the backend on ``device``; None when nothing is off."""
    if not reason:
        return None
    head = f"{ESTIMATE_ATTENTION} attention falls back to SDPA ({reason})"
    if device == "meta":  # the estimate
        return (
            f"{head}; on the meta device SDPA takes its math path and saves the N x N attention "
            "matrix, which a GPU's fused kernels do not keep, so the activation estimate is too "
            "high."
        )
    if device == "cpu":  # the cpu backend: its figures are what this CPU holds
        kernel = (
            "its math path, which saves the N x N attention matrix (and, with dropout, a noise "
            "tensor of that size)"
            if dropout > 0
            else "the kernel CPU SDPA picks for these inputs"
        )
        return (
            f"{head}; on the CPU that is {kernel}: these figures are what this CPU run holds, "
            "which can be more than a GPU's fused kernels keep."
        )
    return None  # on a GPU, SDPA is the real kernel: what is measured is what it holds


def _fallback_reason(
    query: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float, kwargs: dict
) -> str:
    if attention_mask is not None:
        return "an attention mask was passed: padding, a short sliding window or packing"
    if kwargs.get("position_bias") is not None:
        return "a position bias was passed"
    if kwargs.get("softcap") is not None:
        return "softcapping"
    if kwargs.get("cache") is not None:
        return "a paged cache"
    if query.device.type == "cpu" and dropout > 0:
        return f"the CPU flash kernel has no dropout (dropout={dropout})"
    return ""


def velora_estimate_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention through the fused SDPA ops, saving what the GPU kernels save.

    Follows transformers' `sdpa_attention_forward` (is_causal resolution, cropping keys for an
    empty static cache, output transpose) but calls the kernels directly; see the module
    docstring for which kernel runs where and when it falls back.

    Args:
        module: the attention module (`num_key_value_groups` and `is_causal` are read).
        query: (B, H, N, d).
        key: (B, Hkv, Nk, d), Hkv dividing H; not repeated (the kernels do GQA natively).
        value: (B, Hkv, Nk, d).
        attention_mask: must be None for the fused path (transformers gives None when no token
            is padded); otherwise SDPA runs instead, with an `EstimateAttentionWarning`.
        dropout: attention dropout probability.
        scaling: softmax scale (default 1/sqrt(d)).
        is_causal: overrides `module.is_causal` when given.
        **kwargs: other transformers attention arguments; `position_bias`, `softcap` and `cache`
            force the SDPA fallback.

    Returns:
        (attn_output of shape (B, N, H, d), None): no attention weights, as with sdpa.
    """
    device = query.device.type
    # SDPA is on autocast's lower-precision list: under autocast (real, or emulated on meta) the
    # GPU runs it in the autocast dtype, whatever RoPE's fp32 cos/sin promoted q and k to. The
    # fused ops called below bypass autocast, so cast as it would.
    amp_dtype = autocast_dtype(device)
    if amp_dtype is not None:
        query, key, value = (t.to(amp_dtype) for t in (query, key, value))
    reason = _fallback_reason(query, attention_mask, dropout, kwargs)
    kernel = gpu_attention_kernel(query, key, value)
    if device not in ("meta", "cpu") or reason or (device == "meta" and kernel == "math"):
        # Off meta/CPU, SDPA is the real thing; on meta the math kernel is what the GPU runs too.
        return _fallback(
            reason, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs
        )

    q_length, kv_length = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_length > 1 and is_causal)
    if is_causal and kv_length > q_length:
        # As transformers does for an empty static cache: causal alignment is upper-left.
        key = key[:, :, :q_length, :]
        value = value[:, :, :q_length, :]

    if device == "cpu":
        out, _lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout, is_causal, scale=scaling
        )
    elif kernel == "flash":
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout, is_causal, False, scale=scaling
        )[0]
    else:
        needs_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, None, needs_lse, dropout, is_causal, scale=scaling
        )[0]
    # (B, H, N, d) -> (B, N, H, d); out is laid out like q, so this copies as on the GPU.
    return out.transpose(1, 2).contiguous(), None


def _estimate_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' `sdpa_mask`, except that a padding mask on meta is taken as "no padding".

    A meta tensor has no values, so whether it pads cannot be read; the profiler's batches are
    full length.
    """
    from transformers.masking_utils import sdpa_mask

    padding_mask = kwargs.get("attention_mask")
    if isinstance(padding_mask, torch.Tensor) and padding_mask.device.type == "meta":
        kwargs["attention_mask"] = None
    return sdpa_mask(*args, **kwargs)


def register_estimate_attention() -> str:
    """Register the estimate attention (and its mask function) with transformers; idempotent.

    Returns:
        The name to pass as `attn_implementation` (`ESTIMATE_ATTENTION`).

    Example:
        >>> name = register_estimate_attention()
        >>> model = LlamaForCausalLM._from_config(config, attn_implementation=name)
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ESTIMATE_ATTENTION, velora_estimate_attention)
    AttentionMaskInterface.register(ESTIMATE_ATTENTION, _estimate_mask)
    return ESTIMATE_ATTENTION
