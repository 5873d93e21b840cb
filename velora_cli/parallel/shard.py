"""Wrap a prepared model as every rank does, with the engines themselves (torch 2.13):

- ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` with its defaults (25 MB buckets,
  ``gradient_as_bucket_view=False``: the buckets are a second copy of the gradients, as under
  the HF Trainer and accelerate, whose defaults these are);
- ``fsdp`` / ``fsdp-no-reshard``: FSDP2 ``fully_shard`` on every decoder layer (the classes in
  the model's ``_no_split_modules``, what accelerate's transformer auto-wrap uses), then on the
  root, with ``reshard_after_forward`` True / False, and ``CPUOffloadPolicy`` with
  ``--cpu-offload``.

Order (also what ``velora export-config --format torchrun`` writes): build the model, apply
VeLoRA (``velora_cli.apply_config``) and checkpointing, then shard, then build the optimizer over
the sharded parameters. VeLoRA swaps ``nn.Linear`` modules for subclasses that reuse their
parameters; sharding first would hand FSDP2 modules that are then replaced under it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from velora_cli.measure.train_step import Prepared, SpecError, build_optimizer


def decoder_layer_classes(model: nn.Module) -> set[str]:
    """Class names of the blocks to shard one by one: the model's ``_no_split_modules``.

    Raises:
        SpecError: the model names none (FSDP would then shard it as one block).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    found = {type(m).__name__ for m in base.modules()} & names
    if not found:
        raise SpecError(
            f"{type(base).__name__} names no decoder layer class (_no_split_modules): FSDP "
            "needs one fully_shard unit per layer; use --parallel ddp"
        )
    return found


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers, in module order."""
    classes = decoder_layer_classes(model)
    return [m for m in model.modules() if type(m).__name__ in classes]


def shard(model: nn.Module, parallel: str, *, cpu_offload: bool = False, device=None) -> nn.Module:
    """Wrap ``model`` for ``parallel`` on the default process group.

    Args:
        model: the model with VeLoRA and checkpointing already applied.
        parallel: ``ddp``, ``fsdp`` or ``fsdp-no-reshard``.
        cpu_offload: FSDP2 ``CPUOffloadPolicy`` (pinned host memory on CUDA).
        device: the rank's device (``cuda:k`` for DDP's ``device_ids``); None: the CPU.

    Returns:
        The DDP wrapper, or ``model`` itself (``fully_shard`` works in place).
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    device = torch.device(device or "cpu")
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    world = torch.distributed.get_world_size()
    with unset_fake_temporarily():  # the mesh reads its rank tensor (no-op outside the estimate)
        mesh = init_device_mesh(device.type, (world,))
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    options: dict[str, Any] = {
        "mesh": mesh,
        "reshard_after_forward": parallel == "fsdp",
        "offload_policy": offload,
    }
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def shard_prepared(prepared: Prepared, *, device=None) -> None:
    """Shard ``prepared.model`` for its spec and rebuild the optimizer over the new parameters
    (DTensor shards under FSDP2), with the settings `prepare` used. Under DDP the optimizer is
    built over the wrapped module (the same parameters): GaLore/AdaRankGrad read its config and
    tell its embeddings apart."""
    spec = prepared.spec
    prepared.model = shard(
        prepared.model, spec.parallel, cpu_offload=spec.cpu_offload, device=device
    )
    prepared.optimizer = build_optimizer(
        spec.optimizer,
        getattr(prepared.model, "module", prepared.model),
        lr=1e-5,
        rank=spec.rank,
        update_gap=spec.update_gap,
        eta=spec.eta,
        seed=spec.seed,
    )
