"""What every op of a training step computes and moves: FLOPs and bytes, op by op.

`OpCounter` is a `TorchDispatchMode` that sees every aten op the step dispatches (forward,
backward — a checkpoint's recomputed forward included — and the optimizer step) and records
one `OpCost` for each: its class (`KINDS`), math precision, FLOPs, bytes moved, and for GEMMs the
shape. Nothing is special-cased per strategy: VeLoRA's compression and factorized weight gradient,
QLoRA's dequantization, the low-rank optimizers' projections and SVD/QR refreshes are ops like
any other and come out of the same rules. It runs on meta tensors (the estimate backend), where
shapes, dtypes and strides are all it needs.

FLOPs: torch's own formulas where it has them, ours otherwise (timing/flops.py).

Bytes: every tensor an op reads plus every tensor it writes, each counted by its distinct
elements (a broadcast dimension with stride 0 is read once), the same tensor read twice counted
once. Written = the arguments the schema marks as mutated (in-place ops, ``out=``, ``_foreach_*_``)
or else the returned tensors; an ``out=`` argument and the target of a fill (``zero_``,
``fill_``, ``copy_``'s destination, random fills) are written, not read. Gathers (embedding,
index_select, nll_loss) read as many source rows as they fetch, not the whole table. Views and
other metadata-only ops (their outputs alias their inputs), bare allocations (``empty``) and
ops with no tensor on the counted device (AdamW's step counters live on the host) move nothing
and launch nothing.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from velora_cli.measure.meta_ops import OpKey, _Bypass, _key
from velora_cli.timing.flops import gemm_shape, op_flops

# Op classes: each has its own efficiency in the roofline (timing/roofline.py).
KINDS = ("gemm", "attention", "linalg", "elementwise", "reduction", "copy", "foreach")

_GEMM = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "_scaled_mm",
         "_grouped_mm", "grouped_mm"}  # fmt: skip
_ATTENTION = {
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_cudnn_attention_backward",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
}
_LINALG = {
    "_linalg_svd",
    "linalg_qr",
    "_linalg_eigh",
    "linalg_cholesky_ex",
    "_linalg_solve_ex",
    "linalg_householder_product",
    "geqrf",
    "ormqr",
    "linalg_solve_triangular",
    "triangular_solve",
}
_REDUCTION = {
    "sum",
    "mean",
    "amax",
    "amin",
    "max",
    "min",
    "prod",
    "norm",
    "linalg_vector_norm",
    "var",
    "var_mean",
    "std",
    "std_mean",
    "logsumexp",
    "cumsum",
    "argmax",
    "argmin",
    "all",
    "any",
    "_softmax",
    "_safe_softmax",
    "_log_softmax",
    "_softmax_backward_data",
    "_log_softmax_backward_data",
    "native_layer_norm",
    "native_layer_norm_backward",
    "_fused_rms_norm",
    "_fused_rms_norm_backward",
    "nll_loss_forward",
    "topk",
    "sort",
}
_COPY = {
    "_to_copy",
    "copy_",
    "clone",
    "cat",
    "stack",
    "constant_pad_nd",
    "slice_backward",
    "select_backward",
    "index_select",
    "gather",
    "embedding",
    "embedding_dense_backward",
    "index_put_",
    "index_add_",
    "scatter",
    "scatter_add",
    "repeat",
    "tril",
    "triu",
}
# CUDA's multi_tensor_apply splits each tensor of a _foreach_* op into chunks of this many elements
# (kChunkSize in aten/src/ATen/native/cuda/MultiTensorApply.cuh).
FOREACH_CHUNK = 65536
# New outputs at least this large are fresh pages on a CPU: glibc's malloc serves them with mmap
# (its mmap threshold rises to at most DEFAULT_MMAP_THRESHOLD_MAX, 32 MiB on 64-bit) and each
# first write page-faults. A GPU's caching allocator reuses its segments: only a CPU roofline
# device charges `OpCost.fresh_bytes`.
FRESH_ALLOCATION = 32 * 2**20
# Multi-tensor kernels like the _foreach_* ops (torch.optim's fused=True implementations).
_FUSED_OPTIMIZERS = {"_fused_adam_", "_fused_adamw_", "_fused_sgd_", "_fused_adagrad_"}
# Allocate without writing (no kernel).
_ALLOCATION = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "resize_",
}
# Write their destination without reading it.
_WRITE_ONLY = {
    "fill_",
    "zero_",
    "copy_",
    "normal_",
    "uniform_",
    "random_",
    "bernoulli_",
    "exponential_",
    "_foreach_zero_",
    "_foreach_copy_",
}
# Read as many rows of their source (first argument) as they write: (source arg, index arg).
_GATHER = {
    "embedding": ("weight", "indices"),
    "index_select": ("self", "index"),
    "gather": ("self", "index"),
    "nll_loss_forward": ("self", "target"),
}


@dataclass(frozen=True)
class OpCost:
    """What one op computes and moves; hashable, so a step's ops are counted as a multiset.

    ``gemm`` is (batch, m, n, k) for matrix products (out = (m×k)·(k×n), batch of them);
    ``tensors`` is the length of a ``_foreach_*`` op's tensor lists and ``lists`` how many lists
    it reads or writes (CUDA's multi_tensor_apply launches depend on both; 1 and 1 otherwise).
    """

    kind: str
    op: str  # aten op name, e.g. "mm"
    precision: str  # "bf16" | "fp16" | "fp32" | "fp64" (math precision of the inputs)
    flops: int
    bytes: int
    gemm: tuple[int, int, int, int] | None = None
    tensors: int = 1
    lists: int = 1
    chunks: int = 0  # foreach: 65536-element chunks of its tensors (multi_tensor_apply's unit)
    fresh_bytes: int = 0  # written into new allocations of >= FRESH_ALLOCATION bytes each


# -- reading an op's arguments ----------------------------------------------------------------


@dataclass(frozen=True)
class _OpInfo:
    """What one op overload's schema says, looked up once per overload."""

    name: str  # e.g. "mm"
    counted: bool  # an aten/velora op that may launch a kernel (not a bare allocation)
    view: bool  # the schema returns an alias of an input
    kind: str
    arguments: tuple[str, ...]  # argument names in order
    mutated: frozenset[str]  # arguments the op writes (in-place self, out=)
    not_read: frozenset[str]  # out= arguments, and the destination of write-only ops


@functools.cache
def _info(func) -> _OpInfo:
    schema = func._schema
    name = func._opname
    mutated = frozenset(
        a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write
    )
    outs = frozenset(a.name for a in schema.arguments if a.is_out)
    return _OpInfo(
        name=name,
        counted=name not in _ALLOCATION and schema.name.split("::")[0] in ("aten", "velora"),
        view=bool(func.is_view),
        kind=_kind(name),
        arguments=tuple(a.name for a in schema.arguments),
        mutated=mutated,
        not_read=outs | (mutated if name in _WRITE_ONLY else frozenset()),
    )


@functools.cache
def _never_counted(func) -> bool:
    """`op_cost` gives None for every call of ``func``, before it looks at an argument: a bare
    allocation or an op outside aten/velora, or a view that writes nothing (a third of a
    step's ops: detach, t, view, transpose, slice...)."""
    info = _info(func)
    return not info.counted or (info.view and not info.mutated)


def _bind(info: _OpInfo, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(zip(info.arguments, args, strict=False))  # omitted trailing args: defaults
    bound.update(kwargs)
    return bound


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes an op touches for ``t``: distinct elements × element size (stride-0 dimensions, from
    ``expand``, hold one element)."""
    if t.numel() == 0:
        return 0
    if t.layout != torch.strided:
        return t.numel() * t.element_size()
    distinct = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            distinct *= size
    return distinct * t.element_size()


def _identity(t: torch.Tensor) -> tuple:
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def _precision(tensors: list[torch.Tensor]) -> str:
    for t in tensors:
        if t.is_floating_point():
            return {
                torch.bfloat16: "bf16",
                torch.float16: "fp16",
                torch.float64: "fp64",
            }.get(t.dtype, "fp32")
    return "fp32"


# -- one op -------------------------------------------------------------------------------------


def _kind(op: str) -> str:
    if op in _GEMM:
        return "gemm"
    if op in _ATTENTION:
        return "attention"
    if op in _LINALG:
        return "linalg"
    if op in _REDUCTION:
        return "reduction"
    if op.startswith("_foreach_") or op in _FUSED_OPTIMIZERS:
        return "foreach"
    if op in _COPY:
        return "copy"
    return "elementwise"


def op_cost(func, args: tuple, kwargs: dict, out: Any, device_type: str) -> OpCost | None:
    """The `OpCost` of one dispatched op, or None when it moves nothing on ``device_type``.

    Args:
        func: the ``torch._ops.OpOverload`` dispatched.
        args, kwargs: its arguments; out: what it returned.
        device_type: the device whose kernels are counted (``meta`` for the estimate).
    """
    info = _info(func)
    if not info.counted:
        return None
    inputs, outputs = _tensors((args, kwargs)), _tensors(out)
    if not any(t.device.type == device_type for t in inputs + outputs):
        return None  # host-side work (AdamW's step counters), or no tensor at all
    mutated, op, kind = info.mutated, info.name, info.kind
    if not mutated and (info.view or _aliases_only(inputs, outputs)):
        return None  # a view, detach, _unsafe_view...: metadata only
    bound = _bind(info, args, kwargs)
    written = _tensors([bound[n] for n in mutated if n in bound]) if mutated else outputs
    read = _tensors([v for name, v in bound.items() if name not in info.not_read])
    nbytes = _read_bytes(op, bound, read) + sum(tensor_bytes(t) for t in written)
    flops = op_flops(kind, op, func, bound, args, kwargs, out, written, read)
    extra: dict[str, Any] = {}
    if kind == "gemm":
        extra["gemm"] = gemm_shape(op, bound)
    elif kind == "foreach":
        lists = [v for v in bound.values() if isinstance(v, (list, tuple)) and _tensors(v)]
        extra["tensors"] = max((len(v) for v in lists), default=1)
        extra["chunks"] = (
            sum(-(-t.numel() // FOREACH_CHUNK) for t in _tensors(lists[0])) if lists else 0
        )
        extra["lists"] = len(lists) + (0 if mutated else 1)  # out-of-place: one more list
    if not mutated:
        fresh = sum(tensor_bytes(t) for t in outputs if tensor_bytes(t) >= FRESH_ALLOCATION)
        if fresh:
            extra["fresh_bytes"] = fresh
    return OpCost(kind, op, _precision(inputs), flops, nbytes, **extra)


def _aliases_only(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> bool:
    if not outputs:
        return False
    storages = {t.untyped_storage()._cdata for t in inputs}
    return all(t.untyped_storage()._cdata in storages for t in outputs)


def _read_bytes(op: str, bound: dict[str, Any], read: list[torch.Tensor]) -> int:
    seen, total = set(), 0
    source = None
    if op in _GATHER:
        name, index = _GATHER[op]
        source, idx = bound.get(name), bound.get(index)
        if isinstance(source, torch.Tensor) and isinstance(idx, torch.Tensor):
            # one row (embedding: a row of D values; else one element) per index
            row = source.shape[-1] if op == "embedding" else 1
            total += min(tensor_bytes(source), idx.numel() * row * source.element_size())
    for t in read:
        if t is source:
            continue
        key = _identity(t)
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(t)
    return total


# -- the step -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """The ops of one phase of the step (``forward``/``backward`` of micro-batch ``micro``,
    ``optimizer``, ``zero_grad``, or ``other``), each distinct `OpCost` with its count."""

    phase: str
    micro: int | None
    ops: tuple[tuple[OpCost, int], ...]

    @property
    def flops(self) -> int:
        return sum(op.flops * n for op, n in self.ops)

    @property
    def bytes(self) -> int:
        return sum(op.bytes * n for op, n in self.ops)


@dataclass(frozen=True)
class StepCounts:
    """Every counted op of one step, by phase, in the order the phases ran."""

    segments: tuple[Segment, ...]

    @property
    def micro_batches(self) -> int:
        return len({s.micro for s in self.segments if s.micro is not None})

    @property
    def flops(self) -> int:
        return sum(s.flops for s in self.segments)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.segments)

    def ops(self) -> Counter:
        """All distinct ops of the step with their counts, phases merged."""
        total: Counter = Counter()
        for s in self.segments:
            for op, n in s.ops:
                total[op] += n
        return total


class OpCosts:
    """`OpCost`s by `_cost_key`, one table per counted device type, to share between counters:
    an op's cost is a function of its key alone (the op, every argument's and output's metadata,
    scalars by value, which tensors share a storage), so a cost worked out in one step holds in
    any other step, of any model, that dispatches an op with the same key. The estimate's fast
    path shares one between all its rows (`shortcut.shortcuts.Shortcuts.op_costs`); a counter made
    without one keeps its own (the reference path: each row's counter works out its costs
    afresh, which the tests compare with the shared table's rows).

    Example:
        >>> costs = OpCosts()
        >>> with OpCounter("meta", costs): ...  # works out each distinct op's cost
        >>> with OpCounter("meta", costs): ...  # finds them in the table
    """

    capacity = 200_000  # keys per device type; the table starts again beyond it

    def __init__(self) -> None:
        self._tables: dict[str, dict[tuple, OpCost | None]] = {}

    def table(self, device_type: str) -> dict[tuple, OpCost | None]:
        """The (mutable) table of one device type's costs."""
        return self._tables.setdefault(device_type, {})


_MISSING = object()  # a cost key not in the table yet


class OpCounter(TorchDispatchMode):
    """Count the FLOPs and bytes of every op dispatched while active, by step phase.

    Phases come from ``phase(name)`` (pass it as `train_step`'s ``phase``, or combined with the
    memory tracker's); each ``forward`` entered starts a new micro-batch.

    Example:
        >>> counter = OpCounter()
        >>> with counter:
        ...     train_step(prepared, phase=counter.phase)
        >>> counter.counts().flops
        123456789
    """

    def __init__(self, device_type: str = "meta", costs: OpCosts | None = None) -> None:
        super().__init__()
        self.device_type = device_type
        self._phases: list[str] = []
        self._micro = -1
        self._segments: dict[tuple[str, int | None], Counter] = {}
        # op cost by the op and its tensors' metadata (the same key as the meta-kernel cache,
        # meta_ops), plus which outputs alias an input: a block repeats the same ops on the same
        # shapes, and an op's cost depends on nothing else; ``costs``: a table shared with other
        # counters (every row of a profile steps the same ops), else this counter's own
        self._costs = (costs if costs is not None else OpCosts()).table(device_type)
        self.cost_hits = 0
        # every op in order as (phase, micro, cost or None) when a list is set here (the depth
        # shortcut synthesizes a deeper step's counts from shallow sequences: step_synthesis.py)
        self.sequence: list[tuple[str, int | None, OpCost | None]] | None = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name == "forward":
            self._micro += 1
        self._phases.append(name)
        try:
            yield
        finally:
            self._phases.pop()

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # no per-op `torch._disable_dynamo` wrapper: nothing counted is compiled (tracker.py's
        # `_OpRecorder` says more)
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.count(func, args, kwargs, out)
        return out

    def count(self, func, args: tuple, kwargs: dict, out: Any, known: OpKey | None = None) -> None:
        """Count one dispatched op that returned ``out``: what this mode does after each op,
        and what a `measure.tracker.MemoryTracker` counting with this counter (its
        ``counting``) calls inside its own mode instead, as the last thing it does per op (one
        mode for both instead of this one stacked above the tracker's). ``known``: the
        meta-kernel cache's keys of this op's arguments (`meta_ops.OpKey`), not computed again."""
        if _never_counted(func):  # no key needed: `op_cost` gives None for every call
            cost = None
        elif (key := _cost_key(func, args, kwargs, out, known)) is None:  # an argument unkeyed
            cost = op_cost(func, args, kwargs, out, self.device_type)
        elif (cost := self._costs.get(key, _MISSING)) is not _MISSING:
            self.cost_hits += 1
        else:
            cost = op_cost(func, args, kwargs, out, self.device_type)
            costs = self._costs
            if len(costs) >= OpCosts.capacity:
                costs.clear()
            costs[key] = cost
        if cost is not None or self.sequence is not None:
            phase = self._phases[-1] if self._phases else "other"
            micro = self._micro if phase in ("forward", "backward") else None
            if cost is not None:
                ops = self._segments.get((phase, micro))
                if ops is None:  # (not setdefault: it would build a Counter per op)
                    ops = self._segments[phase, micro] = Counter()
                ops[cost] += 1
            if self.sequence is not None:
                self.sequence.append((phase, micro, cost))

    def counts(self) -> StepCounts:
        """The ops counted so far, as plain data."""
        return StepCounts(
            tuple(
                Segment(phase, micro, tuple(ops.items()))
                for (phase, micro), ops in self._segments.items()
            )
        )


def _cost_key(
    func, args: tuple, kwargs: dict, out: Any, known: OpKey | None = None
) -> tuple | None:
    """What an op's `OpCost` depends on: the op, its arguments' and outputs' metadata (shape,
    stride, dtype, device, offset: `meta_ops` keys) and which outputs alias an input; None when
    an argument has no such key (then the cost is computed afresh). ``known``: the arguments'
    keys from the meta-kernel cache (`meta_ops.OpKey`), and the outputs' for a replay, which
    are fresh storages (each its own, none an input's)."""
    try:
        if known is None:
            storages: list[int] = []  # every tensor's storage, in the order the keys meet them
            key = (func, _key(args, storages),
                   _key(tuple(sorted(kwargs.items())), storages) if kwargs else (),
                   _key(out, storages))  # fmt: skip
        else:
            storages = list(known.storages)
            if known.out is None:
                key = (*known.key, _key(out, storages))
            else:  # a fresh storage per output: ids no tensor's storage has (``_cdata`` > 0)
                key = (*known.key, known.out)
                storages.extend(range(-1, -known.fresh - 1, -1))
    except _Bypass:
        return None
    # the same tensor read twice counts once: which tensors share storages (each tensor as the
    # index of the first one holding its storage)
    first: dict[int, int] = {}
    pattern = tuple([first.setdefault(s, i) for i, s in enumerate(storages)])
    return (*key, pattern)
