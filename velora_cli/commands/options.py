"""Options shared by the commands, defined once (``Annotated`` aliases), and their parsers."""

from __future__ import annotations

from typing import Annotated

import typer

from velora_cli.commands.errors import UserError
from velora_cli.gpus import DEFAULT_GPU, GPUS


def int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(
            f"{option} takes comma-separated integers, e.g. 64,32,16; got {text!r}"
        ) from None
    if not values:
        raise UserError(f"{option} is empty")
    return values


def word_list(text: str, option: str, choices: tuple[str, ...] | None = None) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise UserError(f"{option} is empty")
    bad = [v for v in values if choices and v not in choices]
    if bad:
        raise UserError(f"{option} {','.join(bad)}: choose from {', '.join(choices)}")
    return values


# Options shared by profile and tune, defined once.
ModelArg = Annotated[
    str | None,
    typer.Argument(
        help="Hub id, local directory with config.json, or built-in name (velora "
        "models). Default: a small built-in."
    ),
]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Sequences per step.")]
SeqLen = Annotated[int, typer.Option("--seq-len", "-s", help="Tokens per sequence.")]
Dtype = Annotated[str, typer.Option("--dtype", help="Weights/optimizer dtype: fp32|bf16|fp16.")]
Amp = Annotated[
    str | None,
    typer.Option("--amp", help="Mixed precision (fp32 master weights + autocast): bf16|fp16."),
]
Mode = Annotated[
    str,
    typer.Option(
        "--mode",
        help="full (all parameters), lora (peft) or qlora (4-bit NF4 frozen base + LoRA; "
        "cpu/cuda need bitsandbytes).",
    ),
]
LoraRank = Annotated[int, typer.Option("--lora-rank", help="LoRA rank (--mode lora, qlora).")]
LoraTargets = Annotated[
    str, typer.Option("--lora-targets", help="LoRA target modules, comma-separated, or all-linear.")
]
Optimizer = Annotated[
    str,
    typer.Option(
        "--optimizer",
        help="adamw|sgd|galore|adarankgrad (the last two: low-rank gradient projection of "
        "2-D weights, --mode full).",
    ),
]
Rank = Annotated[
    int | None,
    typer.Option(
        "--rank",
        help="galore: projection rank; adarankgrad: the most its adaptive rank may reach. "
        "Default: hidden size / 4 (GaLore's ratio).",
    ),
]
UpdateGap = Annotated[
    int,
    typer.Option("--update-gap", help="galore/adarankgrad: steps between subspace refreshes."),
]
Eta = Annotated[
    float,
    typer.Option(
        "--eta", help="adarankgrad: fraction of each gradient's energy the adaptive rank keeps."
    ),
]
Backend = Annotated[
    str,
    typer.Option(
        "--backend",
        help="auto|cuda|cpu|estimate. auto: cuda when available, "
        "else estimate (+ cpu step times for small models).",
    ),
]
Weights = Annotated[
    bool,
    typer.Option(
        "--weights",
        help="Load the checkpoint's weights (default: random "
        "weights from the config; memory and time do not depend on values).",
    ),
]
Gpu = Annotated[
    str | None,
    typer.Option(
        "--gpu",
        help="The GPU the estimate predicts for: " + ", ".join(GPUS) + f". Default: {DEFAULT_GPU}.",
    ),
]
AllocConf = Annotated[
    str | None,
    typer.Option(
        "--alloc-conf",
        help="Caching-allocator settings (PYTORCH_CUDA_ALLOC_CONF syntax, e.g. "
        "expandable_segments:True) for the device-memory prediction and cuda runs. Default: "
        "the environment's.",
    ),
]
TrustRemoteCode = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow model code from the hub repo.")
]
Init = Annotated[
    str, typer.Option("--init", help="VeLoRA v init: batch_average_once|batch_average|random.")
]


# Selective checkpointing and activation offload (profile rows, tune candidates).
Sac = Annotated[
    str,
    typer.Option(
        "--sac",
        help="Selective checkpointing of every layer to compare, comma-separated: op "
        "(torchtitan: keep matmul and attention outputs, every other matmul recomputed), attn "
        "(recompute only the attention), mlp (recompute only the MLP); none: not tried.",
    ),
]
Offload = Annotated[
    str,
    typer.Option(
        "--offload",
        help="Activation offload to compare, comma-separated: inputs (checkpointing + each "
        "layer's input in pinned host memory, transformers' offload=True), all (every saved "
        "activation, as TRL's activation_offloading); none: not tried.",
    ),
]
ProfileBudget = Annotated[
    str | None,
    typer.Option(
        "--budget",
        help="Device memory budget (10GB, 10GiB, ...): the verdict says which rows fit and the "
        "exit code tells a CI job (0: a row fits, 1: none does, 2: no row could be estimated).",
    ),
]


