"""Live tensor storages by category, observed op by op during one training step.

`MemoryTracker` is a `TorchDispatchMode`-based ledger of every tensor *storage* alive on the model's
device. It sees each op's outputs (forward, backward and optimizer step alike), counts each storage
once however many views point at it, and hears about frees through a weakref finalizer on the
storage. It works the same on real CPU tensors and on meta tensors (which have a storage with
`nbytes()` but `data_ptr() == 0`, so storages are keyed by Python identity, never by address).

The number it reports is meant to predict `torch.cuda.max_memory_allocated()` for the same step:
each storage is rounded up to `round_to` bytes (512, the CUDA caching allocator's minimum block,
c10/cuda/CUDACachingAllocator.cpp `kMinBlockSize`). What it cannot see: scratch buffers a kernel
allocates internally and frees before returning (cuBLAS workspace, flash-attention scratch), the
CUDA context, and fragmentation; `max_memory_reserved` is therefore always higher.

We own this instead of wrapping `torch.distributed._tools.mem_tracker.MemTracker` (private API) for
three reasons: it refuses a second call of the root module in one context, it rounds only CUDA
storages (so a meta estimate cannot be rounded), and its categories are fixed when a storage is
created (optimizer temporaries count as optimizer state, the gradients' buffers as temporaries
until a hook relabels them).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from velora_cli.emulation.softmax import cuda_kernel_temporaries

# Report order; also the precedence of roles (a storage that is both takes the earlier one).
CATEGORIES = ("params", "buffers", "grads", "optimizer", "activations", "temporaries")
# Where a tracker's `extra_categories` go in that order: after the states, before activations.
_EXTRA_AT = CATEGORIES.index("activations")

# The CUDA caching allocator rounds every block up to 512 bytes (kMinBlockSize).
CUDA_MIN_BLOCK = 512


class _Entry:
    """One live storage: its (rounded) size and its role, which may be upgraded later.

    ``seq`` numbers storages in the order the tracker first saw them (the trace's storage id;
    Python ids are reused once a storage dies); ``raw`` is the unrounded size.
    """

    __slots__ = ("nbytes", "raw", "category", "ref", "seq")

    def __init__(self, nbytes: int, category: str, raw: int = 0, seq: int = -1) -> None:
        self.nbytes = nbytes
        self.raw = raw
        self.category = category
        self.ref: weakref.ref | None = None
        self.seq = seq


@dataclass(frozen=True)
class AllocationTrace:
    """The ordered allocations and frees of one tracked step, as the device's allocator sees them.

    ``initial`` are the storages live when tracking started (params, buffers, gradients,
    optimizer state), in the order they were found; ``events`` the step's allocations
    (``nbytes > 0``) and frees (``nbytes < 0``) in order, each tagged with the index of the op
    during (or after) which it happened. A resize is a free of the old storage and an allocation
    of a new one, as the caching allocator does it. Sizes are the storages' exact ``nbytes()``;
    ``round_to`` is the tracker's rounding, so that ``live_bytes`` reproduces its totals.
    ``categories`` gives each storage the role it ended up playing (an AccumulateGrad buffer
    allocated in backward is ``grads``). ``phases`` are ``(name, start, end)`` slices of
    ``events``, in the order the phases were entered.

    Example:
        >>> with MemoryTracker(model, opt, trace=True) as tracker:
        ...     train_step(prepared, phase=tracker.phase)
        >>> trace = tracker.trace
        >>> max(trace.live_bytes()) == tracker.peak_bytes
        True
    """

    initial: tuple[tuple[int, int], ...]  # (storage id, nbytes)
    events: tuple[tuple[int, int, int], ...]  # (op index, storage id, +nbytes | -nbytes)
    categories: dict[int, str]
    phases: tuple[tuple[str, int, int], ...]
    round_to: int
    ops: int
    # the name of op k (1-based, as events count ops) at index k - 1, e.g.
    # "aten::_scaled_dot_product_flash_attention_backward": where kernel scratch goes
    op_names: tuple[str, ...] = ()

    def rounded(self, nbytes: int) -> int:
        return -(-abs(nbytes) // self.round_to) * self.round_to

    def live_bytes(self) -> list[int]:
        """Live bytes (rounded as the tracker rounds) before the first event and after each."""
        live = sum(self.rounded(n) for _, n in self.initial)
        out = [live]
        for _, _, nbytes in self.events:
            live += self.rounded(nbytes) if nbytes > 0 else -self.rounded(nbytes)
            out.append(live)
        return out


class _OpRecorder(TorchDispatchMode):
    """Hands the outputs of every dispatched op to the tracker."""

    def __init__(self, tracker: MemoryTracker) -> None:
        super().__init__()
        self._tracker = tracker

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in `torch._disable_dynamo` unless this says
        # False (torch/utils/_python_dispatch.py, TorchDispatchMode.__init_subclass__): the
        # wrapper swaps the frame-evaluation callback twice per op, for nothing here, where no
        # step is compiled (a third of the tracked step's Python calls on meta)
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = self._tracker.run_op(func, args, kwargs)
        known = self._tracker.op_key()
        if self._tracker._tracing:
            self._tracker._op_names.append(func.name() if hasattr(func, "name") else str(func))
        self._tracker._record_op_outputs(out)
        # what the CUDA kernel allocates inside the op (meta only): counted, then freed, as
        # events of this op (no op of its own: the op counter, which the depth synthesis
        # matches op for op, sees one kernel)
        temporaries = cuda_kernel_temporaries(func, args)
        while temporaries:
            _name, tensor = temporaries.pop()
            self._tracker._record_op_outputs(tensor, same_op=True)
            del tensor
        counter = self._tracker.counter
        if counter is not None:  # last, as a counter's mode stacked above this one counts
            counter.count(func, args, kwargs, out, known=known)
        return out


def leaves(out: Any) -> Any:
    """``tree_leaves(out)``, without pytree for what ops mostly return: a plain tensor, or a
    list or tuple of plain tensors."""
    kind = type(out)
    if kind is torch.Tensor:
        return (out,)
    if (kind is tuple or kind is list) and all(type(o) is torch.Tensor for o in out):
        return out
    return tree_leaves(out)


def _storages(t: torch.Tensor) -> Iterator[tuple[torch.UntypedStorage, str]]:
    """Yield (storage, device type) behind a tensor, looking inside traceable wrapper subclasses.

    The device is the tensor's, not the storage's: a FakeTensor's storage is on meta.
    """
    if type(t) is torch.Tensor:  # not a subclass: one storage (the common case, quickly)
        yield t.untyped_storage(), t.device.type
        return
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            inner = getattr(t, name)
            if isinstance(inner, torch.Tensor):
                yield from _storages(inner)
        return
    yield t.untyped_storage(), t.device.type


def _in_backward_without_grad() -> bool:
    """True inside autograd's backward pass, except in a checkpoint's recomputed forward.

    The engine sets a graph task id while it runs (-1 outside); activation checkpointing recomputes
    its forward with `torch.enable_grad()` inside backward, and those outputs are activations again.
    """
    return torch._C._current_graph_task_id() != -1 and not torch.is_grad_enabled()


class MemoryTracker:
    """Track the live bytes of one training step by category and record their peak.

    Categories (`CATEGORIES`): `params`, `buffers`, `grads` (a parameter's `.grad`), `optimizer`
    (tensors in `optimizer.state`), `activations` (created outside backward and outside the
    optimizer step: the forward pass, the loss, and a checkpoint's recomputed forward) and
    `temporaries` (created in backward or in the optimizer step and not state or gradient).

    How categories are decided: a storage gets `activations` or `temporaries` when an op creates
    it, then is *upgraded* to the role it turns out to play: `grads` when a parameter's
    post-accumulate-grad hook fires (AccumulateGrad often adopts the incoming gradient's buffer
    rather than copying it, so the same allocation starts as a backward temporary), `optimizer`
    when an optimizer's step post-hook finds it in `optimizer.state` (AdamW's exp_avg/exp_avg_sq are
    created lazily inside the first `step()`). Roles are stored on the storage's record and the
    peak keeps the records, not sums, so the peak breakdown shows each storage by the role it
    ended up playing: an exp_avg alive at a peak inside `step()` counts as `optimizer` and the
    sqrt temporaries of a foreach AdamW as `temporaries`, whatever the order of events. Peak
    *totals* never depend on this choice. Roles only move up the precedence of `CATEGORIES`.

    Only storages on the model's device are counted (`device`, default: the first parameter's):
    on a meta or CUDA model, AdamW's `state["step"]` scalars live on the CPU, as they do on a GPU.
    Tensors created before `__enter__` are counted only if they are the model's parameters,
    buffers or gradients or the optimizer's state (the baseline) or an op writes them later.

    Args:
        model: the module whose parameters, buffers and gradients are tracked.
        optimizer: optimizer whose existing state counts in the baseline; optimizers stepped inside
            the context are discovered through the global step hooks in any case.
        round_to: round each storage up to a multiple of this many bytes (512 mimics the CUDA
            caching allocator; 1 counts exact `nbytes()`).
        device: device whose storages are counted (default: the model's first parameter's).
        trace: also record the ordered allocation trace (`trace`), for an allocator model or a
            memory timeline.
        extra_categories: role names beyond `CATEGORIES` (e.g. ``unsharded``, ``comm`` for
            FSDP2's all-gathered parameters and communication buffers); they rank after
            ``optimizer`` and before ``activations``, in the order given.
        roles: a callable returning ``(tensor, category)`` pairs: storages whose role the
            tracker cannot see by itself (DDP's gradient buckets, FSDP2's unsharded
            parameters). Asked whenever roles are scanned; a storage named here keeps its role
            when it is freed and re-allocated by a storage resize.
        track_resize: also see ``UntypedStorage.resize_`` (not a dispatched op), by which FSDP2
            frees and re-allocates unsharded parameters; patched while the tracker is active.

    Example:
        >>> model = nn.Linear(8, 8)
        >>> opt = torch.optim.AdamW(model.parameters())
        >>> with MemoryTracker(model, opt, round_to=1) as tracker:
        ...     with tracker.phase("forward"):
        ...         loss = model(torch.randn(4, 8)).sum()
        ...     with tracker.phase("backward"):
        ...         loss.backward()
        ...     opt.step()
        >>> tracker.peak_breakdown["optimizer"]  # 2 moments x 288 B + 2 CPU step counters x 4 B
        584
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        round_to: int = CUDA_MIN_BLOCK,
        device: torch.device | str | None = None,
        trace: bool = False,
        extra_categories: tuple[str, ...] = (),
        roles: Callable[[], Iterable[tuple[torch.Tensor, str]]] | None = None,
        track_resize: bool = False,
    ) -> None:
        if round_to < 1:
            raise ValueError(f"round_to must be a positive number of bytes, got {round_to}")
        clash = [c for c in extra_categories if c in CATEGORIES]
        if clash:
            raise ValueError(f"extra_categories {clash} repeat built-in categories {CATEGORIES}")
        self.categories = CATEGORIES[:_EXTRA_AT] + tuple(extra_categories) + CATEGORIES[_EXTRA_AT:]
        self._rank = {name: rank for rank, name in enumerate(self.categories)}
        self._role_source = roles
        self._roles: dict[int, tuple[str, Any]] = {}  # id(storage) -> (role, storage kept alive)
        self._track_resize = track_resize
        self._original_resize: Any = None
        self.model = model
        self.round_to = round_to
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device_type = torch.device(device).type
        self._optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        if optimizer is not None:
            self._optimizers.add(optimizer)

        self._live: dict[int, _Entry] = {}  # id(storage) -> entry; removed by the finalizer
        self._current = 0
        self.peak_bytes = 0
        self._peak_entries: list[_Entry] = []
        self.phase_peaks: dict[str, int] = {}
        self._phase_entries: dict[str, list[_Entry]] = {}
        self._phase_stack: list[str] = []
        self._in_optimizer_step = 0
        self._active = False
        self._handles: list[Any] = []
        self._recorder: _OpRecorder | None = None
        # an op counter (`timing.opcount.OpCounter`) counting each op inside this tracker's mode
        # while `counting` is entered: one Python dispatch per op instead of two stacked modes
        self.counter: Any = None
        self._seq = 0
        self._ops = 0
        self._tracing = trace
        self._initial: list[tuple[int, int]] = []
        self._events: list[tuple[int, int, int]] = []
        self._entries: list[_Entry] = []  # every storage seen, for the trace's final roles
        self._phase_spans: list[list[Any]] = []
        self._op_names: list[str] = []
        # (category, list of (storage id, nbytes)) per open `born_as` window, innermost last
        self._born_as: list[tuple[str, list[tuple[int, int]]]] = []

    # -- context ---------------------------------------------------------------------------------

    def __enter__(self) -> MemoryTracker:
        """Start tracking: count the baseline and start recording ops.

        Returns:
            The tracker itself.
        """
        if self._active:
            raise RuntimeError("MemoryTracker is not re-entrant; use a new tracker per step")
        self._active = True
        self._scan_roles()
        if self._tracing:
            self._initial = [(e.seq, e.raw) for e in self._live.values()]
            self._events.clear()
        self._new_peak_check()
        for param in self.model.parameters():
            if param.requires_grad:
                self._handles.append(
                    param.register_post_accumulate_grad_hook(self._on_grad_accumulated)
                )
        self._handles.append(register_optimizer_step_pre_hook(self._on_step_start))
        self._handles.append(register_optimizer_step_post_hook(self._on_step_end))
        if self._track_resize:
            self._patch_resize()
        self._recorder = _OpRecorder(self)
        self._recorder.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop recording ops and remove the hooks; recorded peaks stay readable."""
        assert self._recorder is not None
        self._recorder.__exit__(*exc)
        self._recorder = None
        if self._original_resize is not None:
            torch.UntypedStorage.resize_ = self._original_resize  # type: ignore[method-assign]
            self._original_resize = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._active = False

    @contextlib.contextmanager
    def counting(self, counter: Any) -> Iterator[None]:
        """Let ``counter`` (an `OpCounter`) count every op this tracker's mode sees while
        entered, as if its own mode were entered here, stacked above the tracker's (which sees
        the same ops, each after the ops below it ran): ``with tracker, tracker.counting(c)``
        counts what ``with tracker, c`` counts, with one Python dispatch per op.

        Args:
            counter: anything with ``count(func, args, kwargs, out, known=...)`` (``known``:
                `op_key` of the op).
        """
        if self.counter is not None:
            raise RuntimeError("the tracker counts with one counter at a time")
        self.counter = counter
        try:
            yield
        finally:
            self.counter = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record the peak total within a named region (phases may nest or repeat).

        Args:
            name: the key in `phase_peaks`; entering the same name again keeps the maximum.

        Returns:
            A context manager; on entry the current total is the phase's starting peak.
        """
        self._phase_stack.append(name)
        span = [name, len(self._events), None]
        self._phase_spans.append(span)
        if self._current > self.phase_peaks.get(name, -1):
            self.phase_peaks[name] = self._current
            self._phase_entries[name] = list(self._live.values())
        try:
            yield
        finally:
            self._phase_stack.pop()
            span[2] = len(self._events)

    # -- results ---------------------------------------------------------------------------------

    @property
    def peak_breakdown(self) -> dict[str, int]:
        """Bytes by category at the moment of `peak_bytes` (sums to `peak_bytes`)."""
        return self._by_category(self._peak_entries)

    def phase_breakdown(self, name: str) -> dict[str, int]:
        """Bytes by category at the peak of one phase.

        Args:
            name: a phase name used with `phase()`.

        Returns:
            Category -> bytes, summing to `phase_peaks[name]`.

        Raises:
            KeyError: if no phase of that name was entered.
        """
        if name not in self._phase_entries:
            raise KeyError(f"no phase {name!r}; recorded phases: {sorted(self._phase_entries)}")
        return self._by_category(self._phase_entries[name])

    def snapshot(self) -> dict[str, int]:
        """Live bytes by category now (params, buffers, grads and optimizer state re-scanned).

        Returns:
            Category -> bytes for every category in `CATEGORIES`.
        """
        self._scan_roles()
        if self._active:
            self._new_peak_check()
        return self._by_category(list(self._live.values()))

    @contextlib.contextmanager
    def born_as(self, category: str) -> Iterator[list[tuple[int, int]]]:
        """Give every storage first counted inside this block ``category`` (a storage with a
        role from ``roles`` keeps it). For storages that code the tracker cannot see created and
        an op then exposed: gloo's collectives copy their input inside the C++ kernel, and the
        copy first shows as the output of a view op in the collective's wait
        (`velora_cli.parallel.roles.GlooOnly`).

        Args:
            category: one of `categories`.

        Returns:
            A context manager yielding the list of ``(storage id, nbytes)`` (the trace's ids)
            of the storages it labelled, filled as they are counted.

        Raises:
            ValueError: an unknown category.
        """
        if category not in self._rank:
            raise ValueError(f"unknown category {category!r}; choose from {self.categories}")
        born: list[tuple[int, int]] = []
        self._born_as.append((category, born))
        try:
            yield born
        finally:
            self._born_as.pop()

    @property
    def current_bytes(self) -> int:
        """Total live bytes now."""
        return self._current

    def assign(self, tensor: torch.Tensor, category: str) -> None:
        """Give the storages behind ``tensor`` a role, counting them if they are new.

        Roles only move up the precedence of `categories` (a gradient stays ``grads``).

        Args:
            tensor: any tensor (views and wrapper subclasses such as DTensor are unwrapped).
            category: one of `categories`.

        Raises:
            ValueError: an unknown category.
        """
        if category not in self._rank:
            raise ValueError(f"unknown category {category!r}; choose from {self.categories}")
        self._track(tensor, category)
        self._new_peak_check()

    @property
    def trace(self) -> AllocationTrace:
        """The allocation trace recorded so far (see `AllocationTrace`).

        Raises:
            RuntimeError: the tracker was made without ``trace=True``.
        """
        if not self._tracing:
            raise RuntimeError("this MemoryTracker records no trace; create it with trace=True")
        return AllocationTrace(
            initial=tuple(self._initial),
            events=tuple(self._events),
            categories={e.seq: e.category for e in self._entries},
            phases=tuple(
                (name, start, len(self._events) if end is None else end)
                for name, start, end in self._phase_spans
            ),
            round_to=self.round_to,
            ops=self._ops,
            op_names=tuple(self._op_names),
        )

    def run_op(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """Run one dispatched op (a subclass may answer it from a cache: `meta_ops`)."""
        return func(*args, **kwargs)

    def op_key(self) -> Any:
        """What `run_op` worked out of the op it ran last that the op counter can reuse (a
        `meta_ops.OpKey`: its arguments' keys), or None."""
        return None

    # -- bookkeeping -----------------------------------------------------------------------------

    def _by_category(self, entries: list[_Entry]) -> dict[str, int]:
        totals = dict.fromkeys(self.categories, 0)
        for entry in entries:
            totals[entry.category] += entry.nbytes
        return totals

    def _rounded(self, nbytes: int) -> int:
        # A zero-byte storage gets no block from the CUDA allocator.
        return -(-nbytes // self.round_to) * self.round_to

    def _track(self, t: torch.Tensor, category: str) -> None:
        """Count the tensor's storages if new; upgrade their role if `category` ranks higher."""
        if type(t) is torch.Tensor:  # `_storages`' common case, without a generator per tensor
            storages: Iterable = ((t.untyped_storage(), t.device.type),)
        else:
            storages = _storages(t)
        for storage, device_type in storages:
            if device_type != self.device_type:
                continue
            key = id(storage)
            role = self._roles.get(key)
            if role is not None and self._rank[role[0]] < self._rank[category]:
                category = role[0]
            raw = storage.nbytes()
            entry = self._live.get(key)
            if entry is not None and entry.raw != raw:
                entry = self._resized(key, entry, raw)
            if entry is None:
                if raw == 0:
                    continue
                if self._born_as and role is None:
                    born_category, born = self._born_as[-1]
                    entry = self._add(key, storage, raw, born_category)
                    born.append((entry.seq, raw))
                    continue
                entry = self._add(key, storage, raw, category)
            elif self._rank[category] < self._rank[entry.category]:
                entry.category = category

    def _add(self, key: int, storage: torch.UntypedStorage, raw: int, category: str) -> _Entry:
        entry = self._new_entry(self._rounded(raw), category, raw)
        entry.ref = weakref.ref(storage, self._finalizer(key))
        self._live[key] = entry
        self._current += entry.nbytes
        self._log(raw, entry)
        return entry

    def _resized(self, key: int, entry: _Entry, raw: int) -> _Entry:
        """A storage resized in place (resize_, out= ops): a new record with the same role, so
        the peak lists keep the old one and a past breakdown still sums to its total. A resize
        to 0 bytes is a free (FSDP2 frees unsharded parameters so), from 0 an allocation."""
        resized = self._new_entry(self._rounded(raw), entry.category, raw)
        resized.ref = entry.ref
        self._current += resized.nbytes - entry.nbytes
        if entry.raw:
            self._log(-entry.raw, entry)
        if raw:
            self._log(raw, resized)
        self._live[key] = resized
        return resized

    def _patch_resize(self) -> None:
        """Route ``UntypedStorage.resize_`` through the tracker (it bypasses the dispatcher)."""
        original = self._original_resize = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage: torch.UntypedStorage, size: int):
            out = original(storage, size)
            tracker._on_resize(storage)
            return out

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]

    def _on_resize(self, storage: torch.UntypedStorage) -> None:
        key, raw = id(storage), storage.nbytes()
        entry = self._live.get(key)
        if entry is not None:
            if entry.raw != raw:
                self._resized(key, entry, raw)
        elif raw and (key in self._roles or storage.device.type == self.device_type):
            role = self._roles.get(key)
            self._add(key, storage, raw, role[0] if role else self._context_category())
        self._new_peak_check()

    def _context_category(self) -> str:
        """The role of a storage created now: backward and optimizer temporaries, or activations."""
        if self._in_optimizer_step or _in_backward_without_grad():
            return "temporaries"
        return "activations"

    def _new_entry(self, nbytes: int, category: str, raw: int) -> _Entry:
        entry = _Entry(nbytes, category, raw, self._seq)
        self._seq += 1
        if self._tracing:
            self._entries.append(entry)
        return entry

    def _log(self, nbytes: int, entry: _Entry) -> None:
        """Record an allocation (nbytes > 0) or a free (nbytes < 0) in the trace."""
        if self._tracing and self._active:
            self._events.append((self._ops, entry.seq, nbytes))

    def _finalizer(self, key: int) -> Callable[[weakref.ref], None]:
        def on_free(_ref: weakref.ref) -> None:
            entry = self._live.pop(key, None)
            if entry is not None:
                self._current -= entry.nbytes
                self._log(-entry.raw, entry)

        return on_free

    def _new_peak_check(self) -> None:
        current = self._current
        if current > self.peak_bytes:
            self.peak_bytes = current
            self._peak_entries = list(self._live.values())
        for name in self._phase_stack:
            if current > self.phase_peaks[name]:
                self.phase_peaks[name] = current
                self._phase_entries[name] = list(self._live.values())

    def _record_op_outputs(self, out: Any, *, same_op: bool = False) -> None:
        """Track an op's outputs; ``same_op``: more tensors of the op recorded last (no new op)."""
        if not same_op:
            self._ops += 1
        category = self._context_category()
        for leaf in leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf, category)
        self._new_peak_check()

    def _scan_roles(self) -> None:
        """Find the model's params, buffers, grads and known optimizers' state by identity."""
        for param in self.model.parameters():
            self._track(param, "params")
            if param.grad is not None:
                self._track(param.grad, "grads")
        for buffer in self.model.buffers():
            self._track(buffer, "buffers")
        for optimizer in list(self._optimizers):
            self._scan_optimizer(optimizer)
        if self._role_source is not None:
            for tensor, category in self._role_source():
                if category not in self._rank:
                    raise ValueError(f"roles gave {category!r}; categories: {self.categories}")
                for storage, device_type in _storages(tensor):
                    if device_type == self.device_type:
                        self._roles[id(storage)] = (category, storage)
                self._track(tensor, category)

    def _scan_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    self._track(value, "optimizer")

    # -- hooks -----------------------------------------------------------------------------------

    def _on_grad_accumulated(self, param: torch.Tensor) -> None:
        if param.grad is not None:
            self._track(param.grad, "grads")

    def _on_step_start(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._in_optimizer_step += 1

    def _on_step_end(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._in_optimizer_step -= 1
        self._optimizers.add(optimizer)
        self._scan_roles()
        self._new_peak_check()
