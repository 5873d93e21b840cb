"""What the estimate emulates of a CUDA step on meta tensors, entered as one context.

Meta tensors run ATen's CPU-like composite paths where a GPU would dispatch on the device, so
the estimate wraps each step, and each gradient checkpoint's recomputation (where the step's
torch-function modes are no longer active), in:

- ``MetaMathAttention`` (math_attention.py): SDPA's math path as CUDA runs it (fused dropout of
  the probabilities, in-place mask add);
- ``MetaCudaDropout`` (dropout.py): ``native_dropout``'s bool mask instead of a noise tensor;
- ``MetaFusedRmsNorm`` (rms_norm.py): ``_fused_rms_norm``'s saved input and rstd;
- ``MetaHalfToFloatSoftmax`` (softmax.py): fp16 -> fp32 softmax without an fp32 copy of the input;
- ``GroupedMm`` (grouped_mm.py): ``torch._grouped_mm`` (MoE experts) as CUDA runs it, fp16 and
  fp32 included, where torch's meta kernel takes bf16 only;
- ``MetaSoftmaxSavesInput`` (softmax.py), for a run on torch < 1.11: softmax's input kept for
  backward, as those releases saved it;
- ``MetaAutocast`` (amp.py), with ``--amp``: CUDA autocast's cast policy.

Autocast is entered last, so it is the first to see a call and casts its arguments before the
other modes see them, as CUDA autocast casts before the kernel is chosen.

The first five emulate disjoint sets of torch functions, each of which calls nothing the others
emulate, so they run as one mode (`MetaCudaKernels`: one handler lookup per torch call instead of
stacked modes, each called for every torch function of the step); each module's own mode stays
for use alone (grouped_mm.py has none: its handler is only used here).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from torch.overrides import TorchFunctionMode


@functools.cache
def _handlers() -> dict:
    from velora_cli.emulation import dropout, grouped_mm, math_attention, rms_norm, softmax

    handlers: dict = {}
    for module in (math_attention, dropout, rms_norm, softmax, grouped_mm):
        assert not handlers.keys() & module.EMULATES.keys()  # disjoint, so one mode does
        handlers.update(module.EMULATES)
    return handlers


class MetaCudaKernels(TorchFunctionMode):
    """``MetaMathAttention``, ``MetaCudaDropout``, ``MetaFusedRmsNorm``,
    ``MetaHalfToFloatSoftmax`` and ``GroupedMm`` as one mode: each call goes to the handler of
    the module that emulates its function (their ``EMULATES`` tables), every other call runs as
    it is.

    Example:
        >>> with MetaCudaKernels():
        ...     y = F.dropout(x, 0.1, training=True)  # a meta x: native_dropout's bool mask
    """

    def __init__(self) -> None:
        super().__init__()
        self.handlers = _handlers()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        handler = self.handlers.get(func)
        if handler is None:
            return func(*args, **(kwargs or {}))
        return handler(func, args, kwargs or {})


@contextlib.contextmanager
def cuda_emulation(amp: str | None = None, torch_version: str | None = None) -> Iterator[None]:
    """Run the enclosed meta-tensor code as a CUDA device would (see the module docstring).

    Args:
        amp: ``"bf16"`` or ``"fp16"`` to emulate autocast too; None without mixed precision.
        torch_version: the torch release of the run (StepSpec.torch_version); None: the
            installed one's behaviour.

    Example:
        >>> with cuda_emulation("bf16"):
        ...     loss = model(**batch).loss  # a meta model
    """
    from velora_cli.emulation.amp import MetaAutocast
    from velora_cli.emulation.softmax import MetaSoftmaxSavesInput, softmax_saves_input

    modes: list = [MetaCudaKernels()]
    if softmax_saves_input(torch_version):
        modes.append(MetaSoftmaxSavesInput())  # after autocast's casts, before the kernel
    if amp:
        modes.append(MetaAutocast(amp))  # last: the innermost mode sees each call first
    with contextlib.ExitStack() as stack:
        for mode in modes:
            stack.enter_context(mode)
        yield
