"""The transformers Trainer export: ``TrainingArguments`` keyword arguments (checkpointing,
micro-batch, accumulation, optimizer), the notes on what they leave to the user, and a snippet
showing where the rest goes."""

from __future__ import annotations

import dataclasses
from typing import Any

from velora_cli.configs import GALORE_SCALE, GALORE_TARGETS, LORA_MODES, SGD_MOMENTUM, VeloraConfig
from velora_cli.exports import Export
from velora_cli.exports import checkpointing as memory
from velora_cli.exports.recipe import (
    attn_implementation,
    auto_class,
    batch_notes,
    bnb_source,
    checkpointing_kwargs,
    collator_lines,
    head_kwargs,
    kbit_prepare_source,
    recipe_notes,
    trainer_optim,
)
from velora_cli.models.public import is_builtin

# optimizers no TrainingArguments optim builds as planned: velora's make_optimizer does
OWN_OPTIMIZERS = ("adarankgrad", "adamw_torch_forloop")

BUILTIN_NOTE = "a velora built-in: random weights, no tokenizer (velora_cli.build_model)"


def builds_builtin(config: VeloraConfig) -> bool:
    """Whether a snippet builds the model with `velora_cli.build_model` (a built-in, not QLoRA:
    a 4-bit base is loaded from a checkpoint by bitsandbytes)."""
    return is_builtin(config.model) and config.mode != "qlora"


def model_line(config: VeloraConfig, name: str, weights: str, quantized: str = "") -> str:
    """The snippet line that makes ``model``: `velora_cli.build_model` for a built-in (which
    ``from_pretrained`` cannot load), else the planned head's Auto class
    (``AutoModelForSequenceClassification``, ...: `recipe.auto_class`) ``.from_pretrained`` with
    its ``num_labels`` and the planned ``attn_implementation``.

    Args:
        name: the Python expression naming the model (a literal or a variable).
        weights: the torch dtype expression, e.g. ``torch.float32``.
        quantized: extra ``from_pretrained`` arguments (QLoRA's quantization_config).
    """
    if builds_builtin(config):
        return f"model = build_model({name}, dtype={weights})  # {BUILTIN_NOTE}"
    where = (
        "  # a velora built-in: your checkpoint's id or path" if is_builtin(config.model) else ""
    )
    return (
        f"model = {auto_class(config)}.from_pretrained({name}, {head_kwargs(config)}"
        f"dtype={weights}{quantized}, "
        f'attn_implementation="{attn_implementation(config)}"){where}'
    )


def _trainer_has(name: str) -> bool:
    """Whether the installed ``TrainingArguments`` has field ``name`` (False without transformers)."""
    try:
        from transformers import TrainingArguments
    except ImportError:
        return False
    return name in {f.name for f in dataclasses.fields(TrainingArguments)}


def to_trainer(config: VeloraConfig) -> dict[str, Any]:
    """Keyword arguments for ``transformers.TrainingArguments(output_dir=..., **d)``.

    Checkpointing: transformers ≥ 5 names it ``activation_checkpointing`` and takes
    ``every_n_layers`` in its kwargs; older versions only have ``gradient_checkpointing`` (every
    layer), and an every-n config then needs `trainer_snippet`'s explicit call instead. The
    micro-batch is per device: on N devices the effective batch is N times the tuned one.

    Optimizer: galore is transformers' ``galore_adamw`` (the ``galore-torch`` package) over the
    linear modules the tune projected; adarankgrad has no ``optim`` name, so none is given: build
    it with `make_optimizer` and pass ``Trainer(..., optimizers=(optimizer, None))``.
    """
    d: dict[str, Any] = {
        "per_device_train_batch_size": config.micro_batch_size,
        "gradient_accumulation_steps": config.grad_accum_steps,
    }
    if config.gc is not False and not memory.by_velora(config):
        every = config.gc_every
        kwargs: dict[str, Any] = checkpointing_kwargs(config)
        if _trainer_has("activation_checkpointing"):
            if every != 1:
                kwargs["every_n_layers"] = every
            if config.offload == "inputs":
                kwargs["offload"] = True  # transformers pops it: save_on_cpu around each layer
            d["activation_checkpointing"] = True
            d["activation_checkpointing_kwargs"] = kwargs
        elif every == 1 and config.offload != "inputs":
            d["gradient_checkpointing"] = True
            d["gradient_checkpointing_kwargs"] = kwargs
        # else: every-n is not a TrainingArguments option here; trainer_snippet enables it
    if config.amp:
        d[config.amp] = True  # bf16=True / fp16=True: mixed precision with fp32 master weights
    if config.optimizer == "sgd":
        d["optim"] = "sgd"
        d["optim_args"] = f"momentum={SGD_MOMENTUM}"
    elif config.optimizer == "galore":
        d["optim"] = "galore_adamw"
        d["optim_target_modules"] = list(config.optimizer_targets or GALORE_TARGETS)
        rank = "" if config.rank is None else f"rank={config.rank},"
        d["optim_args"] = f"{rank}update_proj_gap={config.update_gap},scale={GALORE_SCALE}"
    elif trainer_optim(config):  # adamw (= adamw_torch), adamw_torch_fused, bnb, adafactor
        d["optim"] = trainer_optim(config)
    return d


