"""Meta-kernel results by input metadata: the estimate's third shortcut.

On the meta device an op computes nothing: its kernel only works out the outputs' shapes,
strides and dtypes, often through Python decompositions (``torch._refs``, ``_prims``) that cost
tens of microseconds per call, and two thirds of a tracked step's time. Every block of a stack
runs the same ops on the same shapes, and so does every row of a profile, so the answer is
kept: `MetaOpCache.call` runs the kernel the first time an op meets given input metadata and
afterwards returns fresh meta tensors with the recorded metadata, or, for an op that only writes
into meta inputs, those inputs, without running it.

What is cached, after PyTorch's own fake-tensor dispatch cache (torch 2.13,
``torch/_subclasses/fake_tensor.py``, ``_validate_cache_key``), more conservatively:
- builtin ``aten`` ops only, not tagged ``data_dependent_output``, ``dynamic_output_shape``,
  ``inplace_view`` or ``nondeterministic_seeded``;
- functional ops (no alias annotation on any argument or return) whose outputs are plain meta
  tensors, each with its own storage of exactly its size at offset 0 (a view or a bigger
  buffer is not reproduced, so such an op is never cached);
- ops that write into arguments (``add_``, ``copy_``, ``_foreach_addcdiv_``, ``out=``), when
  every tensor they write is on meta, none changes shape, stride, offset or storage size in
  the kernel, and they return nothing or exactly their written arguments;
- keyed by the op and every argument: tensors by (device, dtype, layout, shape, stride,
  offset, conj/neg bits), Python scalars, dtypes, devices, memory formats and nested tuples of
  these by value (an ``nn.Parameter`` as a tensor, its type in the key); anything else (a
  generator, a SymInt, another tensor subclass) bypasses the cache.
  One exception: the floats of an in-place ``_foreach_*`` op's scalar list count by type
  (AdamW's per-parameter step sizes change every step; an elementwise in-place op's metadata
  does not depend on a float's value; ints keep their values).
Views and everything else run their kernel every time. The storage tracker sees the same new
storages either way, and the tests compare every row of the fast path with the reference path
(which does not use this cache) byte for byte.

The key of an op's arguments is also the first part of the op counter's cost key
(``timing.opcount._cost_key``): `MetaOpCache.call` leaves what it worked out in ``last`` (an
`OpKey`), and a tracker counting ops hands it to its counter, which then keys only the outputs,
or nothing at all for outputs replayed from the cache (their key is recorded with them).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from velora_cli.measure.tracker import MemoryTracker

_SKIP_TAGS = (
    torch.Tag.data_dependent_output,
    torch.Tag.dynamic_output_shape,
    torch.Tag.inplace_view,
    torch.Tag.nondeterministic_seeded,
)
_SCALARS = (int, float, bool, str, complex, type(None), torch.dtype, torch.device, torch.layout,
            torch.memory_format)  # fmt: skip
_UNCACHEABLE = object()  # an entry for a key whose op was seen not to be reproducible
_UNKNOWN = object()  # an op whose kind is not looked up yet


class _Bypass(Exception):
    """This call (or this op) is not cached."""


def _kind(func) -> str | None:
    """``"functional"``, ``"writes"`` or None (never cached), from the op's schema and tags."""
    if not isinstance(func, torch._ops.OpOverload) or func.namespace != "aten":
        return None
    if not torch._library.utils.is_builtin(func) or any(t in func.tags for t in _SKIP_TAGS):
        return None
    schema = func._schema
    if not schema.is_mutable:
        aliased = any(a.alias_info is not None for a in schema.arguments)
        aliased = aliased or any(r.alias_info is not None for r in schema.returns)
        return None if aliased else "functional"
    returns_written = all(
        r.alias_info is not None and r.alias_info.is_write for r in schema.returns
    )
    return "writes" if returns_written else None


_EXACT_SCALARS = frozenset(_SCALARS)
_Tensor, _STRIDED = torch.Tensor, torch.strided
# nn.Parameter: a plain tensor to every kernel (its __torch_function__ is disabled, and the
# dispatcher sees the tensor beneath); keyed by its metadata with its type added
_Parameter = torch.nn.Parameter


def _tensor_key(value: torch.Tensor) -> tuple:
    if value.layout is not _STRIDED:
        raise _Bypass
    # value.shape is a torch.Size: a tuple, equal and hashed as one
    return (value.device, value.dtype, value.shape, value.stride(),
            value.storage_offset(), value.is_conj(), value.is_neg())  # fmt: skip


