"""Activation offload: saved tensors kept in pinned host memory between forward and backward.

Two kinds (`OFFLOAD_KINDS`), as the libraries people use set them up:

- ``inputs``: transformers' ``gradient_checkpointing_kwargs={"offload": True}`` (5.x
  ``_activation_checkpointing_enable``): each checkpointed layer's ``checkpoint(...)`` call runs
  under ``torch.autograd.graph.save_on_cpu(pin_memory=True)``. The checkpoint's own saved-tensor
  hooks take precedence inside the layer, so only what is saved outside them moves: the layer's
  input (hidden states, B·L·H·s bytes per checkpointed layer). Needs checkpointing.
- ``all``: every saved tensor of the forward that is not a parameter or buffer and holds at least
  1024 bytes, as TRL's ``activation_offloading`` (``trl/models/activation_offloading.py``,
  ``min_offload_size=1024``) does; entered around the model's forward. With checkpointing on as
  well, that is again the checkpoint inputs (plus whatever is saved outside the layers).

What a pack does (torch 2.13 ``torch/autograd/graph.py`` ``save_on_cpu``): a new pinned host tensor
of the saved tensor's *size* (a saved view costs a full copy of its shape; no sharing between
tensors saved twice) and ``copy_(tensor, non_blocking=True)``; the unpack is
``tensor.to(device, non_blocking=True)``: a new device tensor in backward, freed after use. Both
copies are issued on the current (compute) stream: ``non_blocking`` frees the host thread, not
the GPU, so the copies do not overlap the kernels around them (TRL's offloader uses a side
stream instead; see `velora_cli.timing.offload`).

Where the step runs on CUDA the copies are real. On the cpu and meta devices (the cpu backend and
the estimate) the host copy is emulated: made with the dispatch modes switched off, so the memory
tracker (which counts device storages) never sees it, and restored by a ``clone`` the tracker does
see, as a GPU allocates the restored tensor. Either way `HostLedger` counts the host side: live
bytes and their peak, rounded up to a power of two as PyTorch's pinned-memory allocator does
(``aten/src/ATen/core/CachingHostAllocator.h``: ``c10::llvm::PowerOf2Ceil(size)``), and the bytes
copied each way.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
from torch import nn

from velora_cli.measure.accounting import note_saved

OFFLOAD_KINDS = ("inputs", "all")
MIN_OFFLOAD_BYTES = 1024  # TRL's OffloadActivations(min_offload_size=1024)


def pinned_block(nbytes: int) -> int:
    """Bytes the pinned host allocator holds for a request (next power of two; 0 stays 0)."""
    return 0 if nbytes <= 0 else 1 << (nbytes - 1).bit_length()


class HostLedger:
    """The host side of activation offload during one step.

    Attributes:
        live / peak: pinned bytes alive now / at most (blocks rounded as the allocator does).
        tensor_peak: the same without rounding (the tensors' own bytes).
        offloaded / restored: bytes copied device -> host (packs) and host -> device (unpacks).
        copies: tensors packed.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.live = self.peak = self.tensor_live = self.tensor_peak = 0
        self.offloaded = self.restored = self.copies = 0

    def packed(self, host: torch.Tensor) -> None:
        nbytes = host.numel() * host.element_size()
        block = pinned_block(nbytes)
        self.live += block
        self.tensor_live += nbytes
        self.peak = max(self.peak, self.live)
        self.tensor_peak = max(self.tensor_peak, self.tensor_live)
        self.offloaded += nbytes
        self.copies += 1
        weakref.finalize(host, self._freed, block, nbytes)

    def _freed(self, block: int, nbytes: int) -> None:
        self.live -= block
        self.tensor_live -= nbytes

    def fields(self, micro_batches: int) -> dict[str, int]:
        """Row fields: ``host_bytes`` (pinned peak), ``host_tensor_bytes``, and the bytes
        offloaded / restored per micro-batch (the step repeats them per micro-batch)."""
        per = max(1, micro_batches)
        return {
            "host_bytes": self.peak,
            "host_tensor_bytes": self.tensor_peak,
            "offloaded_bytes": self.offloaded // per,
            "restored_bytes": self.restored // per,
        }


class OffloadHooks(torch.autograd.graph.saved_tensors_hooks):
    """``save_on_cpu(pin_memory=True)`` with a ledger, on any device (see the module docstring).

    Args:
        ledger: counts the host copies.
        skip: tensors to keep on the device (``all``: parameters, buffers, small tensors).
    """

    def __init__(
        self, ledger: HostLedger, skip: Callable[[torch.Tensor], bool] | None = None
    ) -> None:
        def pack(t: torch.Tensor):
            if (skip is not None and skip(t)) or t.layout != torch.strided:
                note_saved([t])  # stays on the device (the counter leaves parameters out)
                return t
            if t.device.type == "cuda":
                host = torch.empty(t.size(), dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
            else:
                from torch.utils._python_dispatch import _disable_current_modes

                with _disable_current_modes():  # the device tracker must not see the host copy
                    host = torch.empty(t.size(), dtype=t.dtype, device=t.device)
                    if t.device.type != "meta":
                        host.copy_(t)
            ledger.packed(host)
            return (t.device, host)

        def unpack(packed):
            if not isinstance(packed, tuple):
                return packed
            device, host = packed
            ledger.restored += host.numel() * host.element_size()
            if device.type == "cuda":
                return host.to(device, non_blocking=True)
            return host.clone()  # the restored device tensor, a new allocation

        super().__init__(pack, unpack)


def _skip_for(model: nn.Module) -> Callable[[torch.Tensor], bool]:
    from velora_cli.measure.accounting import storage_key

    kept = {storage_key(p) for p in model.parameters()} | {storage_key(b) for b in model.buffers()}

    def skip(t: torch.Tensor) -> bool:
        small = t.numel() * t.element_size() < MIN_OFFLOAD_BYTES
        return small or (t.layout == torch.strided and storage_key(t) in kept)

    return skip


def enable_offload(model: nn.Module, kind: str) -> HostLedger:
    """Set up activation offload ``kind`` on a built model (checkpointing already enabled for
    ``inputs``). The ledger is ``model._velora_host_ledger``; `remove_offload` undoes it.

    Raises:
        ValueError: an unknown kind, or ``inputs`` without checkpointed layers.
    """
    from velora_cli.measure.selective import checkpointed_layers

    if kind not in OFFLOAD_KINDS:
        raise ValueError(f"--offload {kind!r}: choose {', '.join(OFFLOAD_KINDS)}")
    ledger = HostLedger()
    model._velora_host_ledger = ledger
    if kind == "inputs":
        layers = [m for m in checkpointed_layers(model) if getattr(m, "gradient_checkpointing", 0)]
        if not layers:
            raise ValueError("--offload inputs moves checkpoint inputs: it needs checkpointing")
        for layer in layers:
            layer._gradient_checkpointing_func = _offloaded(
                layer._gradient_checkpointing_func, ledger
            )
        return ledger
    skip = _skip_for(model)
    state: list[OffloadHooks] = []

    def enter(module, args, kwargs=None):
        hooks = OffloadHooks(ledger, skip)
        hooks.__enter__()
        state.append(hooks)

    def leave(module, args, output):
        if state:
            state.pop().__exit__(None, None, None)

    model._velora_offload_handles = [
        model.register_forward_pre_hook(enter),
        model.register_forward_hook(leave, always_call=True),
    ]
    return ledger


def _offloaded(func: Callable, ledger: HostLedger) -> Callable:
    """``func`` (a layer's checkpoint call) under `OffloadHooks`, as transformers' offload=True
    wraps ``checkpoint`` in ``save_on_cpu``."""

    @functools.wraps(func)
    def call(*args, **kwargs):
        with OffloadHooks(ledger):
            return func(*args, **kwargs)

    call._velora_offload = True
    return call


def remove_offload(model: nn.Module) -> None:
    """Undo `enable_offload` (checkpointing itself is undone apart, which drops ``inputs``)."""
    for handle in getattr(model, "_velora_offload_handles", ()):
        handle.remove()
    for name in ("_velora_offload_handles", "_velora_host_ledger"):
        if hasattr(model, name):
            delattr(model, name)
