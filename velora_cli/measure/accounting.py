"""Bytes saved for backward during a forward pass: what activation memory really is.

Every tensor autograd saves goes through ``torch.autograd.graph.saved_tensors_hooks``. Counting
them by *storage* (views of one buffer count once, a tensor saved by three ops counts once) and
excluding parameters and buffers gives the activation memory a training step holds at the end of
its forward pass. Each storage is attributed to the innermost module running when it was first
saved, so a report can say where memory goes (``model.layers.*.mlp.down_proj``).

This is also how REFERENCE.md §2's warning becomes visible: compressing v_proj alone leaves the
q/k/v input in the saved set (q_proj and k_proj still save it).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn


def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage; valid on meta tensors too (their data_ptr is always 0)."""
    return t.untyped_storage()._cdata


def storage_nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's whole storage (what the allocator holds for it)."""
    return t.untyped_storage().nbytes()


@dataclass
class SavedTensors:
    """Result of a count: total bytes and bytes per module that first saved each storage."""

    total_bytes: int = 0
    by_module: dict[str, int] = field(default_factory=dict)
    count: int = 0

    def by_pattern(self) -> dict[str, int]:
        """Bytes per module name with block indices folded: ``layers.*.mlp.down_proj``."""
        out: dict[str, int] = defaultdict(int)
        for name, nbytes in self.by_module.items():
            out[re.sub(r"\.\d+\.", ".*.", f".{name}.").strip(".")] += nbytes
        return dict(out)


# Counters now inside their `with` block: `note_saved` reports to them.
_ACTIVE: list[SavedTensorCounter] = []


def note_saved(tensors: list[torch.Tensor]) -> None:
    """Count ``tensors`` as saved for backward by every active `SavedTensorCounter`.

    For memory kept for backward by other means than autograd's saved-tensor hooks: selective
    checkpointing stores the outputs of the ops it saves in its own cache
    (`velora_cli.measure.selective`).
    """
    for counter in _ACTIVE:
        for t in tensors:
            counter._pack(t)


class SavedTensorCounter:
    """Context manager counting the bytes saved for backward while it is active.

    Example:
        >>> with SavedTensorCounter(model) as counter:
        ...     loss = model(**batch).loss
        >>> counter.result.total_bytes

    Parameters and buffers of ``model`` (and anything in ``exclude``) are not counted. The counter
    keeps the saved tensors alive exactly as autograd does, so counting changes no lifetime.
    Under non-reentrant gradient checkpointing, the checkpoint's own hooks take precedence inside
    checkpointed regions, so what they discard is (correctly) not counted.
    """

    def __init__(self, model: nn.Module, exclude: list[torch.Tensor] | None = None):
        self.model = model
        self.result = SavedTensors()
        self._excluded = {storage_key(t) for t in model.parameters()}
        self._excluded |= {storage_key(t) for t in model.buffers()}
        self._excluded |= {storage_key(t) for t in exclude or []}
        self._seen: set[int] = set()
        self._stack: list[str] = [""]
        self._handles = []
        self._hooks = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # Parameters and buffers saved by reference are also excluded when wrapped in views
        # (W.t() saved by addmm shares W's storage).
        if t.layout == torch.strided:  # sparse/nested tensors have no single storage to count
            key = storage_key(t)
            if key not in self._excluded and key not in self._seen:
                self._seen.add(key)
                nbytes = storage_nbytes(t)
                self.result.total_bytes += nbytes
                self.result.count += 1
                owner = self._stack[-1]
                self.result.by_module[owner] = self.result.by_module.get(owner, 0) + nbytes
        return t

    def __enter__(self) -> SavedTensorCounter:
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._enter_module(name)))
            self._handles.append(module.register_forward_hook(self._exit_module, always_call=True))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _enter_module(self, name: str):
        def hook(module, args):
            self._stack.append(name)

        return hook

    def _exit_module(self, module, args, output):
        if len(self._stack) > 1:
            self._stack.pop()


def saved_activation_bytes(model: nn.Module, forward) -> SavedTensors:
    """Run ``forward()`` (a zero-argument callable) and count what it saves for backward.

    Returns:
        The count; the forward's output is discarded (its graph is freed).
    """
    with SavedTensorCounter(model) as counter:
        out = forward()
    del out
    return counter.result
