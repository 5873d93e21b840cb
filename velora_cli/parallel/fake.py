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

    WarmRanks.release_held()  # a world kept open for warm ranks (`WarmRanks`) is closed first
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
    warm: WarmRanks | None = None,
) -> T:
    """Build rank ``rank`` of ``spec``'s job on fake tensors, shard and warm it up, and return
    ``body(prepared, roles)`` (the tracked step), still inside the fake world.

    Args:
        model_spec: the resolved model to build (the depth shortcut's shallow one); None:
            ``spec.model``.
        warm: warmed ranks kept between calls (`WarmRanks`, the fast path's): a rank already
            warmed for a job differing only in micro-batch size is stepped again, not rebuilt.
    """
    if warm is not None:
        return warm.run(spec, rank, body, warmup=warmup, model_spec=model_spec)
    with fake_world(spec.world_size, rank):
        return _warmed_rank(spec, rank, warmup, model_spec, body=body)[1]


def _warmed_rank(spec: StepSpec, rank: int, warmup: int, model_spec: Any, *, body=None):
    """Inside a fake world: the rank built, sharded and warmed up; ``(prepared, roles, mode)``,
    or, with ``body``, ``(prepared, body(prepared, roles), mode)`` run inside the same mode."""
    from velora_cli.measure.train_step import prepare
    from velora_cli.parallel.rank_step import rank_roles, warm_up
    from velora_cli.parallel.shard import shard_prepared

    attention = register_rank_attention()
    prepared = prepare(spec, "meta", attn_implementation=attention, model_spec=model_spec)
    # As the single-process estimate: micro-batches after the second repeat it exactly.
    prepared.micro_batches = prepared.micro_batches[:2]
    mode = fake_tensors()
    with mode:
        to_fake_cpu(prepared)
        with ddp_on_fake_tensors():
            shard_prepared(prepared)
        if spec.parallel == "ddp":
            real_bucket_indices(prepared.model)
        roles = rank_roles(prepared, fake_world=True)
        warm_up(prepared, warmup, roles.buckets, fewest=FEWEST_WARMUP)
        if body is not None:
            return prepared, body(prepared, roles), mode
    return prepared, roles, mode


class WarmRanks:
    """Warmed fake ranks kept for the next candidate of a tune that differs from theirs only in
    micro-batch size (gradient accumulation steps): such a rank is not built, sharded and warmed
    up again, its tracked step runs on the new batches. That is a small part of a candidate
    (the tracked, recorded steps dominate): 12% of the CPU time of 12 Llama-2-7b FSDP2
    candidates at 8 ranks (docs/estimate.md).

    Why that is the same step: the state a step leaves (parameters and their shards, optimizer
    state, FSDP2's lazily initialized groups, VeLoRA's vectors) has no batch dimension, and a
    step ends in that state whatever its batch was: a rank warmed at one micro-batch size and
    then stepped at others starts each tracked step in the state its own warm-up would have
    left. tests/test_rank_shortcut.py checks the job rows of a sequence of micro-batch sizes
    equal to fresh ranks' byte for byte (FSDP2, resharded or not, VeLoRA, checkpointing).

    Only FSDP2 ranks without padding, packing or CPU offload are shared (DDP's rows are already
    shared across world sizes, `estimate.DdpRows`); other ranks run fresh, in the kept world.
    The fake process group of the kept ranks stays initialized between calls: `fake_world`
    closes it before opening another, and so does `release` (the tune's estimator, once its
    estimates are done: nothing else in the process sees a process group).
    """

    KEPT = 16  # warmed shallow ranks: a tune interleaves 4 FSDP2 jobs × 3 shallow depths
    _held: WarmRanks | None = None  # the one whose world is open

    def __init__(self) -> None:
        import contextlib as _contextlib

        self._stack = _contextlib.ExitStack()
        self.world: tuple[int, int] | None = None
        self.entries: dict[tuple, tuple] = {}
        self.reused = 0  # tracked steps on a kept rank

    @classmethod
    def release_held(cls) -> None:
        """Close the kept world, if any (before a process group is opened elsewhere)."""
        if cls._held is not None:
            cls._held.release()

    def release(self) -> None:
        """Forget the kept ranks and destroy their process group."""
        self.entries.clear()
        if self.world is not None:
            self.world = None
            WarmRanks._held = None
            self._stack.close()

    def _open(self, world_size: int, rank: int) -> None:
        if self.world == (world_size, rank):
            return
        self.release()
        WarmRanks.release_held()
        self._stack.enter_context(fake_world(world_size, rank))
        self.world = (world_size, rank)
        WarmRanks._held = self

    @staticmethod
    def key(spec: StepSpec, rank: int, warmup: int, model_spec: Any) -> tuple | None:
        """What a warmed rank depends on, all but the micro-batch size (None: not shared)."""
        import dataclasses

        if spec.parallel not in ("fsdp", "fsdp-no-reshard") or spec.padding or spec.packing:
            return None
        if spec.cpu_offload:
            return None
        model = None
        if model_spec is not None:
            model = (model_spec.name, model_spec.source, model_spec.task, model_spec.builtin,
                     model_spec.weights_path, model_spec.config.to_json_string(use_diff=False))  # fmt: skip
        key = (dataclasses.replace(spec, grad_accum_steps=1), rank, warmup, FEWEST_WARMUP, model)
        try:
            hash(key)
        except TypeError:
            return None
        return key

    def run(self, spec: StepSpec, rank: int, body: Callable[[Any, Any], T], *, warmup: int,
            model_spec: Any) -> T:  # fmt: skip
        """`run_rank`'s answer, on a kept rank where there is one (class docstring)."""
        from velora_cli.measure.train_step import make_batch

        self._open(spec.world_size, rank)
        key = self.key(spec, rank, warmup, model_spec)
        if key is None:
            return _warmed_rank(spec, rank, warmup, model_spec, body=body)[1]
        entry = self.entries.pop(key, None)
        if entry is None:
            entry = _warmed_rank(spec, rank, warmup, model_spec)
            if len(self.entries) >= self.KEPT:
                self.entries.pop(next(iter(self.entries)))
        else:
            self.reused += 1
        self.entries[key] = entry  # the most recently used last
        prepared, roles, mode = entry
        prepared.spec = spec
        batches = make_batch(spec, prepared.vocab_size, "meta", prepared.inputs)[:2]
        try:
            with mode:
                prepared.micro_batches = [
                    {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in batch.items()}
                    for batch in batches
                ]
                return body(prepared, roles)
        except BaseException:
            self.entries.pop(key, None)  # a step cut short may leave the rank in another state
            raise
