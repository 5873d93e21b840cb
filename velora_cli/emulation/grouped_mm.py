"""CUDA's grouped GEMM (``torch._grouped_mm``) on meta tensors, for every dtype CUDA accepts.

transformers 5.25's MoE experts (``integrations/moe.py``, ``grouped_mm_experts_forward``: the
default ``experts_implementation`` of Mixtral, Qwen-MoE...) call ``torch.nn.functional.grouped_mm``
(``torch._grouped_mm``) on a CUDA device of compute capability 8.0 or more
(``_can_use_grouped_mm``), in the weights' dtype. On meta the same call happens (the device is
neither CPU nor CUDA, so ``_can_use_grouped_mm`` says yes), but torch 2.13's meta kernel
(``torch/_meta_registrations.py``, ``_meta_grouped_mm_common``) accepts only bfloat16 inputs, so a
float16 or float32 MoE model failed to estimate ("Expected inputs of BF16 type").

What CUDA does instead (PyTorch, ``aten/src/ATen/native/cuda/GroupedBlas.cpp``,
``_grouped_mm_cuda``, and ``aten/src/ATen/native/GroupedMMUtils.h``, read at pytorch/pytorch
00d4eaf9 and in a later copy that adds the cuBLASLt path; the installed 2.13.0 build, git
cf30153c, is CPU-only and its CUDA sources were not at hand, so this is the code of that line
around it, not of the tag):

- ``_grouped_mm_validate_inputs`` accepts float32, bfloat16 and float16 operands (2-D or 3-D,
  strides with one unit dimension and the other a multiple of 16 bytes, int32 ``offs``, no bias);
  the output dtype must be ``mat_a``'s;
- the output is ``create_grouped_gemm_output_tensor``: (M, N) for 2-D x 3-D (the MoE forward),
  (G, M, N) for 2-D x 2-D (the weight gradient) and 3-D x 3-D, (M, N) for 3-D x 2-D, with the last
  dimension's stride padded to 16 bytes (TMA alignment; nothing else is allocated on the device);
- bfloat16 on sm90/sm100 takes the CUTLASS kernel (``bf16bf16_grouped_mm``); everything else, and
  every dtype on an A100 (sm80), takes ``_grouped_mm_fallback``: ``offs`` copied to the host, then
  one ``at::mm_out`` per group into slices of that output (no temporaries: cuBLAS reads the
  transposed expert weights in place). Newer builds with CUDA >= 13.3 send float16/bfloat16 on
  sm90-sm110 to cuBLASLt's grouped GEMM; the output is the same tensor. The few hundred bytes of
  per-group arguments the CUTLASS/cuBLASLt paths stage on the device are not modelled.

Backward (torch 2.13's ``tools/autograd/derivatives.yaml``, as installed in
``torchgen/packaged/autograd``): ``_grouped_mm`` saves ``self``, ``mat2`` and ``offs``, and its
gradients are ``_grouped_mm_mat2_backward`` and ``_grouped_mm_mat1_backward``. What those
dispatch, seen op by op with the installed torch on CPU (the same device-independent autograd
code runs on CUDA), in this order: ``_grouped_mm(grad.T, self, offs)`` (2-D x 2-D: the (G, N, K)
weight gradient), returned transposed, then ``_grouped_mm(grad, mat2.transpose(-2, -1), offs)``;
nothing else is allocated.

For a GPU below sm80 (T4, V100) transformers calls its own ``grouped_mm_fallback`` op instead
(a per-expert ``torch.mm`` loop into one output, saving input and weight; its backward fills
``zeros_like`` input and weight gradients): the same tensors, which the estimate takes from this
emulation as well.

``GroupedMm`` is that node on meta; its GEMMs are ``velora::grouped_mm``, whose meta kernel
makes CUDA's output tensor and which the op counter (timing/opcount.py) counts as a GEMM of
2·M·N·K FLOPs. Every dtype goes through it, bfloat16 included (this CPU build of torch makes its
meta output without CUDA's padded stride).
"""

from __future__ import annotations

import torch

# the element types _grouped_mm_validate_inputs accepts (GroupedMMUtils.h)
CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# TMA transfers: output strides of 1 or a multiple of 16 bytes (create_grouped_gemm_output_tensor)
ALIGNMENT_BYTES = 16


