"""What the depth shortcut records of one shallow step, to synthesize the deep step from three.

`measure.step_synthesis` builds the allocation trace and the op counts of a step with D blocks
from the same step with 2, 3 and 4 (times the checkpointing period). For that, each shallow step
is recorded as a sequence of ops, each with the block it ran for, and every storage with the
block it belongs to where that is not its op's (a parameter's state, a foreach optimizer op's
output for one parameter):

- `RecordingTracker`: the position-logging tracker (`depth.PositionTracker`) that also keeps,
  for every dispatched op, the label `depth.BlockMarks` had set when it ran; for every storage
  alive at the start, the block whose parameter, buffer or optimizer state it is; and for every
  storage an op allocates as item i of a returned list, the storage of item i of the op's first
  list argument of the same length (a ``_foreach_*`` op's output for parameter i, say);
- `RecordingCounter`: an `opcount.OpCounter` keeping every op's cost in order (the tracked
  step's ops are the tracker's, one for one), with labels of its own when it counts a step
  without a tracker (a low-rank optimizer's regular step), and for each ``_foreach_*`` op the
  elements of its first list (one per parameter), so that its cost can be checked to grow by
  whole blocks;
- `StepRecord`: the plain data handed to the synthesis.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from velora_cli.measure.meta_ops import MetaOpCache
from velora_cli.measure.tracker import AllocationTrace, leaves
from velora_cli.shortcut.depth import PositionTracker
from velora_cli.timing.opcount import FOREACH_CHUNK, OpCost, OpCounter


def block_storages(stack: nn.ModuleList, optimizer=None) -> dict[int, tuple[int, Any]]:
    """id(storage) -> (block index, storage) for every storage a block owns: its parameters,
    their gradients and optimizer state, its buffers (the storage is kept so the id stays its:
    hand the dict to `RecordingTracker` and keep no reference, or a storage the step frees, a
    refreshed GaLore projection say, would stay alive)."""
    out: dict[int, tuple[int, Any]] = {}

    def add(t: Any, j: int) -> None:
        t = local_tensor(t)
        if isinstance(t, torch.Tensor) and not is_traceable_wrapper_subclass(t):
            storage = t.untyped_storage()
            out.setdefault(id(storage), (j, storage))

    for j, block in enumerate(stack):
        for p in block.parameters():
            add(p, j)
            add(p.grad, j)
            if optimizer is not None:
                for value in optimizer.state.get(p, {}).values():
                    add(value, j)
        for b in block.buffers():
            add(b, j)
    return out


def local_tensor(t: Any) -> Any:
    """A DTensor's local shard (what a rank's tracker counts); any other value as it is."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(t, torch.Tensor) and isinstance(local, torch.Tensor) else t


