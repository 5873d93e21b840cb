"""CUDA autocast, emulated on meta tensors for the estimate backend.

``torch.autocast`` dispatches through per-backend keys (AutocastCUDA, AutocastCPU, ...) and meta
tensors have none, so under ``--amp`` a meta model would silently run in fp32. ``MetaAutocast``
applies CUDA autocast's policy at the torch-function level, above autograd (so the casts are
recorded and gradients reach the fp32 master weights):

- matmul-class ops (linear, matmul, mm, bmm, addmm, baddbmm, einsum, conv, SDPA) run in the amp
  dtype: floating inputs are cast to it, as autocast's lower-precision list does;
- softmax, log_softmax, layer_norm, the losses, exp/log/pow/rsqrt and reductions listed below run
  in fp32, as its fp32 list does;
- everything else runs in the widest input dtype (type promotion), as autocast leaves it.

Autocast's weight-cast cache: CUDA autocast keeps the lower-precision cast of every fp32 leaf
that requires grad (the trained weights) until the outermost autocast region exits
(``cached_cast`` in aten/src/ATen/autocast_mode.cpp: ``arg.requires_grad() && arg.is_leaf() &&
!arg.is_view() && cache_enabled``, whatever the grad mode; ``torch.autocast.__exit__`` calls
``clear_autocast_cache()`` when the nesting drops to 0). Without checkpointing that costs nothing
(each linear saves its weight's half copy for backward anyway); with checkpointing the layers'
forward saves nothing, yet the cache holds the half copy of every trained weight until the forward
ends. On meta the step marks its autocast region with `autocast_region` (the train step enters it
where it enters ``torch.autocast`` on a GPU); casts are cached inside it. Frozen weights (LoRA's
base) are not cached. VeLoRA layers read the emulated dtype through ``velora.autocast_dtype`` and
cast exactly as under real autocast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from velora_cli.methods import velora

_LOWER = {
    F.linear,
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.scaled_dot_product_attention,
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.addmm,
    torch.baddbmm,
    torch.addbmm,
    torch.einsum,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.Tensor.__rmatmul__,
    torch.Tensor.mm,
    torch.Tensor.bmm,
    torch.Tensor.addmm,
    torch.Tensor.baddbmm,
}
_FP32 = {
    F.softmax,
    F.log_softmax,
    torch.softmax,
    torch.log_softmax,
    torch.Tensor.softmax,
    torch.Tensor.log_softmax,
    F.cross_entropy,
    F.nll_loss,
    F.mse_loss,
    F.l1_loss,
    F.binary_cross_entropy_with_logits,
    F.kl_div,
    F.layer_norm,
    F.group_norm,
    torch.exp,
    torch.log,
    torch.pow,
    torch.rsqrt,
    torch.Tensor.exp,
    torch.Tensor.log,
    torch.Tensor.pow,
    torch.Tensor.rsqrt,
    torch.logsumexp,
    torch.cumsum,
    torch.Tensor.cumsum,
}
_HALF = (torch.float16, torch.bfloat16)
_ACTIVE: list[MetaAutocast] = []  # the entered emulations, innermost last


@contextlib.contextmanager
def autocast_region() -> Iterator[None]:
    """The region a ``torch.autocast`` would cover (a step's forward and loss): the innermost
    emulated autocast caches its weight casts inside it and drops them when it ends, as the
    outermost ``torch.autocast`` clears its cache on exit. Nothing without an emulation."""
    mode = _ACTIVE[-1] if _ACTIVE else None
    if mode is None:
        yield
        return
    mode.regions += 1
    try:
        yield
    finally:
        mode.regions -= 1
        if mode.regions == 0:
            mode.cache.clear()


class MetaAutocast(TorchFunctionMode):
    """``with MetaAutocast("bf16"):`` — CUDA autocast's cast policy for meta tensors."""

    def __init__(self, amp: str):
        super().__init__()
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.regions = 0  # autocast_region depth; casts are cached inside one
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (weight, cast)

    def __enter__(self):
        velora._emulated_autocast.append(self.dtype)
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        velora._emulated_autocast.pop()
        _ACTIVE.remove(self)
        self.cache.clear()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOWER:
            args, kwargs = tree_map(self._cached_to(self.dtype), (args, kwargs))
        elif func in _FP32:
            args, kwargs = tree_map(self._to(torch.float32, only_half=True), (args, kwargs))
        return func(*args, **kwargs)

    def _cached_to(self, dtype):
        cast = self._to(dtype)

        def cached(value):
            if not (
                self.regions
                and isinstance(value, torch.Tensor)
                and value.device.type == "meta"
                and value.dtype == torch.float32
                and value.requires_grad
                and value.is_leaf
                and value._base is None
            ):
                return cast(value)
            hit = self.cache.get(id(value))
            if hit is None or hit[0] is not value:
                hit = self.cache[id(value)] = (value, cast(value))
            return hit[1]

        return cached

    @staticmethod
    def _to(dtype, only_half=False):
        def cast(value):
            if (
                isinstance(value, torch.Tensor)
                and value.is_floating_point()
                and value.device.type == "meta"
                and value.dtype != dtype
                and (not only_half or value.dtype in _HALF)
            ):
                return value.to(dtype)
            return value

        return cast
