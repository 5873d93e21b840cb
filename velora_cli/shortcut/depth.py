"""A model's stack of decoder blocks, as the estimate's depth shortcut sees it.

The shortcut (`measure.shortcut`) runs the step with 2, 3 and 4 blocks (times the checkpointing
period) and extrapolates to the real depth (`measure.extrapolate`). What it needs from the model:

- `stack_depth` / `shallow_model_spec`: the config's depth, and the same architecture with fewer
  blocks (refused when the config holds per-block settings that are not all the same);
- `decoder_stack` and `block_signature`: the blocks themselves, and a structural signature of one
  (module types, parameter shapes, dtypes and trainability, VeLoRA sizes, checkpointing flag), so
  that the blocks of the real model are checked to repeat before any extrapolation;
- `PositionTracker`: the storage tracker, also logging every point where it checks its peak
  (label, active phases, live bytes, events so far): the memory curve of the step;
- `BlockMarks`: hooks that label those points by block, in forward (module hooks) and backward
  (a gradient hook on each block's output fires just before that block's backward starts).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from velora_cli.measure.meta_ops import CachedTracker, MetaOpCache
from velora_cli.measure.tracker import CATEGORIES, AllocationTrace

if TYPE_CHECKING:
    from velora_cli.models import ModelSpec


class DepthError(ValueError):
    """The model cannot be run with fewer blocks (the message says why)."""


def stack_depth(model_spec: ModelSpec) -> int | None:
    """The number of decoder blocks in the config (None when it has no such field)."""
    return getattr(model_spec.config.get_text_config(), "num_hidden_layers", None)


def shallow_model_spec(model_spec: ModelSpec, depth: int) -> ModelSpec:
    """``model_spec`` with ``depth`` blocks instead of its own.

    Raises:
        DepthError: the config has no ``num_hidden_layers``, or a per-block setting (a list as
            long as the stack, e.g. ``layer_types``) whose entries differ.
    """
    config = copy.deepcopy(model_spec.config)
    text = config.get_text_config()
    layers = getattr(text, "num_hidden_layers", None)
    if not isinstance(layers, int):
        raise DepthError("the config has no num_hidden_layers")
    for name, value in text.to_dict().items():
        if isinstance(value, (list, tuple)) and len(value) == layers and layers > 1:
            if len({repr(v) for v in value}) > 1:
                raise DepthError(f"its blocks differ ({name} is not the same for every block)")
            setattr(text, name, type(value)([value[0]] * depth))
    text.num_hidden_layers = depth
    return dataclasses.replace(model_spec, config=config)


def decoder_stack(model: nn.Module, depth: int) -> nn.ModuleList | None:
    """The one ``nn.ModuleList`` of ``depth`` blocks of one class (None if there is not one)."""
    found = [
        m
        for m in model.modules()
        if isinstance(m, nn.ModuleList)
        and len(m) == depth
        and len({type(block) for block in m}) == 1
    ]
    return found[0] if len(found) == 1 else None


def block_signature(block: nn.Module) -> tuple:
    """What makes two blocks take the same memory: structure, parameters, buffers, settings."""
    modules = tuple(
        (
            name,
            type(m).__qualname__,
            getattr(m, "sub_token_size", None),
            getattr(m, "init", None) if isinstance(getattr(m, "init", None), str) else None,
            getattr(m, "gradient_checkpointing", None),
            m.training,
        )
        for name, m in block.named_modules()
    )
    params = tuple(
        (name, tuple(p.shape), p.dtype, p.requires_grad) for name, p in block.named_parameters()
    )
    buffers = tuple((name, tuple(b.shape), b.dtype) for name, b in block.named_buffers())
    return modules, params, buffers


def outside_signature(model: nn.Module, stack: nn.ModuleList) -> tuple:
    """`block_signature` of everything but the stack (embeddings, final norm, head, ...)."""
    inside = {id(m) for m in stack.modules()}
    inside_params = {id(p) for p in stack.parameters()}
    modules = tuple(
        (name, type(m).__qualname__) for name, m in model.named_modules() if id(m) not in inside
    )
    params = tuple(
        (name, tuple(p.shape), p.dtype, p.requires_grad)
        for name, p in model.named_parameters()
        if id(p) not in inside_params
    )
    return modules, params


def step_units(model: nn.Module, stack: nn.ModuleList) -> tuple[int, int]:
    """What one step of ``model`` costs on meta, outside the stack and per block: (fixed, per
    block), in leaf modules plus parameters (each leaf module runs a few ops forward and
    backward, each parameter its gradient's and the optimizer's; the embeddings, final norm and
    head are outside). The unit follows the dispatched ops: llama-60m steps 92 ops outside its
    blocks and 254 per block (two micro-batches, AdamW), 7 and 19 units
    (`shortcuts.shallow_runs_pay`; tests/test_estimate_shortcuts.py checks the rule's choice
    against the ops really stepped)."""

    def units(modules, params) -> int:
        return sum(1 for m in modules if next(m.children(), None) is None) + len(params)

    inside = {id(m) for m in stack.modules()}
    inside_params = {id(p) for p in stack.parameters()}
    fixed = units(
        [m for m in model.modules() if id(m) not in inside],
        [p for p in model.parameters() if id(p) not in inside_params],
    )
    return fixed, units(list(stack[0].modules()), list(stack[0].parameters()))


def periodic(signatures: list[tuple], period: int) -> bool:
    """True when block j looks like block j mod ``period`` for every j."""
    return all(sig == signatures[j % period] for j, sig in enumerate(signatures))


# -- the memory curve of a step, labelled by block --------------------------------------------


class PositionTracker(CachedTracker):
    """A `MemoryTracker` that logs every point where it checks its peak (and answers ops from
    a `meta_ops.MetaOpCache`).

    ``log`` holds one ``(label, phases, live_bytes, events)`` per check (consecutive equal ones
    once): the label last set with
    `mark` (a block boundary) or by entering a phase, the phases active there (a phase's entry
    counts for that phase, as `MemoryTracker.phase` counts it), the live total, and how many
    trace events happened before it (to rebuild the breakdown there, `breakdown_at`). The peak
    and the phase peaks are maxima over these points, so the log is the step's memory curve.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer=None,
        *,
        op_cache: MetaOpCache | None,
        round_to: int = 512,
        **kwargs: Any,
    ) -> None:
        # kwargs: the rest of `MemoryTracker`'s (a rank's roles, extra categories, resizes)
        super().__init__(
            model, optimizer, op_cache=op_cache, round_to=round_to, trace=True, **kwargs
        )
        self.label: tuple = ("start",)
        self.log: list[tuple[tuple, tuple[str, ...], int, int]] = []

    def mark(self, label: tuple) -> None:
        """Label the points from now on (until the next mark or phase)."""
        self.label = label

    def _new_peak_check(self) -> None:
        point = (self.label, tuple(self._phase_stack), self._current, len(self._events))
        # A point equal to the one before (an op that allocated and freed nothing, e.g. AdamW's
        # per-parameter step.item()) can be neither the first to reach a peak nor a different
        # breakdown: only one is kept, so that such ops do not make the curve depend on depth.
        if not self.log or self.log[-1] != point:
            self.log.append(point)
        super()._new_peak_check()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.label = ("phase", name)
        entry = (self.label, (*self._phase_stack, name), self._current, len(self._events))
        self.log.append(entry)
        with super().phase(name):
            yield


