"""CUDA's half-to-float softmax, emulated on meta tensors for the estimate backend.

``softmax(x, dim, dtype=torch.float32)`` (and ``log_softmax``) on an fp16 ``x`` is, in ATen's
``softmax`` / ``log_softmax`` (aten/src/ATen/native/SoftMax.cpp, PyTorch 2.13)::

    if (input_.is_cuda() && input_.scalar_type() == ScalarType::Half && dtype == ScalarType::Float)
      return at::_softmax(input_, dim_, true);               // half_to_float
    Tensor converted = dtype.has_value() ? input_.toType(dtype.value()) : input_;
    return at::_softmax(converted, dim_, false);

Both keep the same tensor for backward (the fp32 result), but off CUDA the input is first copied
to fp32: a transient (..., N) fp32 tensor the GPU never allocates, and in backward an fp32
gradient that ``ToCopyBackward`` then casts to fp16, where CUDA's ``_softmax_backward_data``
writes the fp16 gradient directly. Eager attention in fp16 does exactly this with its N x N
scores (``softmax(attn_weights, dim=-1, dtype=torch.float32)``), so the estimate's peak would
carry one more N x N fp32 tensor per layer at that moment. ``MetaHalfToFloatSoftmax`` routes
such meta-tensor calls to ``_softmax(x, dim, half_to_float=True)``, which has a meta kernel.
bf16 inputs take the conversion on CUDA too and are left alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _functional_args(input, dim=None, _stacklevel=3, dtype=None):
    return input, dim, dtype


def _native_args(input, dim, dtype=None):
    return input, dim, dtype


_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}
_LOG_SOFTMAX = {F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax}
_PARSE = {F.softmax: _functional_args, F.log_softmax: _functional_args}


def half_to_float_on_cuda(input: torch.Tensor, dim: int | None, dtype) -> bool:
    """Whether CUDA runs this softmax call as ``_softmax(input, dim, half_to_float=True)``.

    Args:
        input: the scores.
        dim: the softmax dimension (None: the legacy implicit choice, left to the real op).
        dtype: the requested output dtype.

    Returns:
        True for an fp16 input with ``dtype=torch.float32``.
    """
    return dim is not None and input.dtype == torch.float16 and dtype == torch.float32


def emulate(func, args: tuple, kwargs: dict):
    """One softmax or log_softmax call as CUDA runs it: ``_softmax(x, dim, half_to_float=True)``
    for fp16 -> fp32, the call itself otherwise."""
    input, dim, dtype = _PARSE.get(func, _native_args)(*args, **kwargs)
    if (
        isinstance(input, torch.Tensor)
        and input.device.type == "meta"
        and half_to_float_on_cuda(input, dim, dtype)
    ):
        kernel = torch._softmax if func in _SOFTMAX else torch._log_softmax
        return kernel(input, dim, True)
    return func(*args, **kwargs)


# the torch functions this module emulates, each with its handler (emulation/step.py)
EMULATES = dict.fromkeys(_SOFTMAX | _LOG_SOFTMAX, emulate)


class MetaHalfToFloatSoftmax(TorchFunctionMode):
    """``with MetaHalfToFloatSoftmax():`` — fp16 -> fp32 softmax on meta without the fp32 copy.

    Example:
        >>> x = torch.empty(2, 4, 16, 16, device="meta", dtype=torch.float16)
        >>> with MetaHalfToFloatSoftmax():
        ...     p = F.softmax(x, dim=-1, dtype=torch.float32)  # no fp32 copy of x
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in EMULATES:
            return emulate(func, args, kwargs)
        return func(*args, **kwargs)


# torch < 1.11 saved softmax's input for backward: derivatives.yaml passed ``self`` to
# ``_softmax_backward_data(grad, result, dim, self)`` (only for its dtype), so every
# SoftmaxBackward / LogSoftmaxBackward node kept its input alive until it ran (pytorch#64000,
# "Softmax/logsoftmax use more memory for backward than needed"). PR #65242, relanded as #66018
# on 2021-10-01 after the 1.10 branch, saves only ``self.scalar_type()``: torch 1.11 and later.
SOFTMAX_SAVES_INPUT_BEFORE = (1, 11)


def softmax_saves_input(torch_version: str | None) -> bool:
    """Whether the run's torch (``"1.10"``, ``"1.10.1+cu113"``...; None: the installed one, which
    does not) saved softmax's input for backward."""
    if not torch_version:
        return False
    try:
        major, minor = (int(part) for part in torch_version.split("+")[0].split(".")[:2])
    except ValueError:
        return False
    return (major, minor) < SOFTMAX_SAVES_INPUT_BEFORE


class _HoldInput(torch.autograd.Function):
    """Identity that keeps its input alive until its backward, which runs right after the
    softmax's own backward, as a SoftmaxBackward node holding ``self`` does."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class MetaSoftmaxSavesInput(TorchFunctionMode):
    """``with MetaSoftmaxSavesInput():`` — softmax and log_softmax keep their input for backward,
    as torch before 1.11 did (see `SOFTMAX_SAVES_INPUT_BEFORE`).

    The input saved is the tensor ``_softmax`` receives: the scores themselves, or their fp32
    copy when a ``dtype`` converts them first (not on CUDA's fp16 -> fp32 path, which reads the
    fp16 scores). Only where a gradient is recorded.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SOFTMAX or func in _LOG_SOFTMAX:
            input, dim, dtype = _PARSE.get(func, _native_args)(*args, **kwargs)
            if (
                isinstance(input, torch.Tensor)
                and input.requires_grad
                and torch.is_grad_enabled()
                and dim is not None
            ):
                converts = dtype is not None and input.dtype != dtype
                if converts and not (
                    input.device.type == "meta" and half_to_float_on_cuda(input, dim, dtype)
                ):
                    input, dtype = input.to(dtype), None  # ATen converts, then saves the copy
                held = _HoldInput.apply(input)
                plain = torch.softmax if func in _SOFTMAX else torch.log_softmax
                return plain(held, dim, dtype=dtype) if dtype is not None else plain(held, dim)
        return func(*args, **kwargs)


SOFTMAX_BACKWARD = torch.ops.aten._softmax_backward_data.default


def cuda_kernel_temporaries(func, args: tuple) -> list[tuple[str, torch.Tensor]]:
    """Tensors a CUDA kernel allocates inside one op and frees before it returns, made on meta
    so that a tracker can count them: ``(op name, tensor)`` pairs, empty for other ops.

    ``_softmax_backward_data`` on CUDA computes ``Tensor tmp = grad * output;`` before its kernel
    (``softmax_backward_cuda_out``, aten/src/ATen/native/cuda/SoftMax.cu): a temporary the size
    of the scores in the gradient's dtype (fp32 for HF eager attention, whose softmax runs with
    ``dtype=torch.float32``), live with the saved probabilities, their gradient and the new
    input gradient. The CPU kernel and the meta one allocate nothing of the kind. At 2 x 32
    heads x 2048² that is 1 GiB per recomputed layer's attention backward.
    """
    if func is not SOFTMAX_BACKWARD:
        return []
    grad, output = args[0], args[1]
    if not isinstance(grad, torch.Tensor) or grad.device.type != "meta":
        return []
    return [("aten::mul", torch.ops.aten.mul.Tensor(grad, output))]