class RecordingTracker(PositionTracker):
    """A `depth.PositionTracker` that records, per op, its block label, and the blocks storages
    belong to (module docstring).

    Args:
        owned: `block_storages` of the stack, for the storages alive at the start.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer=None,
        *,
        op_cache: MetaOpCache | None,
        owned: dict[int, tuple[int, Any]],
        pieces: bool = False,
        **kwargs: Any,
    ) -> None:
        # kwargs: the rest of `MemoryTracker`'s (a DDP/FSDP2 rank's roles, categories, resizes)
        super().__init__(model, optimizer, op_cache=op_cache, **kwargs)
        self._owned = owned
        # pieces: a flat 1-D ``cat`` of tensors some of which a block owns (DDP's coalesced
        # broadcast of the module buffers) keeps, by element offset, whose each piece is; an op
        # on a slice of it then counts for that piece's block (`_owner_of`)
        # (element offsets, owners, the owner of the piece an op read last) by storage id
        self.pieces: dict[int, tuple[list[int], list, int | None]] | None = {} if pieces else None
        self._func: Any = None
        self.op_labels: list[tuple] = []  # label of op k at index k - 1
        # block of op k's first tensor argument's storage where known (index k - 1): AdamW's
        # per-parameter reads of its step counters are ops outside the blocks' passes
        self.op_owners: list[int | None] = []
        self.initial_blocks: dict[int, int] = {}  # storage id (seq) -> block, at the start
        self.aligned: dict[int, int] = {}  # storage id -> the input storage id it stands for
        self._blocks: dict[int, int] = {}  # storage id -> block, as far as known
        self._args: tuple = ()
        self._hint: int | None = None

    def __enter__(self) -> RecordingTracker:
        super().__enter__()
        for key, entry in self._live.items():
            owner = self._owned.get(key)
            if owner is not None:
                self.initial_blocks[entry.seq] = owner[0]
        self._blocks.update(self.initial_blocks)
        # keep only what the tracker does not count (CPU step counters of a meta step): the step
        # may free the counted ones (a refreshed GaLore basis), and a reference here would keep
        # them alive. Asked of the tracker, not of the storage's device: a fake tensor's storage
        # is on meta whatever its tensor's device (the per-rank estimate's fake CPU tensors), so
        # a device test kept every storage of a fake rank alive through its step.
        self._owned = {key: owner for key, owner in self._owned.items() if key not in self._live}
        return self

    def run_op(self, func: Any, args: tuple, kwargs: dict) -> Any:
        self._args, self._func = args, func
        return super().run_op(func, args, kwargs)

    def _record_op_outputs(self, out: Any, *, same_op: bool = False) -> None:
        # MemoryTracker._record_op_outputs, with each output of a returned list tagged with the
        # storage of the same item of the op's first list argument as long
        if not same_op:
            self.op_labels.append(self.label)
            self.op_owners.append(self._owner_of(self._args, out))
            self._ops += 1
        category = self._context_category()
        inputs = _aligned_inputs(self._args, out)
        for i, leaf in enumerate(leaves(out)):
            if isinstance(leaf, torch.Tensor):
                self._hint = None
                if inputs is not None and i < len(inputs):
                    entry = self._live.get(id(local_tensor(inputs[i]).untyped_storage()))
                    self._hint = entry.seq if entry is not None else None
                self._track(leaf, category)
        self._hint = None
        if self.pieces is not None and not same_op:
            self._note_pieces(out)
        self._args = ()
        self._new_peak_check()

    def _note_pieces(self, out: Any) -> None:
        """Keep the pieces of a flat ``cat`` whose inputs a block owns (``pieces``)."""
        args = self._args
        if self._func is not torch.ops.aten.cat.default or not _plain(out):
            return
        parts = args[0] if args else None
        dim = args[1] if len(args) > 1 else 0
        if out.dim() != 1 or dim not in (0, -1) or not isinstance(parts, (list, tuple)):
            return
        entry = self._live.get(id(out.untyped_storage()))
        if entry is None or out.storage_offset():
            return
        starts, owners, start = [], [], 0
        for t in parts:
            if not _plain(t) or t.dim() != 1:
                return
            starts.append(start)
            owners.append(self._owner_of((t,)))
            start += t.numel()
        if any(o is not None for o in owners):
            self.pieces[entry.seq] = (starts, owners, None)

    def _add(self, key, storage, raw, category):
        entry = super()._add(key, storage, raw, category)
        if self._hint is not None:
            self.aligned[entry.seq] = self._hint
            block = self._blocks.get(self._hint)
        else:
            block = self.label[1] if self.label[0] in ("fwd", "bwd", "opt") else None
        if block is not None:
            self._blocks[entry.seq] = block
        return entry

    def _owner_of(self, args: tuple, out: Any = None) -> int | None:
        first = None
        for a in args:  # the first tensor argument (a loop: no generator per op)
            if isinstance(a, torch.Tensor):
                first = a
                break
        if type(first) is not torch.Tensor:  # a plain tensor is its own local tensor
            first = local_tensor(first)
            if first is None or is_traceable_wrapper_subclass(first):
                return None
        storage = first.untyped_storage()
        key = id(storage)
        entry = self._live.get(key)
        if entry is not None:
            pieces = self.pieces.get(entry.seq) if self.pieces else None
            if pieces is not None:
                # a slice of a flat cat: the piece at the offset the op returns (a slice or a
                # view of it) or reads; an op on the whole flat tensor that returns none of it
                # (``prim::device`` between the slices) counts for the piece sliced last
                starts, owners, last = pieces
                if _plain(out) and out.untyped_storage() is storage:
                    at = out.storage_offset()
                elif first.storage_offset() or first.numel() != storage.nbytes() // max(
                    first.element_size(), 1
                ):
                    at = first.storage_offset()
                else:
                    return last
                owner = owners[bisect.bisect_right(starts, at) - 1]
                self.pieces[entry.seq] = (starts, owners, owner)
                return owner
            return self._blocks.get(entry.seq)
        owner = self._owned.get(key)  # e.g. a CPU step counter of a block's parameter
        return owner[0] if owner is not None else None


def _plain(t: Any) -> bool:
    """A tensor with a storage of its own kind (a fake tensor too; not a wrapper subclass)."""
    return isinstance(t, torch.Tensor) and not is_traceable_wrapper_subclass(t)


def _aligned_inputs(args: tuple, out: Any) -> list[torch.Tensor] | None:
    """The op's first list argument of tensors as long as its returned list (None if none)."""
    if not isinstance(out, (list, tuple)) or not out:
        return None
    if not all(isinstance(o, torch.Tensor) for o in out):
        return None
    for arg in args:
        if (
            isinstance(arg, (list, tuple))
            and len(arg) == len(out)
            and all(isinstance(a, torch.Tensor) for a in arg)
        ):
            return list(arg)
    return None