def trainer_notes(config: VeloraConfig) -> list[str]:
    """What the Trainer keyword arguments leave to the user, one line each."""
    notes = []
    if config.uses_velora:
        notes.append(
            "VeLoRA is not a TrainingArguments option: call velora_cli.apply_config(model, "
            'export["velora"], checkpointing=False) before building the Trainer (snippet)'
        )
    notes += memory.notes(config)
    if config.gc_every not in (None, 1) and not _trainer_has("activation_checkpointing"):
        notes.append(
            f"checkpointing every {config.gc_every} layers is not a TrainingArguments option in "
            "this transformers version: the snippet enables it on the model"
        )
    if config.mode == "qlora":
        notes.append(
            f"QLoRA: load the model with quantization_config={bnb_source(config)} (snippet)"
        )
    if config.mode in LORA_MODES:
        notes.append("LoRA: wrap the model with peft.get_peft_model first (snippet)")
    if config.amp is None and config.dtype != "fp32":
        notes.append(f"pure {config.dtype} was tuned: load the model in that dtype")
    if config.optimizer == "galore":
        notes.append(
            "GaLore: optim='galore_adamw' needs pip install galore-torch and projects nn.Linear "
            "weights only; velora's own (what the tune measured) is "
            "velora_cli.make_optimizer(model, config, lr=...), passed as "
            "Trainer(..., optimizers=(optimizer, None))"
        )
        if config.rank is None:
            notes.append(
                "GaLore rank: not recorded, transformers defaults to 128; velora uses the "
                "hidden size / 4 (add rank=... to optim_args)"
            )
    if config.optimizer == "adarankgrad":
        notes.append(
            "AdaRankGrad is not a TrainingArguments optim: build it with optimizer = "
            "velora_cli.make_optimizer(model, config, lr=...) and pass "
            "Trainer(..., optimizers=(optimizer, None)) (snippet)"
        )
    return notes + recipe_notes(config) + batch_notes(config)


DEFAULT_PATH = "trainer.json"  # where the snippet reads this export from


def manual_checkpointing(config: VeloraConfig) -> bool:
    """Whether the model's checkpointing is set up outside the trainer's arguments: selective
    checkpointing, every n-th layer (or offload of its inputs) on transformers < 5."""
    old = not _trainer_has("activation_checkpointing")
    if memory.by_velora(config):
        return True
    return old and (config.gc_every not in (None, 1) or config.offload == "inputs")


