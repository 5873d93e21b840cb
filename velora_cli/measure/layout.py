"""The parallel layout of one step: world size, DDP or FSDP2, CPU offload; names and checks only.

`StepSpec` validates its layout here, so the step (this package) needs nothing from the engines
above it (`velora_cli.parallel`, which re-exports these names and does the sharding).
"""

from __future__ import annotations

from typing import Any

from velora_cli.methods.optimizer_names import NEEDS_BITSANDBYTES  # names only: nothing heavy

# ddp: torch.nn.parallel.DistributedDataParallel (replicated states, gradient all-reduce);
# fsdp: FSDP2 fully_shard per decoder layer + root, reshard_after_forward=True (ZeRO-3 like);
# fsdp-no-reshard: the same with reshard_after_forward=False (parameters stay unsharded from
# forward to backward: ZeRO-2 like).
PARALLEL = ("ddp", "fsdp", "fsdp-no-reshard")
FSDP = ("fsdp", "fsdp-no-reshard")
# optimizers whose step fails on FSDP2's DTensor parameters and gradients, and why (each name's
# message says it):
# - transformers 5.25 Adafactor.step (optimization.py) makes its factored row/column state with
#   torch.zeros from the gradient's shape, plain tensors, then adds the DTensor gradient's means
#   into them; the real FSDP2 ranks of `--backend cpu` raise there too. Factored moments would
#   need a reduction per parameter across the shards (pytorch/pytorch#109581).
# - bitsandbytes' optimizers (0.50.2, optim/optimizer.py): `get_state_buffer` makes the state with
#   zeros_like(p), a DTensor, and `update_step` hands the DTensor parameter and gradient to the
#   CUDA kernel, which reads them as plain buffers: illegal memory access under FSDP2
#   (bitsandbytes-foundation/bitsandbytes#1633, open; #89 for FSDP1).
_ADAFACTOR_UNDER_FSDP = (
    "transformers' Adafactor keeps its factored state as plain tensors and FSDP2's gradients are "
    "DTensors (Adafactor.step raises 'got mixed torch.Tensor and DTensor'; pytorch/pytorch#109581)"
)
_BNB_UNDER_FSDP = (
    "bitsandbytes' optimizer kernels take FSDP2's DTensor parameters as plain buffers (an "
    "illegal memory access; bitsandbytes-foundation/bitsandbytes#1633)"
)
FSDP_INCOMPATIBLE_OPTIMIZERS = {
    "adafactor": _ADAFACTOR_UNDER_FSDP,
    **dict.fromkeys(NEEDS_BITSANDBYTES, _BNB_UNDER_FSDP),
}


def layout_errors(spec: Any) -> list[str]:
    """What is wrong with a step's ``world_size``/``parallel``/``cpu_offload`` (empty if fine).

    Args:
        spec: a `StepSpec` (read by attribute: this module imports nothing heavy).

    Returns:
        One message per problem, each saying what to do.
    """
    errors = []
    world, parallel = spec.world_size, spec.parallel
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        errors.append(f"--world-size must be an integer >= 1, got {world!r}")
        return errors
    if parallel is None:
        if world > 1:
            errors.append(f"--world-size {world} needs --parallel {'|'.join(PARALLEL)}")
        if spec.cpu_offload:
            errors.append("--cpu-offload is FSDP2's CPUOffloadPolicy: add --parallel fsdp")
        return errors
    if parallel not in PARALLEL:
        errors.append(f"--parallel {parallel!r}: choose {'|'.join(PARALLEL)}")
        return errors
    if spec.cpu_offload and parallel not in FSDP:
        errors.append(
            "--cpu-offload is FSDP2's CPUOffloadPolicy (sharded parameters, gradients and "
            "optimizer state in host memory): use it with --parallel fsdp or fsdp-no-reshard"
        )
    if parallel in FSDP and spec.optimizer in ("galore", "adarankgrad"):
        errors.append(
            f"--optimizer {spec.optimizer} projects whole weight gradients, and under FSDP each "
            "rank holds a shard of them: use --parallel ddp, or --optimizer adamw|sgd"
        )
    if parallel in FSDP and spec.optimizer in FSDP_INCOMPATIBLE_OPTIMIZERS:
        errors.append(
            f"--optimizer {spec.optimizer} does not run under FSDP2: "
            f"{FSDP_INCOMPATIBLE_OPTIMIZERS[spec.optimizer]}: use --parallel ddp, or --optimizer "
            "adamw"
        )
    if spec.amp is not None:
        errors.append(
            "--amp with --parallel is not supported yet (FSDP2 would use a "
            "MixedPrecisionPolicy, not autocast): use --dtype bf16, or --world-size 1"
        )
    if spec.mode == "qlora":
        errors.append(
            "--mode qlora with --parallel is not supported (bitsandbytes 4-bit weights are not "
            "sharded by FSDP2 here): use --mode lora or full, or --world-size 1"
        )
    return errors


def layout_label(world_size: int, parallel: str | None, cpu_offload: bool = False) -> str:
    """``fsdp ×4``, ``ddp ×2``, ``fsdp ×8 + cpu offload``; ``single process`` without parallel."""
    if parallel is None:
        return "single process"
    return f"{parallel} ×{world_size}" + (" + cpu offload" if cpu_offload else "")
