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

Autocast's weight-cast cache changes no memory: the half copy of a weight is saved for backward by
the linear that uses it either way. VeLoRA layers read the emulated dtype through
``velora.autocast_dtype`` and cast exactly as under real autocast.
"""

from __future__ import annotations

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


class MetaAutocast(TorchFunctionMode):
    """``with MetaAutocast("bf16"):`` — CUDA autocast's cast policy for meta tensors."""

    def __init__(self, amp: str):
        super().__init__()
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]

    def __enter__(self):
        velora._emulated_autocast.append(self.dtype)
        return super().__enter__()

    def __exit__(self, *exc):
        velora._emulated_autocast.pop()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOWER:
            args, kwargs = tree_map(self._to(self.dtype), (args, kwargs))
        elif func in _FP32:
            args, kwargs = tree_map(self._to(torch.float32, only_half=True), (args, kwargs))
        return func(*args, **kwargs)

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