def output_layout(
    mat_a: torch.Tensor, mat_b: torch.Tensor, offs: torch.Tensor | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(size, stride) of the tensor ``create_grouped_gemm_output_tensor`` allocates on CUDA."""
    a_2d, b_2d = mat_a.dim() == 2, mat_b.dim() == 2
    if a_2d and b_2d:  # (M, total K) x (total K, N) -> one (M, N) per group
        size = (offs.shape[0], mat_a.shape[0], mat_b.shape[1])
    elif a_2d:  # (total M, K) x (G, K, N)
        size = (mat_a.shape[0], mat_b.shape[-1])
    elif b_2d:  # (G, M, K) x (K, total N)
        size = (mat_a.shape[1], mat_b.shape[1])
    else:  # (G, M, K) x (G, K, N): a bmm
        size = (mat_a.shape[0], mat_a.shape[1], mat_b.shape[-1])
    align = ALIGNMENT_BYTES // mat_a.element_size()
    padded = -(-size[-1] // align) * align
    stride = (padded, 1) if a_2d != b_2d else (size[1] * padded, padded, 1)
    return size, stride


@torch.library.custom_op("velora::grouped_mm", mutates_args=())
def grouped_mm(mat_a: torch.Tensor, mat_b: torch.Tensor, offs: torch.Tensor | None) -> torch.Tensor:
    """One grouped GEMM as CUDA's ``_grouped_mm`` computes it (one op, so that the tracker sees
    its output and the op counter its FLOPs). Off meta it is the real op."""
    return torch._grouped_mm(mat_a, mat_b, offs=offs)


@grouped_mm.register_fake
def _(mat_a, mat_b, offs):  # the meta (and fake-tensor) kernel: CUDA's output tensor
    size, stride = output_layout(mat_a, mat_b, offs)
    return mat_a.new_empty_strided(size, stride)


class GroupedMm(torch.autograd.Function):
    """``_grouped_mm`` with ``offs`` on meta: CUDA's output, its saved tensors and its backward."""

    @staticmethod
    def forward(ctx, mat_a, mat_b, offs):
        ctx.save_for_backward(mat_a, mat_b, offs)  # self, mat2, offs (derivatives.yaml)
        return grouped_mm(mat_a, mat_b, offs)

    @staticmethod
    def backward(ctx, grad):
        mat_a, mat_b, offs = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[1]:  # _grouped_mm_mat2_backward, computed first
            grad_b = grouped_mm(grad.transpose(-2, -1), mat_a, offs).transpose(-2, -1)
        if ctx.needs_input_grad[0]:  # _grouped_mm_mat1_backward
            grad_a = grouped_mm(grad, mat_b.transpose(-2, -1), offs)
        return grad_a, grad_b, None


def emulated_on_cuda(mat_a, mat_b, offs=None, bias=None, out_dtype=None) -> bool:
    """Whether this call is the MoE forward's grouped GEMM on meta that `GroupedMm` replays:
    2-D x 3-D with ``offs``, operands of one dtype CUDA accepts, no bias, output in that dtype.
    Other calls go to torch's own meta kernel (and its errors)."""
    tensors = (mat_a, mat_b, offs)
    return (
        all(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tensors)
        and mat_a.dim() == 2
        and mat_b.dim() == 3
        and mat_a.dtype in CUDA_DTYPES
        and mat_b.dtype == mat_a.dtype
        and offs.dtype == torch.int32
        and bias is None
        and out_dtype in (None, mat_a.dtype)
    )


def _grouped_mm_args(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    return mat_a, mat_b, offs, bias, out_dtype


def emulate(func, args: tuple, kwargs: dict):
    """One ``torch._grouped_mm`` call as CUDA runs it (see the module docstring)."""
    mat_a, mat_b, offs, bias, out_dtype = _grouped_mm_args(*args, **kwargs)
    if emulated_on_cuda(mat_a, mat_b, offs, bias, out_dtype):
        return GroupedMm.apply(mat_a, mat_b, offs)
    return func(*args, **kwargs)


# the torch functions this module emulates, each with its handler (emulation/step.py);
# F.grouped_mm (torch >= 2.10, a plain Python function) calls torch._grouped_mm, which is what
# the torch-function mode sees
EMULATES = {torch._grouped_mm: emulate}
