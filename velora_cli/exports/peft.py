"""The PEFT export: ``peft.LoraConfig`` keyword arguments, with its ``velora_config`` (PEFT ≥ 0.20
ships VeLoRA for LoRA's A projection), when the recommendation can be said that way;
`peft_blockers` says why not otherwise."""

from __future__ import annotations

from typing import Any

from velora_cli.configs import LORA_MODES, ConfigError, VeloraConfig


def peft_blockers(config: VeloraConfig) -> list[str]:
    """Why ``config`` cannot be written as a ``peft.LoraConfig``; empty when it can.

    PEFT's VeLoRA compresses the input of LoRA's A projection of every LoRA target, with one
    num_groups; it has no full fine-tuning and no checkpointing (a Trainer/model setting).
    """
    why = []
    if config.mode not in LORA_MODES:
        why.append(
            f"mode {config.mode}: PEFT's VeLoRA only compresses LoRA's A input (full fine-tuning "
            "is not a PEFT config)"
        )
    if config.gc is not False:
        why.append("gradient checkpointing is not a LoraConfig option (see --format trainer)")
    if config.mode == "qlora" and config.uses_velora:
        why.append(
            "PEFT's VeLoRA refuses bitsandbytes 4-bit layers (peft lora.bnb.Linear4bit); "
            "apply_config applies it to the peft model instead"
        )
    if config.mode in LORA_MODES and config.uses_velora:
        sizes = {e["in_features"] // e["sub_token_size"] for e in (config.layers or {}).values()}
        if config.layers and len(sizes) > 1:
            why.append(f"layers use different numbers of groups {sorted(sizes)}; PEFT takes one")
        wrapped = len(config.layers) if config.layers else None
        if wrapped is None or config.lora_layers is None:
            why.append(
                f"the config does not record whether placement {config.placement!r} covers "
                "every LoRA layer, as PEFT's VeLoRA would (export the config from a tune)"
            )
        elif wrapped != config.lora_layers:
            why.append(
                f"placement {config.placement!r} compresses {wrapped} of the "
                f"{config.lora_layers} LoRA layers; PEFT applies VeLoRA to every LoRA target "
                "(tune with --placements all-linear for a PEFT-expressible result)"
            )
    return why


def to_peft(config: VeloraConfig) -> dict[str, Any]:
    """Keyword arguments for ``peft.LoraConfig(**d)``, with ``velora_config`` when VeLoRA is used.

    The LoRA settings are those the tune measured (rank r, alpha 2r, no dropout, its targets).

    Raises:
        ConfigError: the config is not expressible in PEFT (`peft_blockers` says why).
    """
    why = peft_blockers(config)
    if why:
        raise ConfigError("not expressible as a peft.LoraConfig: " + "; ".join(why))
    targets: str | list[str] = config.lora_targets or "all-linear"
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    d: dict[str, Any] = {
        "r": config.lora_rank,
        "lora_alpha": 2 * config.lora_rank,
        "lora_dropout": 0.0,
        "target_modules": targets,
    }
    if config.uses_velora:
        groups = config.num_groups
        if config.layers:
            groups = next(e["in_features"] // e["sub_token_size"] for e in config.layers.values())
        d["velora_config"] = {"num_groups": groups, "scale": 1.0, "init_type": config.init}
    return d
