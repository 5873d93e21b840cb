"""The accelerate export: a config file for ``accelerate launch --config_file`` (accelerate ≥ 1.x,
keys of its ``ClusterConfig`` and ``fsdp_config``), FSDP2 (``fsdp_version: 2``) or DDP
(``MULTI_GPU``), with what it leaves to the training script said in comments and notes.

What maps where:

- ``parallel`` fsdp / fsdp-no-reshard -> ``distributed_type: FSDP``, ``fsdp_version: 2``,
  ``fsdp_reshard_after_forward`` True / False, transformer auto-wrap of the decoder layer
  classes (``model._no_split_modules``, which velora sharded one by one);
  ddp -> ``distributed_type: MULTI_GPU``.
- ``world_size`` -> ``num_processes`` (one machine).
- checkpointing of every layer -> ``fsdp_activation_checkpointing: true`` (accelerate wraps each
  decoder layer in a non-reentrant checkpoint before sharding: the saved tensors velora
  measured with transformers' own checkpointing). Every n-th layer is no accelerate option:
  the script enables it on the model (`apply_config`).
- ``cpu_offload`` -> ``fsdp_offload_params: true`` (FSDP2's CPUOffloadPolicy).
- precision: velora's ``--dtype bf16`` trains bf16 weights and optimizer state; under FSDP2
  accelerate's ``mixed_precision: bf16`` would upcast the weights to fp32 masters
  (``fsdp2_prepare_model``), so the config says ``mixed_precision: 'no'`` and the script loads
  the model in bf16. ``--amp bf16`` (fp32 masters + bf16 compute) is ``mixed_precision: bf16``.

VeLoRA is no accelerate option: ``velora_cli.apply_config(model, config)`` in the script, before
``accelerator.prepare(model)`` shards it (VeLoRA swaps modules FSDP2 would otherwise hold).
"""

from __future__ import annotations

from typing import Any

from velora_cli.configs import VeloraConfig
from velora_cli.exports.recipe import (
    attn_implementation,
    auto_class,
    head_kwargs,
    trainer_optim,
)


def accelerate_blockers(config: VeloraConfig) -> list[str]:
    """Why ``config`` makes no accelerate launch config (empty when it does)."""
    if config.parallel is None:
        return [
            "the configuration runs in one process (world size 1): there is nothing to launch "
            "(tune with --world-size N for a multi-GPU configuration)"
        ]
    return []


def to_accelerate(config: VeloraConfig) -> dict[str, Any]:
    """The ``accelerate launch --config_file`` settings for ``config`` (a YAML mapping)."""
    d: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "distributed_type": "FSDP" if config.parallel.startswith("fsdp") else "MULTI_GPU",
        "downcast_bf16": "no",
        "machine_rank": 0,
        "main_training_function": "main",
        "mixed_precision": config.amp or "no",
        "num_machines": 1,
        "num_processes": config.world_size,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
    if d["distributed_type"] == "FSDP":
        fsdp: dict[str, Any] = {
            "fsdp_version": 2,
            "fsdp_reshard_after_forward": config.parallel == "fsdp",
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_offload_params": config.cpu_offload,
            "fsdp_activation_checkpointing": config.gc is True and not config.gc_reentrant,
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        }
        if config.layer_classes:
            fsdp["fsdp_transformer_layer_cls_to_wrap"] = ",".join(config.layer_classes)
        d["fsdp_config"] = fsdp
    return d


def accelerate_notes(config: VeloraConfig) -> list[str]:
    """What the accelerate config leaves to the training script, one line each."""
    notes = [
        f"per-device batch: micro-batch {config.micro_batch_size} × "
        f"{config.grad_accum_steps} accumulation steps per rank (global batch "
        f"{config.world_size * config.micro_batch_size * config.grad_accum_steps} sequences "
        "per optimizer step); set them in your script or TrainingArguments"
    ]
    if config.uses_velora:
        notes.append(
            "VeLoRA: call velora_cli.apply_config(model, 'velora-config.json', "
            f"checkpointing={config.gc_every not in (None, 1)}) before accelerator.prepare(model)"
            " (export it with velora export-config --format velora -o velora-config.json)"
        )
    if config.gc_every not in (None, 1):
        notes.append(
            f"checkpointing every {config.gc_every} layers is no accelerate option: "
            "apply_config enables it on the model (fsdp_activation_checkpointing stays off)"
        )
    if config.dtype != "fp32" and config.amp is None:
        notes.append(
            f"pure {config.dtype}: load the model with dtype=torch.{_torch_dtype(config.dtype)} "
            "(mixed_precision 'no': accelerate's bf16 would upcast FSDP2 weights to fp32 masters)"
        )
    if config.parallel.startswith("fsdp"):
        notes.append(
            "accelerate also shards the input embedding and [final norm, lm_head] as units of "
            "their own; velora measured them in the root unit (all-gathered for the whole "
            "forward and again from the start of backward), so accelerate's peak can only be "
            "lower, by up to their unsharded size"
        )
    if config.mode == "lora":
        notes.append("LoRA: wrap the model with peft.get_peft_model before apply_config")
    if config.optimizer == "adarankgrad":
        notes.append("adarankgrad: build it with velora_cli.make_optimizer after prepare(model)")
    elif trainer_optim(config):
        notes.append(
            f"optimizer: TrainingArguments(optim={trainer_optim(config)!r}), or "
            "velora_cli.make_optimizer(model, config, lr=...) after prepare(model)"
        )
    notes.append(
        f"load the model with {auto_class(config)}.from_pretrained(..., {head_kwargs(config)}"
        f"attn_implementation={attn_implementation(config)!r}) (the head as planned)"
    )
    if config.gc_reentrant and config.gc:
        notes.append(
            "reentrant checkpointing was planned; fsdp_activation_checkpointing wraps layers "
            "non-reentrantly: enable it with gradient_checkpointing_kwargs={'use_reentrant': "
            "True} (TrainingArguments) instead"
        )
    return notes


def _torch_dtype(name: str) -> str:
    return {"bf16": "bfloat16", "fp16": "float16"}.get(name, "float32")


def to_yaml(config: VeloraConfig) -> str:
    """The config file's text: a comment header, then the YAML accelerate reads."""
    import yaml  # PyYAML: a dependency of transformers and accelerate

    from velora_cli.budget import format_bytes

    peak = f"{format_bytes(config.peak_bytes)} ({config.backend})" if config.peak_bytes else "?"
    header = [
        f"# accelerate launch config written by velora export-config for {config.model}",
        f"# {config.parallel} on {config.world_size} GPUs; tuned peak per rank: {peak}",
        "# launch: accelerate launch --config_file accelerate.yaml train.py",
    ]
    header += [f"# note: {line}" for line in accelerate_notes(config)]
    body = yaml.safe_dump(to_accelerate(config), sort_keys=False)
    return "\n".join(header) + "\n" + body
