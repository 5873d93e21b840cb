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

- on meta tensors, the op the GPU would run (below): `_scaled_dot_product_flash_attention`,
  `_scaled_dot_product_efficient_attention` (its logsumexp is padded to a multiple of 32 rows;
  its two int64 philox scalars count 512 bytes each here but stay on the host on a GPU),
  `_scaled_dot_product_cudnn_attention` (q, k, v, out, an fp32 logsumexp (B, H, N, 1), seed and
  offset, the bias as passed), or SDPA's math path where no fused kernel qualifies;
- on CPU tensors, the CPU flash kernel `_scaled_dot_product_flash_attention_for_cpu` (same saved
  tensors, minus the rng state; it supports GQA although `F.scaled_dot_product_attention` on CPU
  would not route GQA calls to it);
- on any other device, transformers' own `sdpa_attention_forward`.

Which kernel: the one PyTorch 2.13 would pick on the GPU the estimate predicts for
(`gpus.sdpa_backends`, set with :func:`target_gpu`; `gpus.DEFAULT_GPU` otherwise): cuDNN first on
sm90/sm100 with the cuDNN > 9.15 of torch 2.13's CUDA 13 wheels; flash needs sm80+, fp16/bf16 and
no mask; the memory-efficient kernel takes fp32, sm70/sm75 and masks, but not `enable_gqa`
(which transformers passes for GQA without a mask), so such a call on a T4/V100 or in fp32 is
the math path, as on the GPU (there it keeps the N x N matrix too). With ``repeat_kv``
(`StepSpec.repeat_kv`, `ESTIMATE_ATTENTION_REPEAT_KV`) K/V are repeated first, as older
transformers and harness shims do, and the call has equal heads.

Masks (a sliding window shorter than the sequence, padding, packed sequences without varlen):
transformers gives a 4-D bool mask; flash refuses it, so the efficient kernel runs. As SDPA and
transformers do on a GPU (kernels.md A.2), per call:

- transformers repeats k and v to H heads (`repeat_kv`: it asks for `enable_gqa` only without a
  mask), materialised copies that the kernel saves;