def choice_list(text: str, option: str, choices: tuple[str, ...]) -> list[str]:
    """``word_list`` where ``none`` (alone) means no entries."""
    return [] if text.strip() == "none" else word_list(text, option, choices)


# Options of tune and export-config.
Budget = Annotated[
    str | None,
    typer.Option(
        "--budget",
        help="Memory budget: 10GB (10^9 bytes), 10GiB, 9.5G (= GB), 10240MB, 10240MiB, "
        "123456B. Default on a GPU: its free memory.",
    ),
]
Margin = Annotated[
    float, typer.Option("--margin", help="Headroom kept below the budget (0.05 = 5%).")
]
Objective = Annotated[
    str,
    typer.Option(
        "--objective",
        help="speed (highest tokens/s), memory (lowest peak) or accuracy (smallest loss "
        "change), among the configurations that fit.",
    ),
]
TuneBackend = Annotated[
    str,
    typer.Option(
        "--backend",
        help="auto|cuda|cpu|estimate. auto: cuda when available, else estimate (peaks on "
        "meta tensors, no step run: nothing is verified by a real run).",
    ),
]
TuneModes = Annotated[
    str,
    typer.Option(
        "--mode",
        help="Training modes to search, comma-separated: full, lora, qlora (modes whose "
        "packages are missing are left out with a notice).",
    ),
]
TuneOptimizers = Annotated[
    str,
    typer.Option(
        "--optimizer",
        help="Optimizers to search, comma-separated: adamw, sgd, galore, adarankgrad (the last "
        "two: low-rank gradient projection, tried in full mode only).",
    ),
]
TunePlacements = Annotated[
    str,
    typer.Option(
        "--placements",
        help="VeLoRA placements to try, comma-separated (presets as in profile); no "
        "VeLoRA is always tried.",
    ),
]
TuneNumGroups = Annotated[
    str, typer.Option("--num-groups", help="Sub-token choices as numbers of groups D/M.")
]
TuneGcEvery = Annotated[
    str,
    typer.Option(
        "--gc-every",
        help="Checkpointing every n-th layer to try (comma-separated); none and every "
        "layer are always tried.",
    ),
]
MicroBatches = Annotated[
    str | None,
    typer.Option(
        "--micro-batches",
        help="Micro-batch sizes (divisors of --batch-size; the rest is gradient "
        "accumulation). Default: every power of two that divides it.",
    ),
]
ProbeSteps = Annotated[
    int,
    typer.Option("--probe-steps", help="Optimizer steps of the accuracy probe (0: no probes)."),
]
MaxLossIncrease = Annotated[
    float,
    typer.Option(
        "--max-loss-increase",
        help="Tolerance on the probe's held-out loss vs the baseline (0.01 = +1%).",
    ),
]
ProbeData = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Probe text: a .txt or .jsonl (text field) file, or a Hugging Face dataset "
        "name. Default: English text bundled with Python.",
    ),
]
MaxMeasured = Annotated[
    int | None,
    typer.Option(
        "--max-measured",
        help="Measure at most N candidates (verification not counted). Default: 4 on "
        "the cpu backend, no limit otherwise.",
    ),
]
Resume = Annotated[
    bool,
    typer.Option("--resume", help="Continue the latest tune journal under profiles/."),
]
ResumeFrom = Annotated[
    str | None,
    typer.Option("--resume-from", help="Continue this tune journal (.jsonl); implies --resume."),
]
PlotOut = Annotated[
    str | None,
    typer.Option(
        "--plot",
        help="Also draw the result at the end: .png, .svg or .html (one offline page with "
        "the tables); needs velora-cli[plot].",
    ),
]


# Options of the multi-GPU layout (velora_cli.parallel).
ParallelOption = Annotated[
    str | None,
    typer.Option(
        "--parallel",
        help="ddp (replicated, gradient all-reduce), fsdp (FSDP2 fully_shard per decoder layer "
        "+ root, reshard after forward: ZeRO-3 like) or fsdp-no-reshard (ZeRO-2 like); "
        "comma-separated for several. Default with --world-size > 1: fsdp.",
    ),
]
CpuOffload = Annotated[
    bool,
    typer.Option(
        "--cpu-offload",
        help="FSDP2 CPUOffloadPolicy: sharded parameters, gradients and optimizer state in host "
        "memory (the optimizer step runs on the CPU).",
    ),
]
