"""CUDA's fused RMSNorm kernel, emulated on meta tensors for the estimate backend.

``F.rms_norm`` / ``nn.RMSNorm`` reach ATen's ``rms_norm_symint``
(aten/src/ATen/native/layer_norm.cpp, PyTorch 2.13), which calls ``at::_fused_rms_norm`` unless
the input is channels-last or complex, or the weight's dtype differs from the input's (then
``rms_norm_composite`` runs directly, with a warning). ``_fused_rms_norm`` has a CUDA kernel and,
for every other device (CPU and meta included), only its CompositeImplicitAutograd body,
``rms_norm_composite``. So the two keep different tensors for backward:

- on a GPU, ``_fused_rms_norm_cuda`` (native/cuda/layer_norm_kernel.cu) allocates
  ``Y = empty_like(X)`` and ``rstd = empty({M}, acc_type)`` viewed as (..., 1, ..., 1); its
  derivatives.yaml entry saves ``input``, ``weight`` and ``rstd`` (result1): the input plus
  M floats (float32 for fp16/bf16/fp32 inputs, float64 for float64);
- on meta and CPU, the composite records ``x.to(opmath)``, ``pow``, ``mean``, ``add_``,
  ``rsqrt``, ``mul``, ``mul(weight)``, ``contiguous``, ``type_as``, which save the upcast input
  (a float32 copy for fp16/bf16), ``rsqrt``'s result and the normalised ``x * rstd`` (another
  full float32 tensor): for an fp32 input, one full-size tensor more than CUDA; for bf16, two
  float32 copies instead of the bf16 input.

``MetaFusedRmsNorm`` routes meta-tensor calls that a GPU would fuse to ``FusedRmsNormMeta``, an
autograd function that allocates and saves exactly what ``_fused_rms_norm_cuda`` does. The
models transformers ships mostly write their RMSNorm as Python ops (``LlamaRMSNorm``: the same
ops on every device, nothing to emulate); ``nn.RMSNorm`` and ``F.rms_norm`` appear in a few
(DiffLlama, xLSTM) and in custom model code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def fused_on_cuda(input: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether ``rms_norm`` on CUDA tensors like these runs ``_fused_rms_norm_cuda``.

    Args:
        input: (..., *normalized_shape).
        weight: normalized_shape, or None.

    Returns:
        False for channels-last or complex inputs and for a weight of another dtype (the
        composite fallbacks of ``rms_norm_symint``), True otherwise.
    """
    # suggest_memory_format() == ChannelsLast(3d): the strides of a 4-D (5-D) channels-last
    # tensor that is not also plain contiguous.
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(input.dim())
    channels_last = (
        fmt is not None and input.is_contiguous(memory_format=fmt) and not input.is_contiguous()
    )
    mismatch = weight is not None and weight.dtype != input.dtype
    return not (channels_last or input.is_complex() or mismatch)


class FusedRmsNormMeta(torch.autograd.Function):
    """``_fused_rms_norm`` on meta tensors: saves input, weight and the (M,) accumulator rstd."""

    @staticmethod
    def forward(ctx, input, normalized_shape, weight, eps):
        # eps only changes values, which meta tensors do not have.
        axis = input.dim() - len(normalized_shape)
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        out = torch.empty_like(input, memory_format=torch.contiguous_format)
        # (M,) viewed as input.shape[:axis] + (1,) * len(normalized_shape), as the kernel does.
        rstd = input.new_empty(input.shape[:axis].numel(), dtype=acc)
        rstd = rstd.view(*input.shape[:axis], *([1] * len(normalized_shape)))
        ctx.save_for_backward(input, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, _rstd = ctx.saved_tensors
        # _fused_rms_norm_backward_cuda: dX = empty_like(X), dgamma = empty_like(gamma).
        grad_input = torch.empty_like(input, memory_format=torch.contiguous_format)
        grad_weight = None
        if weight is not None and ctx.needs_input_grad[2]:
            grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
        return grad_input, None, grad_weight, None


def _rms_norm_args(input, normalized_shape, weight=None, eps=None):
    return input, tuple(normalized_shape), weight, eps


_RMS_NORM = {F.rms_norm, torch.rms_norm}


def emulate(func, args: tuple, kwargs: dict):
    """One ``rms_norm`` call as CUDA runs it: `FusedRmsNormMeta` where the GPU fuses it, the
    call itself otherwise."""
    input, shape, weight, eps = _rms_norm_args(*args, **kwargs)
    if (
        isinstance(input, torch.Tensor)
        and input.device.type == "meta"
        and fused_on_cuda(input, weight)
    ):
        return FusedRmsNormMeta.apply(input, shape, weight, eps)
    return func(*args, **kwargs)


# the torch functions this module emulates, each with its handler (emulation/step.py)
EMULATES = dict.fromkeys(_RMS_NORM, emulate)


class MetaFusedRmsNorm(TorchFunctionMode):
    """``with MetaFusedRmsNorm():`` — RMSNorm on meta tensors saves what CUDA's kernel saves.

    Example:
        >>> x = torch.empty(2, 8, 64, device="meta", requires_grad=True)
        >>> with MetaFusedRmsNorm():
        ...     y = F.rms_norm(x, (64,))
        >>> y.grad_fn.name()
        'FusedRmsNormMetaBackward'
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in EMULATES:
            return emulate(func, args, kwargs)
        return func(*args, **kwargs)
