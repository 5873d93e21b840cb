"""What the memory tracker cannot see alone under DDP and FSDP2, handed to it as roles.

The tracker (`velora_cli.measure.tracker`) counts storages that dispatched ops create, and knows
parameters, gradients and optimizer state by identity. Under the distributed engines three more
kinds of memory exist (torch 2.13):

- ``unsharded``: FSDP2's all-gathered parameters. Each ``FSDPParam`` owns ``all_gather_outputs``
  whose storages it frees with ``UntypedStorage.resize_(0)`` after forward (and backward) and
  re-allocates with ``resize_`` before the next use (``_fsdp_param.py`` ``free_storage`` /
  ``alloc_storage``): not dispatched ops, so the tracker patches ``resize_``
  (``track_resize=True``) and is told which storages these are.
- ``comm``: communication buffers. DDP's gradient buckets are allocated by its C++ ``Reducer``
  at construction and rebuilt after the first iteration, so no op the tracker sees creates them;
  a comm hook reports them (DDP's own ``allreduce_hook``, documented to give the same results as
  no hook). FSDP2's flat all-gather and reduce-scatter buffers are created by ops the tracker
  sees; `CommBuffers` labels every tensor a collective reads or writes.
- FSDP2's sharded gradients are views of the reduce-scatter output, assigned to ``param.grad``
  in its post-backward (no AccumulateGrad hook fires on the sharded parameter), so the tracked
  step rescans roles before the optimizer step and the flat output becomes ``grads``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from velora_cli.parallel import FSDP

EXTRA_CATEGORIES = ("unsharded", "comm")
_COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional")


class DdpBuckets:
    """A DDP comm hook that records the gradient buckets, then all-reduces them.

    Args:
        fake_world: True under the estimate's fake process group, whose collectives return no
            value: the hook divides by the world size as ``allreduce_hook`` does and completes
            the future itself.
    """

    def __init__(self, fake_world: bool = False) -> None:
        self.fake_world = fake_world
        self.buffers: dict[int, torch.Tensor] = {}

    def register(self, ddp: torch.nn.Module) -> None:
        ddp.register_comm_hook(None, self.hook)

    def reset(self) -> None:
        """Forget the buckets seen so far (DDP rebuilds them after its first iteration)."""
        self.buffers.clear()

    # No return annotation: DDP accepts none or the real Future[Tensor] object, and annotations
    # are strings in this module.
    def hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        buffer = bucket.buffer()
        self.buffers[bucket.index()] = buffer
        if not self.fake_world:
            return allreduce_hook(state, bucket)
        buffer.div_(torch.distributed.get_world_size())
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(buffer)
        return future


def fsdp_unsharded(model: torch.nn.Module) -> list[torch.Tensor]:
    """The all-gather output tensors of every FSDP2 parameter (empty storages when resharded).

    Reads FSDP2's private state (``_get_fsdp_state()._fsdp_param_groups[*].fsdp_params``,
    torch 2.13): there is no public accessor for them.
    """
    from torch.distributed.fsdp import FSDPModule

    out = []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                for fsdp_param in group.fsdp_params:
                    out.extend(fsdp_param.all_gather_outputs)
    return out


class RankRoles:
    """The ``roles`` callable of a rank's `MemoryTracker`: ``(tensor, category)`` pairs.

    Example:
        >>> roles = RankRoles("fsdp", model)
        >>> tracker = MemoryTracker(model, opt, extra_categories=EXTRA_CATEGORIES,
        ...                         roles=roles, track_resize=True)
    """

    def __init__(self, parallel: str, model: torch.nn.Module, buckets: DdpBuckets | None = None):
        self.parallel = parallel
        self.model = model
        self.buckets = buckets

    def unsharded(self) -> list[torch.Tensor]:
        return fsdp_unsharded(self.model) if self.parallel in FSDP else []

    def __call__(self) -> Iterator[tuple[torch.Tensor, str]]:
        for tensor in self.unsharded():
            yield tensor, "unsharded"
        if self.buckets is not None:
            for tensor in self.buckets.buffers.values():
                yield tensor, "comm"


class CommBuffers(TorchDispatchMode):
    """Labels every tensor a collective reads or writes as ``comm`` in ``tracker``.

    Enter it inside the tracker (it must sit above the tracker's own mode, so the collective's
    buffers are already counted when they are labelled). A parameter, buffer or gradient keeps
    its higher-ranking role.
    """

    def __init__(self, tracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        if func.namespace in _COLLECTIVE_NAMESPACES:
            for leaf in tree_leaves((args, kwargs, out)):
                if isinstance(leaf, torch.Tensor):
                    self.tracker.assign(leaf, "comm")
        return out