def _key(value: Any, storages: list | None = None) -> Any:
    """The cache key of an argument (a plain tensor's metadata, a scalar's value, lists and
    tuples item by item); with ``storages``, each tensor's storage is appended to it in the
    order met (`opcount`'s aliasing pattern). Raises `_Bypass` for anything else."""
    kind = type(value)
    if kind is _Tensor:
        if storages is not None:
            storages.append(value.untyped_storage()._cdata)
        return _tensor_key(value)
    if kind is _Parameter:
        if storages is not None:
            storages.append(value.untyped_storage()._cdata)
        return (_Parameter, _tensor_key(value))
    if kind is tuple or kind is list or isinstance(value, (list, tuple)):
        out: list = [len(value)]
        for v in value:  # the common items inline, the rest through `_key`
            item = type(v)
            if item is _Tensor:
                if storages is not None:
                    storages.append(v.untyped_storage()._cdata)
                out.append(_tensor_key(v))
            elif item in _EXACT_SCALARS:
                out.append((item, v))
            else:
                out.append(_key(v, storages))
        return tuple(out)
    if kind in _EXACT_SCALARS or isinstance(value, _SCALARS):
        return (kind, value)
    raise _Bypass


def _foreach_scalar_list(func) -> bool:
    """An in-place ``_foreach_*`` op with a ``Scalar[]`` argument (``_foreach_addcdiv_
    .ScalarList``: AdamW's per-parameter step sizes, which change every step)."""
    return func.__name__.startswith("_foreach_") and any(
        str(a.type) == "List[number]" for a in func._schema.arguments
    )


