"""The optimizers people pick, named as the HF Trainer names them (``TrainingArguments.optim``).

What each one allocates on a GPU (state created at the first ``step()``; temporaries during it):

    name                 implementation                       state per param       step temporaries
    adamw, adamw_torch   torch.optim.AdamW(foreach=True)      2 × param dtype       one sqrt per param
                                                                                    of the group, alive
                                                                                    together
    adamw_torch_fused    torch.optim.AdamW(fused=True)        2 × param dtype       none
                                                              + fp32 step on device
    adamw_torch_forloop  torch.optim.AdamW(foreach=False)     2 × param dtype       sqrt + denom of one
                                                                                    param at a time
    adamw_bnb_8bit       bitsandbytes AdamW(optim_bits=8)     2 B + 8/256 B         none (one fused kernel
    (= adamw_8bit)       (params < 4096 values: 8 B fp32)     + 2 KiB qmaps         per param)
    paged_adamw_8bit     as above, is_paged=True              the 2 B/param of params ≥ 1e5 values in
    paged_adamw_32bit    bitsandbytes AdamW(optim_bits=32,    cudaMallocManaged pages (see below)
                         is_paged=True): 8 B fp32
    adafactor            transformers Adafactor(scale_parameter=False, relative_step=False), as the
                         Trainer builds it: fp32 row + column second moments (factored, ndim ≥ 2),
                         full fp32 for 1-D params, no first moment; one param at a time, its fp32
                         temporaries (grad, param, update, its square) ≈ 16 B × numel for bf16
    sgd                  torch.optim.SGD(momentum=0.9, foreach=True) (velora's; the Trainer's ``sgd``
                         has no momentum)
    galore, adarankgrad  velora_cli.methods.lowrank

Sources: torch 2.13 ``torch/optim/adam.py`` (``_multi_tensor_adam``'s ``_foreach_sqrt``,
``_single_tensor_adam``'s ``denom``, ``_fused_adam``); bitsandbytes 0.50.2 ``optim/optimizer.py``
(``Optimizer2State.init_state``: uint8 state1/state2, fp32 absmax per 256 values, fp32 state when
``optim_bits=32`` or numel < ``min_8bit_size`` = 4096; ``get_state_buffer``: paged when numel ≥ 1e5);
transformers 5.25 ``trainer_optimizer.py`` (the name -> optimizer mapping) and
``optimization.py::Adafactor``. /work/notes/kernels.md section B has the line-by-line reading.

``adamw`` is velora's name from before these existed and stays what it was (foreach, CUDA's
default for ``torch.optim.AdamW()``), so documents made with it do not change. The HF Trainer's
default in transformers 5 (torch >= 2.8) is ``adamw_torch_fused``.

Paged state: bitsandbytes allocates the state of every param of ≥ 1e5 values with
``cudaMallocManaged`` (``F.get_paged``), wrapped as a CPU-device tensor. The CUDA caching
allocator never sees it: ``torch.cuda.max_memory_allocated/reserved`` leave it out. While the pages
are resident on the GPU (bitsandbytes prefetches them before each update; they move back to the
host only under memory pressure), NVML's device "used" counts them. So velora predicts the
allocator's figures without them and the device figure with them (``paged_optimizer_bytes``): the
safe side for "does it fit", the allocator counters as torch will report them.

On meta tensors (the estimate) fused AdamW and the bitsandbytes optimizers are replaced by
stand-ins that create exactly their state tensors and allocate no temporaries (their CUDA kernels
update in place); paged state is counted, not allocated.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# bitsandbytes 0.50.2 optim/optimizer.py
BNB_MIN_8BIT_SIZE = 4096  # Optimizer2State(min_8bit_size=4096): smaller params keep fp32 state
BNB_BLOCKSIZE = 256  # init_state: blocksize = 256 (absmax1/absmax2, one fp32 per block)
BNB_PAGED_MIN_NUMEL = 100_000  # get_state_buffer: `not self.is_paged or p.numel() < 1e5`
BNB_QMAP_VALUES = 256  # fill_qmap: create_dynamic_map() -> fp32 (256,), shared per optimizer


from velora_cli.methods.optimizer_names import (  # noqa: E402
    LOWRANK,
    NEEDS_BITSANDBYTES,
    OPTIMIZER_INFO,
    OPTIMIZER_NAMES,
    PAGED,
    TRAINER_DEFAULT,
    OptimizerError,
    OptimizerInfo,
    optimizer_info,
)

__all__ = [
    "LOWRANK", "NEEDS_BITSANDBYTES", "OPTIMIZER_INFO", "OPTIMIZER_NAMES", "PAGED",
    "TRAINER_DEFAULT", "OptimizerError", "OptimizerInfo", "optimizer_info", "make", "paged_bytes",
]  # fmt: skip


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as exc:
        raise OptimizerError(
            "bitsandbytes optimizers need bitsandbytes: pip install bitsandbytes"
        ) from exc
    return bitsandbytes


def make(name: str, params: list[torch.nn.Parameter], *, lr: float) -> torch.optim.Optimizer:
    """The optimizer ``name`` (not a low-rank one) over ``params``.

    On meta parameters (the estimate), fused AdamW and bitsandbytes' optimizers are the stand-ins
    below; everything else is the real optimizer, whose step runs on meta as on a GPU.

    Raises:
        OptimizerError: an unknown or low-rank name, or bitsandbytes missing on a real device.
    """
    info = optimizer_info(name)
    meta = bool(params) and _without_memory(params[0])
    if info.family == "adamw":
        if info.impl == "fused":
            if meta:
                return MetaFusedAdamW(params, lr=lr)
            return torch.optim.AdamW(params, lr=lr, fused=True)
        return torch.optim.AdamW(params, lr=lr, foreach=info.impl == "foreach")
    if info.family == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=True)
    if info.family == "adafactor":
        from transformers.optimization import Adafactor

        # what the Trainer builds for optim="adafactor" (trainer_optimizer.py)
        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False)
    if info.family == "bnb":
        if meta:
            return MetaBnbAdamW(params, lr=lr, optim_bits=info.bits, is_paged=info.paged)
        bnb = _bitsandbytes()
        return bnb.optim.AdamW(params, lr=lr, optim_bits=info.bits, is_paged=info.paged)
    raise OptimizerError(f"{name} is built by velora_cli.methods.lowrank")


def _without_memory(p: torch.Tensor) -> bool:
    """A meta tensor (the estimate) or a fake one (a fake rank of the per-rank estimate): the
    stand-ins' case. bitsandbytes' real step reads a scalar back from the device, which a fake
    tensor cannot give (``aten._local_scalar_dense``)."""
    if p.device.type == "meta":
        return True
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(p)


def paged_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state in cudaMallocManaged pages (bitsandbytes' paged optimizers):
    outside the caching allocator's counters, inside NVML's device memory. 0 for the others."""
    if isinstance(optimizer, MetaBnbAdamW):
        return optimizer.paged_state_bytes
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and getattr(value, "is_paged", False):
                total += value.untyped_storage().nbytes()
    return total


class MetaFusedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW(fused=True)`` on meta parameters, which torch refuses to build.

    The state is what ``Adam._init_group`` creates for fused (exp_avg, exp_avg_sq like the param,
    ``step`` an fp32 0-d tensor on the param's device) and the step is ``torch._fused_adamw_``
    itself (its meta kernel allocates nothing: the CUDA kernel updates in place).
    """

    def __init__(self, params, *, lr: float):
        super().__init__(params, lr=lr, foreach=False)
        for group in self.param_groups:
            group["fused"] = True  # _init_group then puts `step` on the device, as fused does

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            torch._foreach_add_(steps, 1)  # _fused_adam's only op besides the kernel
            beta1, beta2 = group["betas"]
            torch._fused_adamw_(
                params, grads, exp_avgs, exp_avg_sqs, [], steps,
                lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                eps=group["eps"], amsgrad=False, maximize=False,
            )  # fmt: skip


class MetaBnbAdamW(torch.optim.Optimizer):
    """bitsandbytes ``AdamW(optim_bits, is_paged)`` on meta parameters (no bitsandbytes needed).

    State per param, created at the first step as ``Optimizer2State.init_state`` creates it:
    8-bit (numel ≥ 4096): ``state1``/``state2`` uint8 like the param, ``absmax1``/``absmax2`` fp32
    (ceil(numel/256),), ``qmap1``/``qmap2`` the optimizer's two shared fp32 (256,) maps; otherwise
    ``state1``/``state2`` fp32 like the param. Paged (``is_paged``, numel ≥ 1e5): state1/state2 are
    managed memory, counted in ``paged_state_bytes`` and not allocated. The update is one fused
    kernel per param writing in place: no temporaries (stood in for by in-place ops that move
    the same bytes, so the step-time roofline counts them).
    """

    def __init__(self, params, *, lr: float, optim_bits: int, is_paged: bool):
        super().__init__(params, {"lr": lr})
        self.optim_bits = optim_bits
        self.is_paged = is_paged
        self.paged_state_bytes = 0
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _state_buffer(self, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        if self.is_paged and p.numel() >= BNB_PAGED_MIN_NUMEL:
            self.paged_state_bytes += p.numel() * dtype.itemsize
            return None  # cudaMallocManaged: not a caching-allocator tensor
        return torch.zeros_like(p, dtype=dtype)

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state: dict[str, Any] = {"step": 0}
        eight_bit = self.optim_bits == 8 and p.numel() >= BNB_MIN_8BIT_SIZE
        dtype = torch.uint8 if eight_bit else torch.float32
        for key in ("state1", "state2"):
            buffer = self._state_buffer(p, dtype)
            if buffer is not None:
                state[key] = buffer
        if eight_bit:
            if p.device not in self._qmaps:
                self._qmaps[p.device] = tuple(
                    torch.zeros(BNB_QMAP_VALUES, dtype=torch.float32, device=p.device)
                    for _ in range(2)
                )
            state["qmap1"], state["qmap2"] = self._qmaps[p.device]
            blocks = math.ceil(p.numel() / BNB_BLOCKSIZE)
            state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
            state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not self.state[p]:
                    self.state[p] = self._init_state(p)
                state = self.state[p]
                state["step"] += 1
                # the kernel reads the gradient and rewrites the weight and the (non-paged)
                # moments in place: in-place ops with the same traffic, for the roofline's
                # byte count; they allocate nothing
                p.add_(p.grad)
                for key in ("state1", "state2"):
                    if key in state:
                        state[key].mul_(1)
