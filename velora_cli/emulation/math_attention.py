"""SDPA's math path on meta tensors, replayed op by op as it runs on a GPU.

On meta, ``F.scaled_dot_product_attention`` always takes the math path. A GPU takes it too
where the fused kernels refuse the inputs (fp32 with grouped-query attention: the
memory-efficient kernel has no GQA, flash no fp32), and the estimate falls back to it on meta for
masks, softcapping and the like (``emulation/attention.py``). The path is ATen C++
(``_scaled_dot_product_attention_math`` in aten/src/ATen/native/transformers/attention.cpp,
PyTorch 2.13), so its inner ops are out of reach of a torch-function mode, and two of them differ
between a GPU step and the estimate's meta step:

- ``at::dropout(attn, p, true)`` on the N x N probabilities keeps a noise tensor in the
  probabilities' dtype on meta and a bool mask on CUDA (``emulation/dropout.py``);
- the mask is added in place (``attn.add_(mask)``) unless ``at::areAnyTensorSubclassLike``,
  which is true for every meta tensor (``BackendComponent::MetaBit`` is in
  ``kTensorSubclassLike``, ATen/TensorSubclassLikeUtils.h) and under any dispatch mode: on meta
  the add allocates a second N x N score tensor that the GPU never holds.

``math_attention`` calls the same ATen ops in the same order (the op sequence is checked against
the real path in tests/test_math_attention.py) with those two as on CUDA. What it replays, for
inputs (B, H, L, d), keys/values (B, Hkv, S, d):

    bool mask -> where(mask, 0, -inf)                      (convert_boolean_attn_mask)
    fp16/bf16 -> q, k, v .to(float32)  unless allow_fp16_bf16_reduction_math_sdp
    q = q * sqrt(scale)                                    (scale = 1/sqrt(d) by default)
    is_causal -> mask = where(ones(L, S).tril(), 0, -inf)
    enable_gqa -> k, v = repeat_interleave(H / Hkv, dim=-3)
    attn = q @ (k^T * sqrt(scale))                         (B, H, L, S)
    attn.add_(mask); attn = _safe_softmax(attn, -1); attn = dropout(attn, p)
    out = (attn @ v).to(dtype)                             (B, H, L, d)

``MetaMathAttention`` routes meta-tensor SDPA calls to it; nested tensors and anything else it
does not replay go to the real op.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from velora_cli.emulation.dropout import fused_on_cuda

_HALF = (torch.float16, torch.bfloat16)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = attend) as 0 / -inf of ``dtype`` (sdp::convert_boolean_attn_mask)."""
    neg_inf = torch.scalar_tensor(-math.inf, dtype=dtype, device=mask.device)
    zero = torch.scalar_tensor(0.0, dtype=dtype, device=mask.device)
    return torch.where(mask, zero, neg_inf)


def math_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` through the math path, as a CUDA device runs it.

    Args:
        query: (B, H, L, d).
        key: (B, Hkv, S, d); Hkv divides H when ``enable_gqa``.
        value: (B, Hkv, S, d_v).
        attn_mask: bool (True = attend) or additive float mask broadcastable to (B, H, L, S).
        dropout_p: dropout probability on the attention probabilities (always applied, as SDPA
            does: the caller passes 0 in eval).
        is_causal: upper-left causal mask; not together with ``attn_mask``.
        scale: softmax scale (default 1/sqrt(d)).
        enable_gqa: repeat k and v to H heads.

    Returns:
        (B, H, L, d_v) in the query's dtype.
    """
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = _additive(attn_mask, query.dtype)
    origin_dtype = query.dtype
    if origin_dtype in _HALF and not torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed():
        query, key, value = query.to(torch.float32), key.to(torch.float32), value.to(torch.float32)
    # q and k are each scaled by sqrt(scale) before the matmul, for stability (attention.cpp).
    scale_value = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    sign = -1.0 if scale_value < 0 else 1.0
    root = math.sqrt(abs(scale_value))
    query = torch.ops.aten.mul.Scalar(query, sign * root)
    if is_causal:
        length, source = query.shape[-2], key.shape[-2]
        causal = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        attn_mask = _additive(causal, query.dtype)
    if enable_gqa and not (query.shape[-3] == key.shape[-3] == value.shape[-3]):
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], -3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], -3)
    attn = torch.matmul(query, torch.ops.aten.mul.Scalar(key.transpose(-2, -1), root))  # (B,H,L,S)
    if attn_mask is not None:
        attn.add_(attn_mask)  # in place, as on a GPU (meta tensors take the out-of-place add)
    attn = torch.ops.aten._safe_softmax(attn, -1)
    if dropout_p > 0.0:
        if fused_on_cuda(attn, dropout_p, True):
            attn = torch.native_dropout(attn, dropout_p, True)[0]
        else:
            attn = torch.dropout(attn, dropout_p, True)
    # ATen returns make_tuple(matmul(attn, v).to(dtype), attn.to(dtype)); the compiler evaluates
    # the second argument first (the real path's op order shows it). SDPA drops that copy.
    _probabilities = attn.to(origin_dtype)
    out = torch.matmul(attn, value).to(origin_dtype)
    del _probabilities
    return out


def _sdpa_args(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
):
    return dict(
        query=query,
        key=key,
        value=value,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
    )


def _replays(call: dict) -> bool:
    tensors = [call["query"], call["key"], call["value"]]
    return (
        all(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tensors)
        and not any(t.is_nested for t in tensors)
        and min(t.dim() for t in tensors) >= 3
        and not (call["is_causal"] and call["attn_mask"] is not None)  # SDPA's own error
    )


def emulate(func, args: tuple, kwargs: dict):
    """One SDPA call: ``math_attention`` where it replays the inputs, with torch-function modes
    disabled as ATen's C++ body would have them; the call itself otherwise."""
    call = _sdpa_args(*args, **kwargs)
    if _replays(call):
        with torch._C.DisableTorchFunction():
            return math_attention(**call)
    return func(*args, **kwargs)


# the torch functions this module emulates, each with its handler (emulation/step.py)
EMULATES = {F.scaled_dot_product_attention: emulate}


class MetaMathAttention(TorchFunctionMode):
    """``with MetaMathAttention():`` — meta SDPA calls run ``math_attention``.

    The replay runs with torch-function modes disabled, as ATen's C++ body would.

    Example:
        >>> q = torch.empty(1, 4, 16, 8, device="meta", requires_grad=True)
        >>> with MetaMathAttention():
        ...     out = F.scaled_dot_product_attention(q, q, q, dropout_p=0.1, is_causal=True)
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in EMULATES:
            return emulate(func, args, kwargs)
        return func(*args, **kwargs)
