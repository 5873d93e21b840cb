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
        import difflib

        close = difflib.get_close_matches(bad[0], choices, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UserError(f"{option} {','.join(bad)}: choose from {', '.join(choices)}{hint}")
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
        "2-D weights, --mode full), or the HF Trainer's optim names: adamw_torch, "
        "adamw_torch_fused (its default), adamw_torch_forloop, adamw_bnb_8bit, paged_adamw_8bit, "
        "paged_adamw_32bit, adafactor.",
    ),
]
Attn = Annotated[
    str,
    typer.Option(
        "--attn",
        help="Attention kernels (transformers' attn_implementation): auto (transformers' "
        "default, sdpa), sdpa (the kernel torch picks on the GPU: flash, or memory-efficient with "
        "a mask, fp32 or below sm80), eager, flash_attention_2 (the flash-attn package; "
        "estimate only, sm80+, fp16/bf16).",
    ),
]
Task = Annotated[
    str | None,
    typer.Option(
        "--task",
        help="The head to train: causal-lm, masked-lm, sequence-classification, "
        "token-classification, question-answering, image-classification. Default: the one the "
        "config's architectures name (e.g. RobertaForSequenceClassification).",
    ),
]
Padding = Annotated[
    bool,
    typer.Option(
        "--padding",
        help="Batches are padded to their longest sequence (--seq-len): plan for the worst such "
        "batch, where a padding mask is passed (SDPA's masked kernel, FA2's varlen path).",
    ),
]
RepeatKv = Annotated[
    bool,
    typer.Option(
        "--repeat-kv",
        help="K/V are repeated to the query heads before SDPA even without a mask (transformers "
        "before its pull #39412 of July 2025, ~4.54, or a script that repeats them): SDPA gets no enable_gqa and keeps the "
        "repeated copies; on a T4/V100 this runs the memory-efficient kernel instead of the math "
        "path. Default: what transformers 5 does.",
    ),
]
TransformersVersion = Annotated[
    str | None,
    typer.Option(
        "--transformers-version",
        metavar="X.Y[.Z]",
        help="The transformers release of the run planned, where it is not the installed one: a "
        "causal LM's loss is then computed from the logits as that release did (before 4.49 a "
        "shifted copy of the logits; GPTBigCode in bf16, without the fp32 upcast, and to 4.52 "
        "each block's K/V kept while use_cache is on). Releases "
        "read: 4.39-4.48 for Llama, Mistral, Mixtral, Granite and GPTBigCode; others keep the "
        "installed loss. Default: the installed transformers.",
    ),
]
LengthsOption = Annotated[
    str | None,
    typer.Option(
        "--lengths",
        help="Sequence lengths of the data, for dynamic padding (or --packing): "
        "uniform:MIN-MAX, normal:MEAN,STD,MAX, percentiles:p50=N,p90=N,...,max=N, or a file with "
        "one length per line. Plans for the longest batch; its length replaces --seq-len.",
    ),
]
LengthData = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Training text (.txt: one sequence per paragraph, .jsonl: a 'text' per line, or a "
        "dataset name): its token lengths (the model's tokenizer if it loads offline, else UTF-8 "
        "bytes; truncated at --seq-len) give the longest batch, as --lengths does.",
    ),
]
Packing = Annotated[
    bool,
    typer.Option(
        "--packing",
        help="Packed batches (DataCollatorWithFlattening, TRL packing/padding_free): a batch's "
        "sequences in one row, position_ids restarting, no padding. FA2 runs varlen; SDPA and "
        "eager get a block-diagonal (1, 1, T, T) mask.",
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


# The recipe's settings (velora_cli.measure.recipe), shared by profile and tune.
GcReentrant = Annotated[
    bool,
    typer.Option(
        "--gc-reentrant",
        help="Checkpointing rows use torch's reentrant implementation "
        '(gradient_checkpointing_kwargs={"use_reentrant": True}); default non-reentrant, '
        "as transformers.",
    ),
]
DoubleQuant = Annotated[
    bool,
    typer.Option(
        "--double-quant/--no-double-quant",
        help="--mode qlora: bnb_4bit_use_double_quant (QLoRA recipe: on; 0.516 vs 0.5625 B "
        "per weight).",
    ),
]
ComputeDtype = Annotated[
    str | None,
    typer.Option(
        "--compute-dtype",
        help="--mode qlora: bnb_4bit_compute_dtype fp32|bf16|fp16. Default: bf16, fp16 on a "
        "--gpu without bf16.",
    ),
]
QuantStorage = Annotated[
    str,
    typer.Option(
        "--quant-storage",
        help="--mode qlora: bnb_4bit_quant_storage uint8|bf16|fp16|fp32 (FSDP wants the "
        "model dtype).",
    ),
]
KbitPrepare = Annotated[
    bool,
    typer.Option(
        "--kbit-prepare/--no-kbit-prepare",
        help="--mode qlora: peft's prepare_model_for_kbit_training (fp32 embeddings, norms, "
        "lm_head), as the PEFT QLoRA recipe does.",
    ),
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


def recipe_of(o, modes: list[str] | tuple[str, ...]) -> dict:
    """The recipe options of profile's or tune's options ``o`` as `StepSpec` fields
    (`measure.recipe.recipe_fields`), for ``modes`` and the GPU ``--gpu`` names."""
    from velora_cli.gpus import get_gpu
    from velora_cli.measure.recipe import recipe_fields

    return recipe_fields(
        gc_reentrant=o.gc_reentrant,
        double_quant=o.double_quant,
        compute_dtype=o.compute_dtype,
        quant_storage=o.quant_storage,
        kbit_prepare=o.kbit_prepare,
        modes=modes,
        gpu=get_gpu(o.gpu) if o.gpu else None,
    )


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
        "two: low-rank gradient projection, tried in full mode only) or the HF Trainer's names "
        "(adamw_torch_fused, paged_adamw_8bit, adafactor, ... as in profile).",
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


# velora validate
ValidateCases = Annotated[
    list[str] | None,
    typer.Option(
        "--case",
        help="Validate this case (its id, or part of it, e.g. a fitcheck row_id); repeatable. "
        "Default: every case.",
    ),
]
ValidateSources = Annotated[
    list[str] | None,
    typer.Option(
        "--source",
        help="Only this corpus file (e.g. fitcheck_t4, or a prefix: fitcheck); repeatable.",
    ),
]
ValidateFormat = Annotated[
    str, typer.Option("--format", help="table|json|markdown (to stdout, or --output).")
]
ValidateCorpus = Annotated[
    str | None,
    typer.Option("--corpus", help="Folder of corpus files (default: validation/published)."),
]
TrainerOption = Annotated[
    str,
    typer.Option(
        "--trainer",
        help="Whose step to plan: hf (the model's own loss from the full logits: transformers' "
        "Trainer, or a plain loop) or trl (TRL SFTTrainer's tiled LM head, entropy and "
        "token accuracy every step; needs trl).",
    ),
]