class RecordingCounter(OpCounter):
    """An `OpCounter` that keeps every op in order (``sequence``), each ``_foreach_*`` op's first
    list as (numel, element size, chunks) per tensor (``columns``, by op index), and, when it
    counts a step on its own, labels (`mark`, phases) like `depth.PositionTracker`'s."""

    def __init__(self, device_type: str = "meta", costs=None) -> None:
        super().__init__(device_type, costs)
        self.sequence = []
        self.columns: dict[int, tuple[tuple[int, int, int], ...]] = {}
        self.label: tuple = ("start",)
        self.op_labels: list[tuple] = []

    def mark(self, label: tuple) -> None:
        """Label the ops from now on (until the next mark or phase)."""
        self.label = label

    def record(self) -> OpsRecord:
        """The ops of a step this counter counted on its own, with its labels."""
        return OpsRecord(self.op_labels, [None] * len(self.op_labels), self.sequence, self.columns)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.label = ("phase", name)
        with super().phase(name):
            yield

    def count(self, func, args: tuple, kwargs: dict, out: Any, known=None) -> None:
        super().count(func, args, kwargs, out, known)
        self.op_labels.append(self.label)
        cost = self.sequence[-1][2]
        if cost is not None and cost.kind == "foreach":
            first = next((a for a in args if isinstance(a, (list, tuple)) and a), None)
            if first is not None:
                self.columns[len(self.sequence)] = tuple(
                    (t.numel(), t.element_size(), -(-t.numel() // FOREACH_CHUNK))
                    for t in first
                    if isinstance(t, torch.Tensor)
                )


@dataclass
class OpsRecord:
    """One step's ops in order: label and `RecordingTracker.op_owners` entry of op k at index
    k - 1; with its ops counted also (phase, micro, cost or None) per op (``sequence``) and the
    foreach ops' first lists (`RecordingCounter.columns`)."""

    labels: list[tuple]
    owners: list[int | None]
    sequence: list[tuple[str, int | None, OpCost | None]] | None = None
    columns: dict[int, tuple[tuple[int, int, int], ...]] = field(default_factory=dict)


@dataclass
class StepRecord:
    """One shallow step as the synthesis needs it: its ops (`OpsRecord`), the tracker's trace
    and what it knew of the storages' blocks (`RecordingTracker`), and for a low-rank optimizer
    the regular step counted apart (`step_time.prediction_fields`; None otherwise)."""

    depth: int
    ops: OpsRecord
    trace: AllocationTrace
    initial_blocks: dict[int, int]
    aligned: dict[int, int]
    regular: OpsRecord | None = None

    @classmethod
    def of(cls, depth: int, tracker: RecordingTracker, counter: RecordingCounter | None,
           regular: RecordingCounter | None = None) -> StepRecord:  # fmt: skip
        """The record of a step tracked by ``tracker`` (and counted by ``counter``)."""
        ops = OpsRecord(tracker.op_labels, tracker.op_owners)
        if counter is not None:
            ops.sequence, ops.columns = counter.sequence, counter.columns
        return cls(
            depth, ops, tracker.trace, tracker.initial_blocks, tracker.aligned,
            None if regular is None else regular.record(),
        )  # fmt: skip