def breakdown_at(
    trace: AllocationTrace, events: int, categories: tuple[str, ...] = CATEGORIES
) -> dict[str, int]:
    """Live bytes by category after the first ``events`` events of ``trace`` (final roles), in
    the order of ``categories`` (a rank's tracker has more: `MemoryTracker.categories`)."""
    live = {sid: trace.rounded(n) for sid, n in trace.initial}
    for _, sid, nbytes in trace.events[:events]:
        if nbytes > 0:
            live[sid] = trace.rounded(nbytes)
        else:
            live.pop(sid, None)
    totals = dict.fromkeys(categories, 0)
    for sid, nbytes in live.items():
        totals[trace.categories[sid]] += nbytes
    return totals


def _in_backward() -> bool:
    # A checkpointed block's forward runs again inside backward: not a forward boundary.
    return torch._C._current_graph_task_id() != -1


def _first_grad_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value if value.requires_grad else None
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_grad_tensor(item)
            if found is not None:
                return found
    return None


class BlockMarks:
    """Hooks that label a `PositionTracker`'s points by block while the step runs.

    Forward: ``("fwd", j)`` from block j's start, ``("fwd_after", j)`` after it (the points
    between block j and block j+1, and after the last block). Backward: ``("bwd", j)`` when the
    gradient of block j's output is complete, i.e. just before block j's backward (with its
    recomputation under checkpointing) starts, and ``("bwd_after",)`` when the gradient of the
    first block's input is (if it needs one). Hooks on tensors go with the step's graph.

    Optimizer: a parameter group stepped one parameter at a time (not ``foreach``: galore,
    adarankgrad) gets ``("opt", j)`` while a parameter of block j is updated and
    ``("opt_out",)`` for the others; its parameter list is swapped for one that marks as it is
    iterated, and put back on exit. Foreach and fused groups (AdamW's ``fused=True``,
    `methods.optimizers.MetaFusedAdamW`) run their ops per group, after walking the list:
    nothing to mark (marked, a LoRA model's group, all of whose parameters are in blocks, would
    leave its fused op labelled with the last block, and the step was run in full).
    """

    def __init__(
        self,
        stack: nn.ModuleList,
        tracker: PositionTracker,
        optimizer=None,
        *,
        first: bool = False,
        backward_first: bool = False,
    ) -> None:
        self.stack = stack
        self.tracker = tracker
        self.optimizer = optimizer
        # first: the forward pre-hooks run before the block's others (FSDP2's unshard of the
        # block's parameters then counts for the block, not for the stretch before it)
        self.first = first
        # backward_first: the backward mark's hook on a block's output is registered before
        # the other forward hooks run (FSDP2's ``_post_forward`` registers its pre-backward hook
        # on the same tensor; tensor hooks run in the order registered): FSDP2's pre-backward
        # of block j (its unshard, the prefetch of block j − 1's all-gather) then counts for
        # block j, not for the block above it
        self.backward_first = backward_first
        self._handles: list[Any] = []
        self._groups: list[tuple[dict, list]] = []

    def __enter__(self) -> BlockMarks:
        for j, block in enumerate(self.stack):
            self._handles.append(
                block.register_forward_pre_hook(self._pre(j), with_kwargs=True, prepend=self.first)
            )
            self._handles.append(block.register_forward_hook(self._post(j), with_kwargs=True))
            if self.backward_first:
                self._handles.append(
                    block.register_forward_hook(self._grad_mark(j), with_kwargs=True, prepend=True)
                )
        if self.optimizer is not None:
            block_of = {id(p): j for j, b in enumerate(self.stack) for p in b.parameters()}
            for group in self.optimizer.param_groups:
                if not (group.get("foreach") or group.get("fused")):
                    self._groups.append((group, group["params"]))
                    group["params"] = _MarkingParams(group["params"], block_of, self.tracker)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for group, params in self._groups:
            group["params"] = params
        self._groups.clear()

    def _mark_on_grad(self, tensor: torch.Tensor, label: tuple) -> None:
        tracker = self.tracker

        def on_grad(grad: torch.Tensor) -> None:
            tracker.mark(label)

        tensor.register_hook(on_grad)

    def _pre(self, j: int):
        def hook(module, args, kwargs):
            if _in_backward():
                return None
            self.tracker.mark(("fwd", j))
            if j == 0:
                x = args[0] if args else kwargs.get("hidden_states")
                if isinstance(x, torch.Tensor) and x.requires_grad:
                    self._mark_on_grad(x, ("bwd_after",))
            return None

        return hook

    def _post(self, j: int):
        def hook(module, args, kwargs, output):
            if _in_backward():
                return None
            self.tracker.mark(("fwd_after", j))
            if not self.backward_first:
                self._grad_mark(j)(module, args, kwargs, output)
            return None

        return hook

    def _grad_mark(self, j: int):
        def hook(module, args, kwargs, output):
            if _in_backward():
                return None
            out = _first_grad_tensor(output)
            if out is not None:
                self._mark_on_grad(out, ("bwd", j))
            return None

        return hook


class _MarkingParams(list):
    """A parameter group's list that labels the tracker by block as the optimizer walks it."""

    def __init__(self, params: list, block_of: dict[int, int], tracker: PositionTracker):
        super().__init__(params)
        self._block_of = block_of
        self._tracker = tracker

    def __iter__(self):
        for p in super().__iter__():
            j = self._block_of.get(id(p))
            self._tracker.mark(("opt", j) if j is not None else ("opt_out",))
            yield p
