"""FlashAttention-2 (`attn_implementation="flash_attention_2"`, the flash-attn package) on meta.

The flash-attn kernel saves q, k, v, out, an fp32 logsumexp (B, H, N) and an int64[2] rng state
(`flash_attn_interface.py` `FlashAttnFunc.forward`), as torch's flash op does, whose meta kernel
`velora_fa2_attention` (registered as `FA2_ATTENTION`) runs (torch keeps its rng state in two
tensors: 512 bytes more). It handles sliding windows and GQA natively, so no mask and no repeated
k/v; its output is allocated like q (`empty_like(q)` in `flash_api.cpp::mha_fwd`), q being laid
out (B, N, H, d) as the projection made it, so o_proj saves a view of it. Padded batches run its
varlen kernel on the real tokens (`_fa2_varlen`): there the kernel keeps its (T, H, d) output and
o_proj the zero-padded (B, N, H, d) copy `_pad_input` scatters it into, one activation more per
layer than without padding. It needs a GPU: the cpu backend refuses it (`implementations.py`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from velora_cli.emulation.attention import (
    _HALF,
    _meta_padding,
    _register_packed_detection,
    packed_rows,
    padded_real_tokens,
    without_values,
)
from velora_cli.methods.velora import autocast_dtype

# Must not contain "flash": transformers treats such names as kernels to fetch from the hub.
FA2_ATTENTION = "velora_fa2"


def velora_fa2_attention(
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
    """FlashAttention-2 as transformers runs it on a GPU, on meta tensors (module docstring).

    transformers' `_flash_attention_forward` casts fp32 q/k/v to the compute dtype first
    (`fa_peft_integration_check`: the autocast dtype here), and passes the sliding window to the
    kernel instead of a mask. With a padding mask (`--padding`) it unpads the real tokens and
    runs the varlen kernel (`_fa2_varlen`).

    Args:
        module: the attention module (`is_causal` is read).
        query: (B, H, N, d).
        key: (B, Hkv, N, d), not repeated: FA2 does GQA natively.
        value: (B, Hkv, N, d).
        attention_mask: None without padding (`flash_attention_mask` gives None), else the
            2-D padding mask.
        dropout, scaling, is_causal: as for SDPA.
        **kwargs: `sliding_window` and other transformers arguments (the window changes what is
            computed, not what is saved).

    Returns:
        (attn_output of shape (B, N, H, d), laid out like q, None).

    Raises:
        ValueError: not on meta, or a dtype FA2 has no kernel for.
    """
    if not without_values(query):
        raise ValueError(
            "flash_attention_2 runs on a CUDA GPU (the flash-attn package); velora estimates it "
            "on meta tensors only: use --backend estimate, or --attn sdpa/eager on the CPU"
        )
    amp_dtype = autocast_dtype(query.device.type)
    if query.dtype == torch.float32 and amp_dtype is not None:
        query, key, value = (t.to(amp_dtype) for t in (query, key, value))
    if query.dtype not in _HALF:
        raise ValueError("flash_attention_2 needs fp16 or bf16 q/k/v: use --dtype bf16 or --amp")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and causal)
    if attention_mask is not None:
        return _fa2_varlen(query, key, value, dropout, causal, scaling), None
    if packed_rows():
        return _fa2_packed(query, key, value, dropout, causal, scaling), None
    out = torch.ops.aten._scaled_dot_product_flash_attention(
        query, key, value, dropout, causal, False, scale=scaling
    )[0]
    return out.transpose(1, 2), None  # (B, N, H, d), laid out like q


def _fa2_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout: float,
    causal: bool,
    scaling: float | None,
) -> torch.Tensor:
    """FA2 on a padded batch, as transformers runs it (`_upad_input`, `flash_attn_varlen_func`,
    `_pad_input` in modeling_flash_attention_utils.py), for the planned padded batch: its T real
    tokens (`padded_batches`; by default one pad token, T = B*N - 1).

    q, k, v are gathered into (T, heads, d) copies (`_index_first_axis`: a reshape, itself a copy
    of the (B, N, H, d) view, then an index; the backward keeps the int64 indices); the varlen
    kernel keeps those copies, its output and an fp32 (H, T) logsumexp (torch's flash op on a
    batch of one T-token sequence keeps the same); `_pad_input` scatters the output into zeros
    (B*N, H, d) (the backward keeps the indices again). Returns (B, N, H, d).
    """
    from transformers.modeling_flash_attention_utils import _index_first_axis, _pad_input

    batch, _heads, length, _head_dim = query.shape
    tokens = padded_real_tokens() or batch * length - 1
    indices = torch.empty(tokens, dtype=torch.long, device=query.device)
    # (B, H, N, d) -> (B, N, H, d) view -> (T, H, d) copy
    q, k, v = (_index_first_axis(t.transpose(1, 2), indices) for t in (query, key, value))
    out = torch.ops.aten._scaled_dot_product_flash_attention(
        *(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)),  # (1, H, T, d) views
        dropout,
        causal,
        False,
        scale=scaling,
    )[0]
    # (1, H, T, d) laid out like q: (T, H, d) contiguous
    return _pad_input(out[0].transpose(0, 1), indices, batch, length)


def _fa2_packed(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout: float,
    causal: bool,
    scaling: float | None,
) -> torch.Tensor:
    """FA2 on a packed row (position_ids that restart, no mask), as transformers 5.25 runs it:
    `_flash_attention_forward` takes TRL's ``cu_seq_lens_*`` kwargs (``x.reshape(-1, H, d)``)
    or derives them from position_ids (`_prepare_from_posids`: ``x.contiguous().view(-1, H,
    d)``), then `flash_attn_varlen_func` and ``out.view(B, -1, H, d)``.

    q and k, made (B, H, T, d) by RoPE, are (B, T, H, d) views here that are not contiguous, so
    both reshape and contiguous copy them to (B*T, H, d); v, a view of v_proj's output, is
    already contiguous and is not copied. The varlen kernel keeps those, its (B*T, H, d) output
    and an fp32 (H, B*T) logsumexp (flash_attn_interface.py `FlashAttnVarlenFunc`), as torch's
    flash op on a (1, H, B*T, d) view keeps. No mask, no unpadding indices. Returns (B, T, H, d).
    """
    batch, heads, length, head_dim = query.shape
    # (B, H, T, d) -> (B, T, H, d) view -> (B*T, H, d): a copy unless already contiguous
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (query, key, value))
    out = torch.ops.aten._scaled_dot_product_flash_attention(
        *(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)),  # (1, H, B*T, d) views
        dropout,
        causal,
        False,
        scale=scaling,
    )[0]
    return out[0].transpose(0, 1).view(batch, length, heads, head_dim)


def _fa2_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' `flash_attention_mask`, with a meta padding mask read as
    :func:`padded_batches` says (padded: the 2-D mask itself, which it returns when a token pads).
    """
    from transformers.masking_utils import flash_attention_mask

    if _meta_padding(kwargs):
        kv_length = kwargs.get("kv_length", args[2] if len(args) > 2 else None)
        return kwargs["attention_mask"][:, -kv_length:]
    return flash_attention_mask(*args, **kwargs)


def register_fa2_attention() -> str:
    """Register the FA2 stand-in and its mask function with transformers; idempotent.

    Returns:
        The name to pass as `attn_implementation` (`FA2_ATTENTION`).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(FA2_ATTENTION, velora_fa2_attention)
    AttentionMaskInterface.register(FA2_ATTENTION, _fa2_mask)
    _register_packed_detection()
    return FA2_ATTENTION
