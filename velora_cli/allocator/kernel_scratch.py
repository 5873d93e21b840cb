"""Scratch buffers GPU kernels take from the caching allocator inside one op, and free before it
returns: invisible to the storage tracker (they are no op's output), visible to
``max_memory_allocated`` and to the segments the allocator reserves. No torch.

Each function gives the byte sizes one call allocates, in allocation order, as the CUDA code of
PyTorch 2.13 does (read at the main-branch snapshot described in allocator.py):

- flash-attention backward (``flash_api.cpp::mha_bwd``, used for fp16/bf16 SDPA): ``softmax_d``
  (B, H, ⌈N⌉₁₂₈) fp32 and the fp32 ``dq_accum`` (B, ⌈N⌉₁₂₈, H, ⌈d⌉₃₂) (non-deterministic mode);
  with grouped-query attention also ``dk_expanded``/``dv_expanded`` (B, N, H, d) in the input
  dtype, summed into dk/dv over the groups. For Llama-2-7B at batch 1 × 2048: 32.25 MiB per
  attention backward; Llama-3.2-3B at 4 × 768: 72.3 MiB.
- cuDNN attention backward (``_scaled_dot_product_cudnn_attention_backward``, what torch runs
  first on sm90/sm100 with its CUDA 13 wheels): the workspace `cudnn/MHA.cpp` takes from the
  caching allocator (``mha_graph->get_workspace_size()``). Its frontend part is the fp32
  ``dQ_accum`` (B, H, N, d): cudnn-frontend's ``SDPABackwardNode`` (stored copy of NVIDIA/
  cudnn-frontend) makes it non-virtual unless the "workspace optimization" is on, which from
  cuDNN 9.0 only a dBias output or the deterministic algorithm turns on; its
  ``get_fe_workspace_size_node`` is alibi slopes + ``dQ_accum_size`` + ``softmax_sum_size``
  (the latter below cuDNN 8.9.5 only). The engine's own part is cuDNN's and not counted; the
  forward's workspace neither.
- embedding backward (``embedding_dense_backward_cuda``): nothing for ≤ 3072 indices (a direct
  kernel); beyond, the sorted and original index arrays (``numel`` int64 each), then in
  ``embedding_backward_cuda_kernel`` the segment offsets (``numel``), two per-segment arrays
  (min(numel, vocab)), the partial-segment offsets and ``grad_weight_per_segment``, a fp32
  (``numel``/10 + min(numel, vocab), dim) buffer. cub's sort and scan temporaries (a few bytes
  per index) are left out.

Not modelled: the memory-efficient attention backward (fp32 SDPA) keeps a fp32 ``delta``
(B, H, N) and, where it splits keys, fp32 gradient accumulators; cuBLAS needs no scratch once its
workspace is set (device_memory.py models the workspace itself).
"""

from __future__ import annotations

from typing import Any

FLASH_BACKWARD = "aten::_scaled_dot_product_flash_attention_backward"
CUDNN_BACKWARD = "aten::_scaled_dot_product_cudnn_attention_backward"
EMBEDDING_BACKWARD = "aten::embedding_dense_backward"
# embedding_dense_backward_cuda takes its scratch-free path up to this many indices
EMBEDDING_DIRECT_MAX_INDICES = 3072
NROWS_PER_THREAD = 10  # EmbeddingBackwardKernel.cu: indices summed per partial segment


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def flash_attention_backward_scratch(
    batch: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, dtype_bytes: int
) -> tuple[int, ...]:
    """Bytes of the scratch tensors one flash-attention backward call allocates.

    Args:
        batch: B.
        heads: query heads H.
        kv_heads: key/value heads (H for multi-head attention).
        seq_len: N (queries and keys).
        head_dim: d.
        dtype_bytes: bytes per element of q/k/v (2 for fp16/bf16).

    Returns:
        (softmax_d, dq_accum) plus (dk_expanded, dv_expanded) under grouped-query attention.
    """
    head_size = _round_up(head_dim, 8)
    head_rounded = _round_up(head_size, 32 if head_size <= 128 else 64)
    seq_rounded = _round_up(seq_len, 128)
    sizes = [batch * heads * seq_rounded * 4, batch * seq_rounded * heads * head_rounded * 4]
    if kv_heads != heads:
        expanded = batch * seq_len * heads * head_size * dtype_bytes
        sizes += [expanded, expanded]
    return tuple(sizes)


def cudnn_attention_backward_scratch(
    batch: int, heads: int, seq_len: int, head_dim: int
) -> tuple[int, ...]:
    """Bytes of the workspace one cuDNN attention backward call takes that can be computed: the
    fp32 dQ accumulator (B, H, N, d) of cudnn-frontend's SDPA backward (module docstring); the
    part cuDNN's engine adds is not known here.
    """
    return (batch * heads * seq_len * head_dim * 4,)


def embedding_backward_scratch(num_indices: int, num_weights: int, dim: int) -> tuple[int, ...]:
    """Bytes of the scratch tensors one CUDA embedding backward allocates (see module docstring).

    Args:
        num_indices: tokens looked up (batch × sequence).
        num_weights: rows of the embedding (vocabulary).
        dim: embedding width.
    """
    if num_indices <= EMBEDDING_DIRECT_MAX_INDICES:
        return ()
    segments = min(num_indices, num_weights)
    partials = num_indices // NROWS_PER_THREAD + segments
    index = 8  # int64
    return (
        num_indices * index,  # sorted_indices
        num_indices * index,  # orig_indices
        num_indices * index,  # segment_offsets
        segments * index,  # partials_per_segment
        segments * index,  # partials_per_segment_offset
        partials * index,  # partial_segment_offset
        partials * dim * 4,  # grad_weight_per_segment (fp32 accumulators)
    )


def scratch_for_model(
    config: Any, *, micro_batch: int, seq_len: int, dtype_bytes: int
) -> dict[str, tuple[int, ...]]:
    """Op name -> one call's scratch sizes, for a decoder whose attention and embedding shapes are
    read from its (transformers) config: every attention call of such a model has one shape.

    Args:
        config: the text config (``num_attention_heads``, ``num_key_value_heads``,
            ``head_dim`` or ``hidden_size``, ``vocab_size``); missing fields drop that entry.
        micro_batch: sequences per forward.
        seq_len: tokens per sequence.
        dtype_bytes: bytes per element of the attention inputs (the compute dtype).
    """
    out: dict[str, tuple[int, ...]] = {}
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if heads and hidden:
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        out[FLASH_BACKWARD] = flash_attention_backward_scratch(
            micro_batch, heads, kv_heads, seq_len, head_dim, dtype_bytes
        )
        out[CUDNN_BACKWARD] = cudnn_attention_backward_scratch(
            micro_batch, heads, seq_len, head_dim
        )
    vocab = getattr(config, "vocab_size", None)
    if vocab and hidden:
        sizes = embedding_backward_scratch(micro_batch * seq_len, vocab, hidden)
        if sizes:
            out[EMBEDDING_BACKWARD] = sizes
    return out