def trainer_snippet(config: VeloraConfig, config_path: str = DEFAULT_PATH) -> str:
    """A short Python snippet that trains with ``config`` under the HF Trainer.

    It reads this export (``velora export-config --format trainer -o trainer.json``): the
    velora config it carries (``export["velora"]``) is what `velora_cli.apply_config`,
    `velora_cli.make_optimizer` and `velora_cli.VeloraCallback` take, so the snippet needs no
    other file.
    """
    dtype = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}
    weights = dtype[config.dtype if config.amp is None else "fp32"]
    qlora = config.mode == "qlora"
    quantized = ", quantization_config=bnb" if qlora else ""
    own_optimizer = config.optimizer in OWN_OPTIMIZERS  # no Trainer optim: velora builds it
    builtin = builds_builtin(config)
    applies = config.uses_velora or memory.by_velora(config) or config.offload == "all"
    imports = [
        "VeloraCallback",
        *(["apply_config"] if applies else []),
        *(["build_model"] if builtin else []),
        *(["make_optimizer"] if own_optimizer else []),
    ]
    lines = [
        "import json",
        "",
        *(["import peft"] if config.mode in LORA_MODES else []),
        "import torch",
        "from transformers import "
        + ("" if builtin else f"{auto_class(config)}, ")
        + "Trainer, TrainingArguments",
        *(["from transformers import BitsAndBytesConfig"] if qlora else []),
        "from velora_cli import " + ", ".join(imports),
        "",
        f'export = json.load(open("{config_path}"))  # velora export-config --format trainer '
        f"-o {config_path}",
        *([f"bnb = {bnb_source(config)}"] if qlora else []),
        model_line(config, f'"{config.model}"', weights, quantized),
    ]
    prepare = kbit_prepare_source(config)
    if prepare:
        lines.append(prepare)
    if config.mode in LORA_MODES:
        targets: str | list[str] = config.lora_targets or "all-linear"
        if targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        lines += [
            f"model = peft.get_peft_model(model, peft.LoraConfig(r={config.lora_rank}, "
            f"lora_alpha={2 * (config.lora_rank or 8)}, lora_dropout=0.0, "
            f"target_modules={targets!r}))",
        ]
    manual_gc = manual_checkpointing(config)
    if applies:
        what = "VeLoRA" if config.uses_velora else "checkpointing / offload"
        lines.append(f'apply_config(model, export["velora"], checkpointing={manual_gc})  # {what}')
    elif manual_gc:
        lines.append(
            "model.activation_checkpointing_enable(every_n_layers="
            f"{config.gc_every}, activation_checkpointing_kwargs={checkpointing_kwargs(config)!r})"
        )
    collator, collator_arg = collator_lines(config)
    lines += collator
    lines.append('args = TrainingArguments(output_dir="out", **export["training_arguments"])')
    # checks the plan, records the run
    callback = collator_arg + 'callbacks=[VeloraCallback(export["velora"])]'
    if own_optimizer:
        lr = "1e-2)  # GaLore's pre-training lr" if config.optimizer == "adarankgrad" else "1e-5)"
        lines += [
            f'optimizer = make_optimizer(model, export["velora"], lr={lr}; tune it',
            "trainer = Trainer(model=model, args=args, train_dataset=train_dataset, "
            f"optimizers=(optimizer, None), {callback})",
        ]
    else:
        lines.append(
            f"trainer = Trainer(model=model, args=args, train_dataset=train_dataset, {callback})"
        )
    lines.append("trainer.train()")
    return "\n".join(lines) + "\n"


def measured(config: VeloraConfig) -> dict[str, Any]:
    """What the plan measured, as every export states it: peak, tokens/s, backend, budget,
    source (the tune document)."""
    return {
        "peak_bytes": config.peak_bytes,
        "allocated_bytes": config.allocated_bytes,
        "tokens_per_second": config.tokens_per_second,
        "backend": config.backend,
        "budget_bytes": config.budget_bytes,
        "source": config.source,
    }


def measured_note(config: VeloraConfig) -> str:
    """The measured figures in one line (``planned: peak 1.19 GiB on the cpu backend, ...``)."""
    from velora_cli.budget import format_bytes

    peak = format_bytes(config.peak_bytes) if config.peak_bytes else "not recorded"
    parts = [f"planned: peak {peak} on the {config.backend or 'unknown'} backend"]
    if config.tokens_per_second:
        parts.append(f"{config.tokens_per_second:,.0f} tokens/s")
    if config.budget_bytes:
        parts.append(f"budget {format_bytes(config.budget_bytes)}")
    parts.append(f"from {config.source or 'an unnamed config'}")
    return ", ".join(parts) + " (VeloraCallback sets the run's figures beside these)"


def export(config: VeloraConfig) -> Export:
    """The ``--format trainer`` document: the keyword arguments, the notes and the snippet.

    Raises:
        NotExpressible: the plan measured TRL's step (``--trainer trl``), which the Trainer
            does not run.
    """
    if config.trainer != "hf":
        from velora_cli.exports import NotExpressible

        raise NotExpressible(
            "a Trainer run",
            [
                f"the plan measured the {config.trainer} step (TRL SFTTrainer's tiled LM "
                "head); transformers' Trainer computes the model's own loss from the full logits"
            ],
            None,
            "--format trl states this plan for TRL's SFTTrainer; for the Trainer, tune without "
            "--trainer trl",
        )
    notes = [measured_note(config), *trainer_notes(config)]
    return Export(
        {
            "format": "trainer",
            "training_arguments": to_trainer(config),
            "measured": measured(config),
            "velora": config.to_dict(),  # for apply_config, make_optimizer, VeloraCallback
            "notes": notes,
            "snippet": trainer_snippet(config),
            **({"sac_snippet": memory.sac_snippet(config)} if config.sac else {}),
        },
        notes,
    )
