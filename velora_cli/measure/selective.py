"""Selective activation checkpointing (SAC): which op outputs a checkpointed layer keeps.

Plain checkpointing keeps only each layer's input and recomputes the whole layer in backward.
Selective checkpointing keeps the outputs of chosen ops too, so the recomputation skips them.
Built with PyTorch's own API (torch 2.13 ``torch/utils/checkpoint.py``): a policy function
``(ctx, op, *args, **kwargs) -> CheckpointPolicy`` turned into the ``context_fn`` of a
non-reentrant checkpoint by ``create_selective_checkpoint_contexts``. In eager mode an op whose
policy is MUST_SAVE/PREFER_SAVE has its *whole* output stored (detached, so the storage stays
alive) until the recomputation consumes it; every other policy recomputes.

Policies (`SAC_POLICIES`):

- ``op``: torchtitan's op-level policy (``torchtitan/distributed/activation_checkpoint.py``
  ``_apply_op_sac`` @cfb93265; list from ``torchtitan/models/llama3/infra/parallelize.py``
  @018740b7): save the outputs of the ops in `OP_SAVE_LIST` (matmuls, attention, ``max``), but
  only every other ``aten.mm`` (the 1st, 3rd, ... of each layer call: torchtitan counts mms per
  checkpoint call, separately in forward and recomputation, and recomputes the even-numbered
  ones). For a Llama block: q, v, gate and down projections saved, k, o and up recomputed, the
  attention output saved.
- ``attn``: recompute the attention block only. Inside the layer's attention module everything is
  recomputed; outside it every op of `OP_SAVE_LIST` (all matmuls: the MLP's projections) is
  saved, the cheap elementwise ops recomputed.
- ``mlp``: recompute the MLP only: the attention's projections and its output are saved.

The attention / MLP module is found by name in each checkpointed layer (`ATTENTION_NAMES`,
`MLP_NAMES`); forward hooks (entered again when the recomputation runs the layer) say whether an
op runs inside it. What a policy saves in a forward is reported to the active saved-tensor
counter (`accounting.note_saved`), so a row's ``activation_bytes`` includes it.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from velora_cli.measure.accounting import note_saved

SAC_POLICIES = ("op", "attn", "mlp")
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


def _ops(*names: str) -> set:
    """The aten overloads named ``pkg.op.overload`` that this torch has (absent ones skipped)."""
    found = set()
    for name in names:
        pkg, op, overload = name.split(".")
        packet = getattr(getattr(torch.ops, pkg), op, None)
        if packet is not None and hasattr(packet, overload):
            found.add(getattr(packet, overload))
    return found


_MM = torch.ops.aten.mm.default
# torchtitan's _op_sac_save_list (llama3/infra/parallelize.py @018740b7), as far as eager torch
# has the ops; plus the CPU flash kernel (the cpu backend's attention; TRL's SAC list has it too)
# and addmm for the per-layer-type policies (a Linear with bias lowers to addmm; not bmm: in
# SDPA's math path it makes the N x N scores, which no policy here means to keep).
OP_SAVE_LIST = _ops(
    "aten.mm.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
    "aten._scaled_dot_product_attention_math.default",
    "aten._scaled_dot_product_fused_attention_overrideable.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "_c10d_functional.reduce_scatter_tensor.default",
    "aten.max.default",
)
MATMULS = _ops("aten.addmm.default")


class SacError(ValueError):
    """A selective-checkpointing choice that cannot apply to this model."""


def _outputs(out: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


class _Region:
    """Whether the ops now running are inside one of the marked sub-modules."""

    def __init__(self) -> None:
        self.depth = 0

    def enter(self, module, args) -> None:
        self.depth += 1

    def leave(self, module, args, output) -> None:
        self.depth = max(0, self.depth - 1)


def op_policy() -> Callable:
    """torchtitan's ``op`` policy, fresh per checkpoint call (its mm counters start at 0)."""
    from torch.utils.checkpoint import CheckpointPolicy

    counts: dict[str, int] = defaultdict(int)

    def policy(ctx, func, *args, **kwargs):
        key = "recompute_mm_count" if ctx.is_recompute else "forward_mm_count"
        if func == _MM:
            counts[key] += 1
        # every 2nd mm is recomputed: "not (func == mm and count % 2 == 0)" (torchtitan)
        save = func in OP_SAVE_LIST and not (func == _MM and counts[key] % 2 == 0)
        if save and not ctx.is_recompute:
            note_saved(_outputs(ctx.op_output))
        return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def region_policy(region: _Region) -> Callable:
    """Recompute everything inside ``region``; outside it, save matmul/attention outputs."""
    from torch.utils.checkpoint import CheckpointPolicy

    def policy(ctx, func, *args, **kwargs):
        save = region.depth == 0 and (func in OP_SAVE_LIST or func in MATMULS)
        if save and not ctx.is_recompute:
            note_saved(_outputs(ctx.op_output))
        return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers transformers checkpoints (``GradientCheckpointingLayer``s)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _sub_module(layer: nn.Module, names: tuple[str, ...], what: str, kind: str) -> nn.Module:
    for name in names:
        child = getattr(layer, name, None)
        if isinstance(child, nn.Module):
            return child
    children = ", ".join(n for n, _ in layer.named_children())
    raise SacError(
        f"--sac {kind}: {type(layer).__name__} has no {what} sub-module named "
        f"{'/'.join(names)} (it has {children})"
    )


def sac_context_fn(
    model: nn.Module, kind: str, recompute_context: Callable | None = None
) -> Callable[[], tuple]:
    """The ``context_fn`` of a non-reentrant checkpoint applying the SAC policy ``kind``.

    Registers forward hooks on each layer's attention (``attn``) or MLP (``mlp``) module; they
    are listed on ``model._velora_sac_handles`` for `remove_sac`.

    Args:
        recompute_context: zero-argument callable returning a context entered around each
            recomputation as well (the estimate's CUDA emulation), beneath the SAC mode.

    Raises:
        SacError: an unknown ``kind``, or no attention/MLP module in a layer.
    """
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    if kind not in SAC_POLICIES:
        raise SacError(f"--sac {kind!r}: choose {', '.join(SAC_POLICIES)}")
    region = _Region()
    if kind != "op":
        names, what = (ATTENTION_NAMES, "attention") if kind == "attn" else (MLP_NAMES, "MLP")
        layers = checkpointed_layers(model)
        if not layers:
            raise SacError(f"--sac {kind}: {type(model).__name__} has no checkpointable layers")
        handles = []
        for layer in layers:
            sub = _sub_module(layer, names, what, kind)
            handles.append(sub.register_forward_pre_hook(region.enter))
            handles.append(sub.register_forward_hook(region.leave, always_call=True))
        model._velora_sac_handles = handles

    def context_fn():  # noqa: D401 - the checkpoint's context_fn
        region.depth = 0
        policy = op_policy() if kind == "op" else region_policy(region)
        forward, recompute = create_selective_checkpoint_contexts(policy)
        if recompute_context is None:
            return forward, recompute

        @contextlib.contextmanager
        def both():
            with recompute_context(), recompute:
                yield

        return forward, both()

    context_fn.velora_sac = kind  # what a run set up, for the plan check (runs/plan_check.py)
    return context_fn


def remove_sac(model: nn.Module) -> None:
    """Remove the hooks `sac_context_fn` registered (checkpointing itself is undone apart)."""
    for handle in getattr(model, "_velora_sac_handles", ()):
        handle.remove()
    if hasattr(model, "_velora_sac_handles"):
        del model._velora_sac_handles
