"""The estimate's world: torch's fake process group and fake CPU tensors.

The fake process group (``torch.testing._internal.distributed.fake_pg``, backend ``"fake"``)
plays rank r of N in one process: collectives do nothing, but every buffer DDP and FSDP2
allocate for them is still allocated, as on rank r. Under ``FakeTensorMode`` nothing has memory
behind it, so a 7B model's rank runs in seconds.

Why fake CPU tensors and not meta tensors, as the single-process estimate uses (torch 2.13):
FSDP2 refuses parameters still on meta at its lazy init (``FSDPParamGroup.
_validate_no_meta_params``: meta is for deferred initialization), and it allocates its
all-gather and reduce-scatter buffers on the mesh's device, which is cpu or cuda, never meta.
Fake CUDA tensors abort the process during autograd on a machine without CUDA (REFERENCE.md §2).
The CPU code path of FSDP2 makes the same allocations in the same order as the CUDA one: its
streams and events are no-ops on CPU, and nothing else in ``torch/distributed/fsdp/
_fully_shard/`` depends on the device type.

DDP's C++ ``Reducer`` writes through raw pointers in three places where a fake tensor has no
data; each gets the smallest workaround we found:

- at construction, ``_verify_param_shape_across_processes`` compares parameter shapes with the
  other ranks through a tensor filled in C++: skipped (a fake group has no other ranks);
- after the first iteration, the bucket rebuild broadcasts the new bucket indices in an int
  tensor filled in C++: DDP's ``_pre_forward`` runs with int ``empty`` tensors made real (a few
  bytes, in a warm-up step, never tracked);
- the fake group's all-reduce future carries no tensor, which DDP's built-in hook asserts on:
  the bucket-recording hook completes it (`roles.DdpBuckets`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from velora_cli.measure.train_step import Prepared, StepSpec

# Not ESTIMATE_ATTENTION itself: the same attention function with a mask function that also
# reads a fake padding mask as "no padding" (a fake tensor has no values to check).
RANK_ATTENTION = "velora_rank_estimate"
# One warm-up step with the fewest forwards (`rank_step.warm_up`'s ``fewest``): the tracked
# step that follows is the same (tests/test_rank_shortcut.py compares the rows both ways).
FEWEST_WARMUP = True
T = TypeVar("T")


def register_rank_attention() -> str:
    """Register the estimate attention for fake tensors with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from velora_cli.emulation.attention import velora_estimate_attention

    AttentionInterface.register(RANK_ATTENTION, velora_estimate_attention)
    AttentionMaskInterface.register(RANK_ATTENTION, _fake_aware_mask)
    return RANK_ATTENTION


def _fake_aware_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    # the estimate's mask function reads a fake padding mask as a meta one: full length batches,
    # or padded ones under `--padding` (`emulation.attention.padded_batches`)
    from velora_cli.emulation.attention import _estimate_mask

    return _estimate_mask(*args, **kwargs)


@contextlib.contextmanager
def fake_world(world_size: int, rank: int) -> Iterator[None]:
    """``torch.distributed`` initialized as rank ``rank`` of ``world_size`` on a fake group.

    Raises:
        RuntimeError: a process group is already initialized in this process.
    """
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialized; the estimate needs its own")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def fake_tensors():
    """The FakeTensorMode the estimate runs in (real inputs, e.g. CPU scalars, are allowed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def to_fake_cpu(prepared: Prepared) -> None:
    """Move a model built on meta to fake CPU tensors, with fake batches of the same shapes.

    Call inside `fake_tensors()`.
    """
    prepared.model.to_empty(device="cpu")
    prepared.micro_batches = [
        {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in batch.items()}
        for batch in prepared.micro_batches
    ]
    prepared.device = torch.device("cpu")


@contextlib.contextmanager
def ddp_on_fake_tensors() -> Iterator[None]:
    """DDP's constructor without its cross-rank shape check (see the module docstring)."""
    import torch.nn.parallel.distributed as ddp_module

    original = ddp_module._verify_param_shape_across_processes
    ddp_module._verify_param_shape_across_processes = lambda *args, **kwargs: None
    try:
        yield
    finally:
        ddp_module._verify_param_shape_across_processes = original


class _RealIndexTensors(TorchDispatchMode):
    """Integer ``empty`` tensors made real: the Reducer fills its bucket indices in C++."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is torch.ops.aten.empty.memory_format and kwargs.get("dtype") in (
            torch.int32,
            torch.int64,
        ):
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def real_bucket_indices(ddp: torch.nn.Module) -> None:
    """Run ``ddp``'s ``_pre_forward`` (where buckets are rebuilt) with real index tensors."""
    original = ddp._pre_forward

    def pre_forward(*args: Any, **kwargs: Any):
        with _RealIndexTensors():
            return original(*args, **kwargs)

    ddp._pre_forward = pre_forward


def run_rank(
    spec: StepSpec,
    rank: int,
    body: Callable[[Any, Any], T],
    *,
    warmup: int = 1,
    model_spec: Any = None,
) -> T:
    """Build rank ``rank`` of ``spec``'s job on fake tensors, shard and warm it up, and return
    ``body(prepared, roles)`` (the tracked step), still inside the fake world.

    Args:
        model_spec: the resolved model to build (the depth shortcut's shallow one); None:
            ``spec.model``.
    """
    from velora_cli.measure.train_step import prepare
    from velora_cli.parallel.rank_step import rank_roles, warm_up
    from velora_cli.parallel.shard import shard_prepared

    attention = register_rank_attention()
    with fake_world(spec.world_size, rank):
        prepared = prepare(spec, "meta", attn_implementation=attention, model_spec=model_spec)
        # As the single-process estimate: micro-batches after the second repeat it exactly.
        prepared.micro_batches = prepared.micro_batches[:2]
        with fake_tensors():
            to_fake_cpu(prepared)
            with ddp_on_fake_tensors():
                shard_prepared(prepared)
            if spec.parallel == "ddp":
                real_bucket_indices(prepared.model)
            roles = rank_roles(prepared, fake_world=True)
            warm_up(prepared, warmup, roles.buckets, fewest=FEWEST_WARMUP)
            return body(prepared, roles)
