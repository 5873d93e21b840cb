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
- ``gloo``: memory the gloo backend holds inside a collective and NCCL would not (`GlooOnly`;
  real gloo ranks only, docs/multi-gpu.md "gloo vs NCCL").
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from velora_cli.parallel import FSDP

EXTRA_CATEGORIES = ("unsharded", "comm")
_COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional")
# The category of storages a gloo collective creates and NCCL's would not (`GlooOnly`).
GLOO_ONLY = "gloo"
# The torch.distributed functions DDP and FSDP2 call (torch 2.13: FSDP2's DefaultAllGather and
# DefaultReduceScatter call all_gather_single / reduce_scatter_single, DDP's allreduce_hook
# all_reduce), with their older names and the other tensor collectives.
_COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather_single",
    "all_gather_into_tensor",
    "all_gather",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "reduce_scatter",
    "all_to_all_single",
    "broadcast",
    "reduce",
)


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
        # bucket index -> its parameters, in the bucket's order (the depth shortcut gives each
        # bucket the block of its first parameter: `rank_shortcut.bucket_blocks`)
        self.parameters: dict[int, list[torch.Tensor]] = {}

    def register(self, ddp: torch.nn.Module) -> None:
        ddp.register_comm_hook(None, self.hook)

    def reset(self) -> None:
        """Forget the buckets seen so far (DDP rebuilds them after its first iteration)."""
        self.buffers.clear()
        self.parameters.clear()

    # No return annotation: DDP accepts none or the real Future[Tensor] object, and annotations
    # are strings in this module.
    def hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        buffer = bucket.buffer()
        self.buffers[bucket.index()] = buffer
        self.parameters[bucket.index()] = bucket.parameters()
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


class GlooOnly:
    """Labels ``gloo`` the storages a torch.distributed collective creates while it runs on gloo,
    other than its own arguments: memory NCCL would not hold.

    What it finds (torch 2.13, ``torch/csrc/distributed/c10d/ProcessGroupGloo.cpp``):
    ``ProcessGroupGloo::_reduce_scatter_base`` calls ``reduce_scatter_tensor_coalesced``, which
    does ``buffers.push_back(inputTensors[i].clone())``, all-reduces the copy, and returns a
    ``LambdaWork`` whose ``wait()`` runs ``outputTensors[i].copy_(buffers[i].chunk(worldSize)
    [rank])``: an input-sized copy held from the call until the work is destroyed. The clone
    runs inside the collective's kernel, unseen by a dispatch mode; the ``chunk`` in ``wait()``
    (a ``split`` on the caller's thread) exposes its storage to the tracker, inside the
    synchronous collective's call, which is the window this class watches. NCCL's
    ``ProcessGroupNCCL::_reduce_scatter_base`` calls ``ncclReduceScatter(input.data_ptr(),
    output.data_ptr(), ...)`` on FSDP2's own buffers: no tensor of its own.

    Not seen (neither here nor by the tracker): what gloo allocates on its worker thread
    (``AsyncAllgatherWork::allgather``'s ``newLikeFlat`` output, the all-reduce's scratch), and
    storages an asynchronous collective's later ``wait()`` exposes (FSDP2's reduce-scatter is
    synchronous; its all-gather and DDP's all-reduce run wholly on gloo's thread).

    Example:
        >>> with tracker, CommBuffers(tracker), GlooOnly(tracker) as gloo:
        ...     train_step(prepared)
        >>> gloo.born  # {"reduce_scatter_single": [(storage id, nbytes), ...]}
    """

    def __init__(self, tracker) -> None:
        self.tracker = tracker
        self.born: dict[str, list[tuple[int, int]]] = {}
        self._saved: list[tuple[Any, str, Callable]] = []
        self._depth = 0

    def __enter__(self) -> GlooOnly:
        import torch.distributed as dist
        from torch.distributed import distributed_c10d

        for module in (dist, distributed_c10d):
            for name in _COLLECTIVES:
                fn = getattr(module, name, None)
                if fn is not None:
                    self._saved.append((module, name, fn))
                    setattr(module, name, self._watch(name, fn))
        return self

    def __exit__(self, *exc: object) -> None:
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)
        self._saved.clear()

    def _watch(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def collective(*args: Any, **kwargs: Any) -> Any:
            if self._depth:  # an old name calling the new one: one window
                return fn(*args, **kwargs)
            for leaf in tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor):  # its arguments are comm buffers, not gloo's
                    self.tracker.assign(leaf, "comm")
            self._depth += 1
            born: list[tuple[int, int]] = []
            try:
                with self.tracker.born_as(GLOO_ONLY) as born:
                    return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if born:
                    self.born.setdefault(name, []).extend(born)

        return collective
