"""FLOP formulas for the ops of a training step: torch's where it has one, ours where not.

torch's `torch.utils.flop_counter.flop_registry` covers mm, addmm, bmm, baddbmm and the
convolutions; for the rest, and where torch counts what the kernel does not compute:
- fused attention (flash, memory-efficient, cuDNN, CPU flash; forward and backward): torch
  counts the full N×N score matrix even when ``is_causal`` (its comment says so); the kernels
  skip masked tiles, so we count the unmasked (query, key) pairs only;
- mv/addmv/dot (VeLoRA's compression z = X·v is an ``mv``): 2 FLOPs per multiply-add;
- grouped GEMMs (``aten::_grouped_mm``, and ``velora::grouped_mm``, its meta stand-in:
  emulation/grouped_mm.py), which torch does not count: 2·M·N·K over all groups together, the
  group sizes in ``offs`` summing to the jagged dimension (MoE experts: every routed token);
- ``_linalg_svd`` and ``linalg_qr`` (GaLore/AdaRankGrad refreshes), from Golub & Van Loan,
  *Matrix Computations* (4th ed.): R-SVD with thin U and V 6·m·n² + 20·n³ (Fig. 8.6.1),
  Householder QR with thin Q 4·n²·(m − n/3) (§5.2: R costs 2·n²·(m − n/3), forming Q as much);
- everything else, ``_foreach_*`` included: one FLOP per element written (reductions: per
  element read). These ops are bandwidth-bound; the count only keeps compute from being zero.
"""

from __future__ import annotations

import math
from typing import Any

GROUPED = ("_grouped_mm", "grouped_mm")


def grouped_gemm(bound: dict[str, Any]) -> tuple[int, tuple[int, int, int, int]]:
    """FLOPs and (groups, m, n, k) of a grouped GEMM (``_grouped_mm``'s layouts, GroupedMMUtils.h).

    The jagged dimension (2-D operands, split by ``offs``) is all routed rows; on meta its split
    is unknown, so the shape takes G equal groups of ceil(rows / G) (what a balanced router gives;
    CUDA's fallback runs one GEMM per group, an A100's every time): the shape only sets the
    efficiency, the FLOPs are exact.
    """
    a = bound.get("mat_a", bound.get("self"))
    b = bound.get("mat_b", bound.get("mat2"))
    if a.dim() == 3 and b.dim() == 3:  # a bmm
        groups, m, k = a.shape
        n = b.shape[-1]
        return 2 * groups * m * n * k, (groups, m, n, k)
    offs = bound["offs"]
    groups = offs.shape[0]
    if a.dim() == 2 and b.dim() == 2:  # (M, total K) x (total K, N): a K split per group
        (m, k), n = a.shape, b.shape[1]
        return 2 * m * n * k, (groups, m, n, -(-k // groups))
    if a.dim() == 2:  # (total M, K) x (G, K, N): the MoE forward and input gradient
        (m, k), n = a.shape, b.shape[-1]
        return 2 * m * n * k, (groups, -(-m // groups), n, k)
    _, m, k = a.shape  # (G, M, K) x (K, total N)
    n = b.shape[1]
    return 2 * m * n * k, (groups, m, -(-n // groups), k)


def gemm_shape(op: str, bound: dict[str, Any]) -> tuple[int, int, int, int]:
    """(batch, m, n, k) of a matrix-product op: out (m×n) = (m×k)·(k×n), ``batch`` times."""
    if op in GROUPED:
        return grouped_gemm(bound)[1]
    if op in ("mm", "_scaled_mm"):
        a, b = bound["self"], bound["mat2"]
    elif op == "addmm":
        a, b = bound["mat1"], bound["mat2"]
    elif op == "bmm":
        a, b = bound["self"], bound["mat2"]
    elif op in ("baddbmm", "addbmm"):
        a, b = bound["batch1"], bound["batch2"]
    elif op in ("mv", "addmv"):
        a = bound["self"] if op == "mv" else bound["mat"]
        return 1, a.shape[0], 1, a.shape[1]
    elif op in ("dot", "vdot"):
        return 1, 1, 1, bound["self"].shape[0]
    else:
        raise KeyError(op)
    if a.dim() == 3:  # (batch, m, k) · (batch, k, n)
        return a.shape[0], a.shape[1], b.shape[2], a.shape[2]
    return 1, a.shape[0], b.shape[1], a.shape[1]


def _attention_pairs(q_len: int, kv_len: int, causal: bool) -> int:
    """(query, key) pairs a fused kernel computes. Causal masking is upper-left aligned (query i
    sees keys 0..i), as in PyTorch's fused kernels and the estimate's attention, which crops keys
    to the query length as transformers does."""
    if not causal:
        return q_len * kv_len
    n = min(q_len, kv_len)
    return n * (n + 1) // 2 + (q_len - n) * kv_len


def attention_flops(op: str, bound: dict[str, Any]) -> int:
    """FLOPs of a fused attention op, counting only unmasked (query, key) pairs.

    Forward: S = Q·Kᵀ and O = P·V, 2·pairs·(d + d_v) per (batch, head). Backward (as torch's
    ``sdpa_backward_flop_count``): S recomputed, dP = dO·Vᵀ, dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q,
    2·pairs·(3·d + 2·d_v). Query heads H (grouped-query attention broadcasts the kv heads).
    """
    q, k, v = bound["query"], bound["key"], bound["value"]
    batch, heads, q_len, d = q.shape
    kv_len, d_v = k.shape[2], v.shape[3]
    pairs = batch * heads * _attention_pairs(q_len, kv_len, bool(bound.get("is_causal", False)))
    if op.endswith("_backward"):
        return 2 * pairs * (3 * d + 2 * d_v)
    return 2 * pairs * (d + d_v)


def linalg_flops(op: str, bound: dict[str, Any]) -> int:
    """FLOPs of a dense factorization (Golub & Van Loan, see the module docstring)."""
    a = bound.get("A", bound.get("self"))
    *batch, rows, cols = a.shape
    big, small = max(rows, cols), min(rows, cols)
    count = math.prod(batch)
    if op == "_linalg_svd":
        return count * (6 * big * small**2 + 20 * small**3)
    if op in ("linalg_qr", "geqrf", "linalg_householder_product", "ormqr"):
        return count * 4 * small**2 * (big - small // 3)
    if op in ("_linalg_eigh",):
        return count * 9 * small**3  # tridiagonalization + QR iterations with vectors (GVL §8.3)
    return count * 2 * big * small**2  # solves and Cholesky: 2·m·n², an upper bound


def op_flops(kind: str, op: str, func, bound, args, kwargs, out, written, read) -> int:
    """FLOPs of one op of class ``kind``, its arguments bound to their schema names.

    Args:
        kind, op: the op's class and aten name (`opcount.op_cost` decides them).
        func, args, kwargs, out: the dispatched overload, its arguments and result (torch's
            registry formulas take these).
        bound: the arguments by schema name.
        written, read: the tensors the op writes and reads.
    """
    if kind == "attention":
        return attention_flops(op, bound)
    if kind == "linalg":
        return linalg_flops(op, bound)
    if kind == "gemm":
        from torch.utils.flop_counter import flop_registry

        if op in GROUPED:
            return grouped_gemm(bound)[0]
        formula = flop_registry.get(func.overloadpacket)
        if formula is not None:
            return int(formula(*args, **kwargs, out_val=out))
        batch, m, n, k = gemm_shape(op, bound)
        return 2 * batch * m * n * k
    if kind == "reduction":
        return sum(t.numel() for t in read)
    return sum(t.numel() for t in written)