def _floats_by_type(value: Any) -> Any:
    """A list argument with its floats all made 0.0: the key of an in-place foreach op's
    scalar list by its length and item types. Such an op writes each tensor of its first list
    in place, elementwise (the per-tensor op in a loop); a float's value decides no shape,
    stride or dtype there (type promotion goes by the scalar's type), so metadata recorded for
    one step's values holds for the next step's."""
    if isinstance(value, (list, tuple)) and any(type(v) is float for v in value):
        return type(value)(0.0 if type(v) is float else v for v in value)
    return value


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _layout(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.stride(), t.storage_offset(), t.untyped_storage().nbytes()


class OpKey(NamedTuple):
    """The argument keys `MetaOpCache.call` worked out for the op it answered last, valid after
    it ran (its arguments unchanged: a functional op, or a written-to op answered without
    running), to share with ``opcount._cost_key`` instead of computing them again.

    ``key``: ``(op, args key, kwargs key)``, as the cost key starts; ``storages``: the
    arguments' storages (``_cdata``) in the order `_key` met them; ``out``: for outputs replayed
    from the cache, their key (`_key` of `_build`'s tensors, fresh storages one per tensor), and
    ``fresh`` how many tensors they are; None (and 0) when the counter must key the outputs.
    """

    key: tuple
    storages: list[int]  # (read only)
    out: Any = None
    fresh: int = 0


class MetaOpCache:
    """Kernel results of meta ops by input metadata (module docstring).

    Example:
        >>> cache = MetaOpCache()
        >>> out = cache.call(torch.ops.aten.mm.default, (a, b), {})  # a, b on meta
        >>> cache.hits, cache.misses
        (0, 1)
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._entries: dict[tuple, Any] = {}
        self._kinds: dict[Any, str | None] = {}
        self._float_lists: set = set()  # in-place foreach ops with a list of scalars
        self.hits = self.misses = self.bypassed = 0
        # the argument keys of the op answered last where they still hold after it (`OpKey`)
        self.last: OpKey | None = None

    def call(self, func, args: tuple, kwargs: dict) -> Any:
        """``func(*args, **kwargs)``, or its recorded result for inputs with this metadata."""
        out, self.last = self._answer(func, args, kwargs)  # ``last`` set once the op is done
        return out

    def _answer(self, func, args: tuple, kwargs: dict) -> tuple[Any, OpKey | None]:
        """The op's result, and its `OpKey` where the counter can use it."""
        kind = self._kinds.get(func, _UNKNOWN)
        if kind is _UNKNOWN:
            kind = self._kinds[func] = _kind(func)
            if kind == "writes" and _foreach_scalar_list(func):
                self._float_lists.add(func)
        if kind is None:
            self.bypassed += 1
            return func(*args, **kwargs), None
        # the tensors' storages in key order, for `OpKey` (None: floats keyed by type, which
        # the cost key keys by value)
        storages: list | None = []
        try:
            if kind == "writes" and func in self._float_lists:
                storages = None
                args_key = _key(tuple(_floats_by_type(a) for a in args))
            else:
                args_key = _key(args, storages)
            key = (func, args_key,
                   _key(tuple(sorted(kwargs.items())), storages) if kwargs else ())  # fmt: skip
        except _Bypass:
            self.bypassed += 1
            return func(*args, **kwargs), None
        # once a kernel ran, the key holds only for an op that writes no argument
        holds_after_run = storages is not None and kind == "functional"
        entry = self._entries.get(key)
        if entry is _UNCACHEABLE:
            self.bypassed += 1
            return func(*args, **kwargs), OpKey(key, storages) if holds_after_run else None
        if entry is not None:
            self.hits += 1
            if storages is None:  # the floats keyed by type
                return self._replay(entry, args), None
            if entry[0] == "new":  # the replayed outputs' key too
                return self._replay(entry, args), OpKey(key, storages, *entry[2])
            return self._replay(entry, args), OpKey(key, storages)
        self.misses += 1
        before = [_layout(t) for t in _tensors((args, kwargs))] if kind == "writes" else None
        out = func(*args, **kwargs)
        if len(self._entries) >= self.capacity:
            self._entries.clear()
        try:
            self._entries[key] = self._record(kind, args, kwargs, out, before)
        except _Bypass:
            self._entries[key] = _UNCACHEABLE
        return out, OpKey(key, storages) if holds_after_run else None

    def _record(self, kind: str, args, kwargs, out, before) -> tuple:
        if kind == "writes":
            inputs = list(_tensors((args, kwargs)))
            if any(t.device.type != "meta" for t in inputs):
                raise _Bypass  # a real tensor was written: its values matter
            if [_layout(t) for t in inputs] != before:
                raise _Bypass  # the kernel changed a tensor's metadata (a resize)
            if out is None:
                return ("none",)
            outs = out if isinstance(out, (list, tuple)) else (out,)
            positions = []
            for o in outs:
                index = next((i for i, a in enumerate(args) if a is o), None)
                if index is None:
                    raise _Bypass  # returns something other than an argument
                positions.append(index)
            return ("args", isinstance(out, (list, tuple)), type(out), tuple(positions))
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
        fresh = list(_tensors(out))
        storages = {t.untyped_storage()._cdata for t in fresh}
        if len(storages) != len(fresh) or storages & inputs:
            raise _Bypass  # outputs share storage, or alias an input
        for t in fresh:
            exact = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            if (type(t) is not torch.Tensor or t.device.type != "meta" or t.storage_offset()
                    or t.untyped_storage().nbytes() != exact.untyped_storage().nbytes()):  # fmt: skip
                raise _Bypass
        shape = self._shape_of(out)
        # the key of the outputs every replay builds (for `OpKey`), and how many tensors
        replayed: list = []
        try:
            out_key = (_key(_build(shape), replayed), len(replayed))
        except _Bypass:
            out_key = (None, 0)
        return ("new", shape, out_key)

    def _shape_of(self, out: Any) -> Any:
        if out is None:
            return None
        if isinstance(out, torch.Tensor):
            return (tuple(out.shape), out.stride(), out.dtype)
        if isinstance(out, (list, tuple)):
            return (type(out), [self._shape_of(o) for o in out])
        raise _Bypass  # a non-tensor output (a number, an object)

    def _replay(self, entry: tuple, args: tuple) -> Any:
        if entry[0] == "none":
            return None
        if entry[0] == "args":
            _, many, kind, positions = entry
            outs = [args[i] for i in positions]
            return kind(outs) if many else outs[0]  # list, tuple or torch.return_types
        return _build(entry[1])


def _build(shape: Any) -> Any:
    if shape is None:
        return None
    if isinstance(shape[0], type):  # (list or tuple, items)
        kind, items = shape
        return kind([_build(item) for item in items])
    size, stride, dtype = shape
    return torch.empty_strided(size, stride, dtype=dtype, device="meta")


class CachedTracker(MemoryTracker):
    """A `MemoryTracker` whose ops are answered by a `MetaOpCache` where it can (None: every
    op runs its kernel, as in a plain tracker)."""

    def __init__(self, model, optimizer=None, *, op_cache: MetaOpCache | None, **kwargs) -> None:
        super().__init__(model, optimizer, **kwargs)
        self.op_cache = op_cache

    def run_op(self, func, args: tuple, kwargs: dict) -> Any:
        if self.op_cache is None:
            return func(*args, **kwargs)
        return self.op_cache.call(func, args, kwargs)

    def op_key(self) -> OpKey | None:
        return None if self.op_cache is None else self.op_cache.last
