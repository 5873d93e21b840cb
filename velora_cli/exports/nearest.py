"""The velora command that measures a configuration an export can state, when the measured one
could not be stated: a `velora tune` restricted to that configuration's mode, micro-batch,
placement and sub-token choice, whose recommendation then exports as asked."""

from __future__ import annotations

import shlex

from velora_cli.configs import LORA_MODES, VeloraConfig


def tune_command(config: VeloraConfig, then: str | None = None) -> str:
    """``velora tune ...`` measuring ``config`` (same model, shapes, precision, budget, backend).

    Args:
        config: the configuration to measure (placement None: no VeLoRA, ``--placements none``).
        then: the format to export afterwards (``... && velora export-config --format peft``).

    Returns:
        One shell command line.
    """
    micro, accum = config.micro_batch_size, config.grad_accum_steps
    parts = ["velora", "tune", shlex.quote(config.model)]
    if config.budget_bytes:
        parts += ["--budget", _budget(config.budget_bytes)]
    if config.backend:
        parts += ["--backend", config.backend]
    parts += ["--batch-size", str(micro * accum), "--micro-batches", str(micro)]
    if config.seq_len:
        parts += ["--seq-len", str(config.seq_len)]
    parts += ["--dtype", config.dtype]
    if config.amp:
        parts += ["--amp", config.amp]
    parts += ["--mode", config.mode, "--optimizer", config.optimizer]
    if config.mode in LORA_MODES:
        parts += ["--lora-rank", str(config.lora_rank)]
        parts += ["--lora-targets", shlex.quote(config.lora_targets or "all-linear")]
    parts += ["--placements", config.placement or "none"]
    if config.placement:
        parts += ["--num-groups", str(config.num_groups or 32)]
    if config.gc_every not in (None, 1):  # none and every layer are always tried
        parts += ["--gc-every", str(config.gc_every)]
    if config.init != "batch_average_once":
        parts += ["--init", config.init]
    if config.trainer != "hf":
        parts += ["--trainer", config.trainer]
    command = " ".join(parts)
    if then:
        command += f" && velora export-config --format {then}"
    return command


def _budget(nbytes: int) -> str:
    """A ``--budget`` spelling that reads back to exactly ``nbytes``."""
    for unit, size in (("GiB", 2**30), ("GB", 10**9), ("MiB", 2**20), ("MB", 10**6)):
        if nbytes % size == 0:
            return f"{nbytes // size}{unit}"
    return f"{nbytes}B"