- SDPA converts the bool mask to an additive one in q's dtype (`where(mask.logical_not(), -inf,
  0)`: a dense (B, 1, N, N) tensor even from a stride-0 expand), padded to a multiple of 8 keys
  (`preprocess_mask`), and the kernel saves it: one copy per layer;
- the efficient kernel saves q, k, v, out and an fp32 logsumexp of ceil32(N) rows, never the
  (B, H, N, N) probabilities.

On CPU the masked call runs the CPU flash kernel with the same converted mask; it saves the same
set (q, k, v, out, logsumexp of N rows, the mask), so the cpu backend's tracker checks it.

A position bias, softcapping, a paged cache or dropout on CPU fall back to
`sdpa_attention_forward` with an `EstimateAttentionWarning` that says what is true where it
runs: on meta that is the math path, which overcounts what a GPU keeps (replayed as a GPU runs it,
`math_attention.py`); on CPU it is what the CPU holds (its math path with N x N probabilities
when dropout > 0); on a GPU it is the real kernel, with no warning.

FlashAttention-2 is in `flash_attention_2.py`; `implementations.py` maps `--attn` to what each
device is built with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from velora_cli.methods.velora import autocast_dtype

# Must not contain "flash": transformers treats such names as kernels to fetch from the hub.
ESTIMATE_ATTENTION = "velora_estimate"
ESTIMATE_ATTENTION_REPEAT_KV = "velora_estimate_repeat_kv"  # K/V repeated before SDPA

_TARGET_GPU: list[_Target] = []  # the GPU the kernel choice is made for (innermost last)
# how meta batches stand for real ones (innermost last): padded, real tokens of a padded batch
# (None: all but one), packed rows (position_ids restart)
_PADDED: list[tuple[bool, int | None, bool]] = []

_HALF = (torch.float16, torch.bfloat16)
# The GPU keeps two rng tensors per flash call: uint64[2] and a uint64 scalar.
FLASH_RNG_STATE_BYTES = (16, 8)


@dataclasses.dataclass
class _Target:
    """What :func:`target_gpu` set: the GPU, the cuDNN torch's wheel ships, and the kernels the
    meta calls ran (``"math (gqa)"``: the math path because of `enable_gqa`)."""

    gpu: str
    cudnn_version: int | None
    kernels: set[str] = dataclasses.field(default_factory=set)


class EstimateAttentionWarning(UserWarning):
    """The estimate attention fell back to SDPA; the message says what that means on the device
    it runs on (on meta the math path saves the N x N matrix; on CPU the figures are CPU's)."""


@contextlib.contextmanager
def target_gpu(gpu: str | None, cuda_version: str | None = None) -> Iterator[set[str]]:
    """Choose attention kernels for ``gpu`` (a `velora_cli.gpus` key) in the enclosed code, with
    the cuDNN that torch 2.13's wheel for ``cuda_version`` ships (`gpus.torch_cudnn_version`;
    None: its CUDA 13.0 wheel).

    A module-level stack rather than a context variable: autograd may run backward (and a
    checkpoint's recomputation) on another thread, where the choice must hold too.

    Yields:
        The set of kernels the meta attention calls inside ran (filled as they run):
        ``flash``, ``efficient``, ``cudnn``, ``math``, or ``math (gqa)``.
    """
    from velora_cli.gpus import torch_cudnn_version

    target = _Target(gpu or "", torch_cudnn_version(cuda_version))
    _TARGET_GPU.append(target)
    try:
        yield target.kernels
    finally:
        _TARGET_GPU.pop()


@contextlib.contextmanager
def padded_batches(
    padded: bool, real_tokens: int | None = None, packed: bool = False
) -> Iterator[None]:
    """Read meta batches in the enclosed code as padded (``--padding``), packed (``--packing``)
    or full length.

    A meta tensor has no values, so whether a batch pads or packs cannot be read from it: the
    step says. Padded means the longest sequence is the full length and ``real_tokens`` of the
    batch are real (None: all but one), so transformers builds its masks (a dense (B, 1, N, N)
    bool for SDPA and eager, the 2-D mask and unpadding of the real tokens for
    FlashAttention-2). Packed means the row's ``position_ids`` restart: transformers'
    `find_packed_sequence_indices` finds several sequences (a dense block-diagonal (B, 1, T, T)
    bool for SDPA and eager; FlashAttention-2's varlen kernel on the flattened row).
    """
    _PADDED.append((padded, real_tokens, packed))
    try:
        yield
    finally:
        _PADDED.pop()


def padded_real_tokens() -> int | None:
    """The real tokens of the padded batch the enclosing `padded_batches` names (None: all but
    one pad token)."""
    return _PADDED[-1][1] if _PADDED else None


def packed_rows() -> bool:
    """Whether the enclosing `padded_batches` says meta rows are packed."""
    return bool(_PADDED and _PADDED[-1][2])


def _find_packed_sequence_indices(position_ids: torch.Tensor) -> torch.Tensor | None:
    """transformers' `find_packed_sequence_indices`, where position ids without values are read
    as :func:`padded_batches` says (packed: sequence indices of their shape, else None, one
    sequence per row); real position ids go to transformers' own function."""
    if without_values(position_ids):
        return torch.zeros_like(position_ids) if packed_rows() else None
    return _TRANSFORMERS_FIND_PACKED[0](position_ids)


_TRANSFORMERS_FIND_PACKED: list[Any] = []


def _register_packed_detection() -> None:
    """Route transformers' packed-sequence detection (`masking_utils._preprocess_mask_arguments`
    calls it by its module name) through :func:`_find_packed_sequence_indices`; idempotent."""
    from transformers import masking_utils

    if masking_utils.find_packed_sequence_indices is not _find_packed_sequence_indices:
        _TRANSFORMERS_FIND_PACKED[:] = [masking_utils.find_packed_sequence_indices]
        masking_utils.find_packed_sequence_indices = _find_packed_sequence_indices


def without_values(tensor: torch.Tensor) -> bool:
    """A meta tensor, or a fake one (the estimate's ranks, `parallel.fake`): shapes, no values."""
    from torch._subclasses.fake_tensor import is_fake

    return tensor.device.type == "meta" or is_fake(tensor)


def _meta_padding(kwargs: dict[str, Any]) -> bool:
    """Whether the mask function's padding mask is one without values to read as "padded"; one
    read as "no padding" is removed from ``kwargs``."""
    padding_mask = kwargs.get("attention_mask")
    if not (isinstance(padding_mask, torch.Tensor) and without_values(padding_mask)):
        return False
    if _PADDED and _PADDED[-1][0]:
        return True
    kwargs["attention_mask"] = None
    return False


_FROM_TARGET = object()


def gpu_attention_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    has_mask: bool = False,
    dropout: float = 0.0,
    gpu: str | None = None,
    cudnn_version: Any = _FROM_TARGET,
    reason: bool = False,
) -> str:
    """Name the SDPA kernel a GPU runs for a call with these inputs.

    Args:
        query: (B, H, N, d) queries.
        key: (B, Hkv, N, d) keys; Hkv < H means grouped-query attention.
        value: (B, Hkv, N, d_v) values.
        has_mask: an explicit attention mask is passed (flash refuses it).
        dropout: the attention dropout probability.
        gpu: a `velora_cli.gpus` key; None: the one :func:`target_gpu` set, else the default.
        cudnn_version: the runtime cuDNN (e.g. 92000), None for none; default: the one
            :func:`target_gpu` set, else torch 2.13's CUDA 13.0 wheel's.
        reason: name the math path taken because of `enable_gqa` ``"math (gqa)"``.

    Returns:
        "flash", "efficient", "cudnn" or "math": the first of `gpus.sdpa_backends` (PyTorch's
        sdp_utils.cpp as torch 2.13 has it). Without a mask and with fewer key/value heads,
        transformers passes `enable_gqa` (``use_gqa_in_sdpa``): flash and cuDNN take it, torch
        2.13's memory-efficient kernel does not, so on a T4/V100 or in fp32 that call is the math
        path. One refinement kept from before: flash only for head dims that are multiples of 8
        (others go to the efficient kernel here).
    """
    from velora_cli.gpus import get_gpu, sdpa_backends, torch_cudnn_version

    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    head_dim = query.shape[-1]
    current = _TARGET_GPU[-1] if _TARGET_GPU else None
    target = get_gpu(gpu or (current.gpu if current else None))
    if cudnn_version is _FROM_TARGET:
        cudnn_version = current.cudnn_version if current and not gpu else torch_cudnn_version()
    training = any(t.requires_grad for t in (query, key, value))
    dtype = names.get(query.dtype)
    if dtype is None:
        return "math"
    # transformers' use_gqa_in_sdpa: enable_gqa only without a mask (else repeat_kv first)
    gqa = not has_mask and query.shape[-3] != key.shape[-3]

    def backends(mask: bool, gqa: bool) -> list[str]:
        return sdpa_backends(
            target, dtype, mask, head_dim, dropout,
            training=training, cudnn_version=cudnn_version, gqa=gqa,
        )  # fmt: skip

    order = backends(has_mask, gqa)
    first = order[0]
    if first == "flash_attention" and (head_dim % 8 or value.shape[-1] != head_dim):
        first = next(b for b in order if b != "flash_attention")  # math always ends it
    if first == "math" and reason and gqa and backends(has_mask, False)[0] != "math":
        return "math (gqa)"
    return {
        "flash_attention": "flash",
        "efficient_attention": "efficient",
        "cudnn_attention": "cudnn",
    }.get(first, "math")


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
    if attention_mask is not None and attention_mask.dim() != 4:
        return "an attention mask that is not 4-D"
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
    *,
    repeat_kv: bool = False,
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
        repeat_kv: K/V are repeated to the query heads before SDPA even without a mask (what
            transformers did before it passed `enable_gqa`, and harness shims such as
            fitcheck's): SDPA then sees equal heads and no `enable_gqa`, and the kernel saves
            the repeated (B, H, N, d) copies (`register_estimate_attention(repeat_kv=True)`).
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
    masked = attention_mask is not None
    if repeat_kv and not masked:
        # repeat_kv / repeat_interleave before SDPA: a (B, H, N, d) copy of each, no enable_gqa
        # (transformers' own sdpa path repeats them itself when there is a mask)
        key, value = _repeat_kv(key, module), _repeat_kv(value, module)
    kernel = gpu_attention_kernel(
        query, key, value, has_mask=masked, dropout=dropout, reason=device == "meta"
    )
    if device == "meta" and _TARGET_GPU and not reason:
        _TARGET_GPU[-1].kernels.add(kernel)
    kernel = "math" if kernel.startswith("math") else kernel
    if device not in ("meta", "cpu") or reason or (device == "meta" and kernel == "math"):
        # Off meta/CPU, SDPA is the real thing; on meta the math kernel is what the GPU runs too.
        return _fallback(
            reason, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs
        )

    q_length, kv_length = query.shape[2], key.shape[2]
    if masked:
        # transformers: is_causal only without a mask; repeat_kv since no enable_gqa with one
        is_causal = False
        key, value = _repeat_kv(key, module), _repeat_kv(value, module)
        if kernel == "cudnn":  # convert_boolean_attn_mask_cudnn: dense (B, 1, N, Nk), as passed
            bias = _sdpa_bias(attention_mask, query.dtype, None)
        else:
            bias = _sdpa_bias(attention_mask, query.dtype, query.shape[1])
    else:
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        is_causal = bool(q_length > 1 and is_causal)
        bias = None
    if is_causal and kv_length > q_length:
        # As transformers does for an empty static cache: causal alignment is upper-left.
        key = key[:, :, :q_length, :]
        value = value[:, :, :q_length, :]

    if device == "cpu":
        out, _lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout, is_causal, attn_mask=bias, scale=scaling
        )
    elif kernel == "flash":
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout, is_causal, False, scale=scaling
        )[0]
    elif kernel == "cudnn":
        # saves q, k, v (GQA not repeated), out, an fp32 logsumexp (B, H, N, 1), the philox seed
        # and offset, and the bias as passed; its cuDNN workspace is not a tensor (see
        # `CUDNN_WORKSPACE_NOTE`)
        needs_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, key, value, bias, needs_lse, dropout, is_causal, False, scale=scaling
        )[0]
    else:
        needs_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, needs_lse, dropout, is_causal, scale=scaling
        )[0]
    # (B, H, N, d) -> (B, N, H, d); out is laid out like q, so this copies as on the GPU.
    return out.transpose(1, 2).contiguous(), None


# cudnn/MHA.cpp: the forward and the backward each take `mha_graph->get_workspace_size()` bytes
# from the caching allocator for the call. Of the backward's, the cudnn-frontend part (an fp32 dQ
# accumulator) is counted as kernel scratch (allocator/kernel_scratch.py); what cuDNN's engine
# adds, and the forward's, is decided by cuDNN when it builds the graph.
CUDNN_WORKSPACE_NOTE = (
    "of its workspace only the backward's fp32 dQ accumulator (B, H, N, d) is counted; what "
    "cuDNN's engine adds (sized at run time) is not"
)


def sdpa_note(kernels: set[str], gpu: str | None, cuda_version: str | None = None) -> str | None:
    """What a profile document says about the SDPA kernels a step's meta calls ran on ``gpu``
    (the set :func:`target_gpu` yields); None where nothing needs saying (flash, efficient).
    """
    from velora_cli.gpus import SDPA_TORCH, TORCH_DEFAULT_CUDA, get_gpu, torch_cudnn_version

    name = get_gpu(gpu).key
    notes = []
    if "cudnn" in kernels:
        cudnn = torch_cudnn_version(cuda_version) or 0
        cuda = cuda_version or f"{TORCH_DEFAULT_CUDA} (assumed)"
        notes.append(
            f"SDPA runs cuDNN attention on {name}, which torch {SDPA_TORCH} tries first there "
            f"(check_prefer_cudnn_attention: cuDNN {cudnn // 10000}.{cudnn // 100 % 100} > 9.15 "
            f"in its CUDA {cuda} wheel): it keeps q, k, v, the output and an fp32 logsumexp "
            f"(B, H, N, 1), like flash; {CUDNN_WORKSPACE_NOTE}"
        )
    if "math (gqa)" in kernels:
        notes.append(
            f"SDPA runs its math path on {name} (the N x N attention is kept): without a mask "
            "transformers passes enable_gqa for grouped-query attention, and torch "
            f"{SDPA_TORCH}'s memory-efficient kernel has no GQA (pytorch#191085 adds it later); "
            "K/V repeated before SDPA (--repeat-kv, as older transformers did) run the "
            "memory-efficient kernel instead"
        )
    return "; ".join(notes) or None


def _repeat_kv(states: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """transformers' `repeat_kv`: (B, Hkv, N, d) -> (B, H, N, d), a copy when Hkv < H."""
    from transformers.integrations.sdpa_attention import repeat_kv

    return repeat_kv(states, getattr(module, "num_key_value_groups", 1))


def _sdpa_bias(mask: torch.Tensor, dtype: torch.dtype, heads: int | None) -> torch.Tensor:
    """The additive mask SDPA builds from transformers' 4-D mask and passes to its kernel.

    attention.cpp `convert_boolean_attn_mask`: `where(mask.logical_not(), -inf, 0)` in q's dtype,
    dense over the mask's broadcast shape (B, 1, N, Nk); the efficient kernel's `preprocess_mask`
    pads the key dimension to a multiple of 8 (`pad_bias`: pad, then slice back) when the rows are
    not aligned, and expands over heads (a view). A float mask is used as is.

    Returns:
        (B, H, N, Nk): a view of the converted (B, 1, N, ceil8(Nk)) storage; ``heads`` None
        (cuDNN): the converted (B, 1, N, Nk) itself, dense, unpadded.
    """
    if mask.dtype == torch.bool:
        mask = torch.where(
            mask.logical_not(),
            torch.tensor(float("-inf"), dtype=dtype, device=mask.device),
            torch.tensor(0.0, dtype=dtype, device=mask.device),
        )
    else:
        mask = mask.to(dtype)
    if heads is None:
        return mask
    keys = mask.shape[-1]
    if keys % 8 or any(stride % 8 for stride in mask.stride()[:-1]) or mask.stride(-1) != 1:
        padded = -(-keys // 8) * 8
        mask = torch.nn.functional.pad(mask, (0, padded - keys))[..., :keys]
    batch, _, q_len, _ = mask.shape
    return mask.expand(batch, heads, q_len, keys)


def _estimate_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' `sdpa_mask`, with a meta padding mask read as :func:`padded_batches` says.

    Padded: the mask is built without the "all ones" skip, which reads values (what transformers
    builds for a batch that pads: causal AND padding, a dense (B, 1, N, N) bool).
    """
    from transformers.masking_utils import sdpa_mask

    if _meta_padding(kwargs):
        kwargs["allow_is_causal_skip"] = False
        kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _meta_eager_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' `eager_mask`, with a meta padding mask read as "no padding" (its values,
    which transformers reads to skip an all-ones mask, do not exist on meta); the same function
    for real tensors."""
    from transformers.masking_utils import eager_mask

    if _meta_padding(kwargs):
        kwargs["allow_is_bidirectional_skip"] = False
    return eager_mask(*args, **kwargs)


def _register_meta_eager_mask() -> None:
    """Make transformers' "eager" mask function meta-safe, process-wide: the attention function
    stays each model's own `eager_attention_forward`, which no other name would pick."""
    from transformers.masking_utils import AttentionMaskInterface

    AttentionMaskInterface.register("eager", _meta_eager_mask)
    _register_packed_detection()


def register_estimate_attention(*, repeat_kv: bool = False) -> str:
    """Register the estimate attention (and its mask function) with transformers; idempotent.

    Args:
        repeat_kv: the variant that repeats K/V to the query heads before SDPA also without a
            mask (`ESTIMATE_ATTENTION_REPEAT_KV`; `StepSpec.repeat_kv`).

    Returns:
        The name to pass as `attn_implementation` (`ESTIMATE_ATTENTION`, or
        `ESTIMATE_ATTENTION_REPEAT_KV`).

    Example:
        >>> name = register_estimate_attention()
        >>> model = LlamaForCausalLM._from_config(config, attn_implementation=name)
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ESTIMATE_ATTENTION, velora_estimate_attention)
    AttentionMaskInterface.register(ESTIMATE_ATTENTION, _estimate_mask)
    _register_packed_detection()
    if not repeat_kv:
        return ESTIMATE_ATTENTION
    AttentionInterface.register(
        ESTIMATE_ATTENTION_REPEAT_KV, functools.partial(velora_estimate_attention, repeat_kv=True)
    )
    AttentionMaskInterface.register(ESTIMATE_ATTENTION_REPEAT_KV, _estimate_mask)
    return ESTIMATE_ATTENTION_REPEAT_KV
