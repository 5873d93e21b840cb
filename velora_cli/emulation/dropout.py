"""CUDA's fused dropout, emulated on meta tensors for the estimate backend.

``F.dropout(x, p, training=True)`` reaches ATen's ``at::native::dropout``
(aten/src/ATen/native/Dropout.cpp, PyTorch 2.13), which picks its kernel by device::

    if (input.is_nested() || (train && is_fused_kernel_acceptable(input, p)))
      return std::get<0>(at::native_dropout(input, p, train));
    return _dropout<false>(input, p, train);                 // -> _dropout_impl

    bool is_fused_kernel_acceptable(const Tensor& input, double p) {
      return (input.is_cuda() || input.is_xpu() || input.is_lazy() || input.is_privateuseone())
          && p > 0 && p < 1 && input.sym_numel() > 0;
    }

What each path keeps for backward (tools/autograd/derivatives.yaml):

- on a GPU, ``native_dropout``: its second output, a **bool** mask. ``native_dropout_cuda`` ->
  ``dropout_cuda<bool>`` (aten/src/ATen/native/cuda/Dropout.cu) allocates
  ``mask = empty_like(self, kBool)`` and ``ret = empty_like(self)``; backward is
  ``native_dropout_backward(grad, mask, 1 / (1 - p))``. 1 byte per element.
- on CPU and meta, ``_dropout_impl``: ``noise = empty_like(input)``, ``bernoulli_(1 - p)``,
  ``div_(1 - p)``, then ``input.mul(noise)``, whose backward saves ``noise`` in the input's
  dtype. 4 bytes per element in fp32, 2 in bf16/fp16.

``MetaCudaDropout`` routes every meta-tensor call that a GPU would fuse to
``torch.native_dropout`` (it has a meta kernel and the same autograd formula), so the estimate
keeps CUDA's mask and output and nothing else. What CUDA does not fuse either stays as it is:
in-place dropout (``dropout_`` is always ``_dropout_impl``), feature dropout (``dropout1d/2d/3d``)
and alpha dropout, p == 0 or 1, eval mode, empty tensors.

Where dropout appears in a training step, and how each place is covered:

- ``nn.Dropout`` / ``F.dropout`` / ``torch.dropout`` anywhere in a model (embedding, residual and
  hidden dropouts: GPT-2's ``embd_pdrop``/``resid_pdrop``, BERT's ``hidden_dropout_prob``;
  classifier heads; eager attention's dropout of the probabilities): torch functions,
  intercepted here.
- inside fused SDPA (flash, memory-efficient): the kernel regenerates its mask from a Philox
  seed in backward and keeps none, on the GPU as on meta (``emulation/attention.py``).
- inside SDPA's math path: ``at::dropout`` is called from C++, out of reach of a torch-function
  mode; ``emulation/math_attention.py`` replays that path with this dropout.

The estimate enters this mode around every step and around each checkpoint recomputation
(``emulation/step.py``); the cpu backend measures real CPU tensors and does not use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def fused_on_cuda(input: torch.Tensor, p: float, train: bool, inplace: bool = False) -> bool:
    """Whether ``at::native::dropout`` on a CUDA tensor like ``input`` runs ``native_dropout``.

    Args:
        input: the tensor dropped out.
        p: drop probability.
        train: dropout is active (``training=True``).
        inplace: ``F.dropout(..., inplace=True)``, which CUDA never fuses (``dropout_``).

    Returns:
        True for ``train and 0 < p < 1 and numel > 0`` out of place: is_fused_kernel_acceptable
        for a CUDA device, as quoted in the module docstring.
    """
    return bool(train) and 0 < p < 1 and input.numel() > 0 and not inplace


def _f_dropout_args(input, p=0.5, training=True, inplace=False):
    return input, p, training, inplace


def _torch_dropout_args(input, p, train):
    return input, p, train, False


_ARGS = {F.dropout: _f_dropout_args, torch.dropout: _torch_dropout_args}


def emulate(func, args: tuple, kwargs: dict):
    """One dropout call (``func`` in `EMULATES`) as CUDA runs it: ``native_dropout`` where the
    GPU fuses it, the call itself otherwise."""
    input, p, train, inplace = _ARGS[func](*args, **kwargs)
    if (
        isinstance(input, torch.Tensor)
        and input.device.type == "meta"
        and fused_on_cuda(input, p, train, inplace)
    ):
        return torch.native_dropout(input, p, True)[0]
    return func(*args, **kwargs)


# the torch functions this module emulates, each with its handler (emulation/step.py merges
# the emulations' tables into one torch-function mode)
EMULATES = dict.fromkeys(_ARGS, emulate)


class MetaCudaDropout(TorchFunctionMode):
    """``with MetaCudaDropout():`` — dropout on meta tensors saves CUDA's bool mask.

    Example:
        >>> x = torch.empty(2, 8, device="meta", requires_grad=True)
        >>> with MetaCudaDropout():
        ...     y = F.dropout(x, 0.1, training=True)
        >>> y.grad_fn.name()
        'NativeDropoutBackward0'
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in EMULATES:
            return emulate(func, args, kwargs)
        return func(*args, **kwargs)
