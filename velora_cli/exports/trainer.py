"""The transformers Trainer export: ``TrainingArguments`` keyword arguments (checkpointing,
micro-batch, accumulation, optimizer), the notes on what they leave to the user, and a snippet
showing where the rest goes."""

from __future__ import annotations

import dataclasses
from typing import Any

from velora_cli.configs import GALORE_SCALE, GALORE_TARGETS, LORA_MODES, SGD_MOMENTUM, VeloraConfig
from velora_cli.exports import Export
from velora_cli.exports import checkpointing as memory


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
        kwargs: dict[str, Any] = {"use_reentrant": False}
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
    if config.optimizer == "adamw":
        d["optim"] = "adamw_torch"
    elif config.optimizer == "sgd":
        d["optim"] = "sgd"
        d["optim_args"] = f"momentum={SGD_MOMENTUM}"
    elif config.optimizer == "galore":
        d["optim"] = "galore_adamw"
        d["optim_target_modules"] = list(config.optimizer_targets or GALORE_TARGETS)
        rank = "" if config.rank is None else f"rank={config.rank},"
        d["optim_args"] = f"{rank}update_proj_gap={config.update_gap},scale={GALORE_SCALE}"
    return d


def trainer_notes(config: VeloraConfig) -> list[str]:
    """What the Trainer keyword arguments leave to the user, one line each."""
    notes = []
    if config.uses_velora:
        notes.append(
            "VeLoRA is not a TrainingArguments option: call velora_cli.apply_config(model, "
            "config, checkpointing=False) before building the Trainer (snippet)"
        )
    notes += memory.notes(config)
    if config.gc_every not in (None, 1) and not _trainer_has("activation_checkpointing"):
        notes.append(
            f"checkpointing every {config.gc_every} layers is not a TrainingArguments option in "
            "this transformers version: the snippet enables it on the model"
        )
    if config.mode == "qlora":
        notes.append(
            "QLoRA: load the model with quantization_config=BitsAndBytesConfig(load_in_4bit=True, "
            "bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True, "
            "bnb_4bit_compute_dtype=torch.bfloat16) (snippet)"
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
    return notes


def manual_checkpointing(config: VeloraConfig) -> bool:
    """Whether the model's checkpointing is set up outside the trainer's arguments: selective
    checkpointing, every n-th layer (or offload of its inputs) on transformers < 5."""
    old = not _trainer_has("activation_checkpointing")
    if memory.by_velora(config):
        return True
    return old and (config.gc_every not in (None, 1) or config.offload == "inputs")


def trainer_snippet(config: VeloraConfig, config_path: str = "velora-config.json") -> str:
    """A short Python snippet that trains with ``config`` under the HF Trainer."""
    dtype = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}
    weights = dtype[config.dtype if config.amp is None else "fp32"]
    where = "" if "/" in config.model else "  # a velora built-in: your checkpoint's id or path"
    qlora = config.mode == "qlora"
    quantized = ", quantization_config=bnb" if qlora else ""
    own_optimizer = config.optimizer == "adarankgrad"  # no Trainer optim: velora builds it
    applies = config.uses_velora or memory.by_velora(config) or config.offload == "all"
    imports = [
        *(["apply_config"] if applies else []),
        *(["make_optimizer"] if own_optimizer else []),
    ]
    lines = [
        *(["import peft"] if config.mode in LORA_MODES else []),
        "import torch",
        "from transformers import AutoModelForCausalLM, Trainer, TrainingArguments",
        *(["from transformers import BitsAndBytesConfig"] if qlora else []),
        *(["from velora_cli import " + ", ".join(imports)] if imports else []),
        "",
        *(
            [
                'bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", '
                "bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)"
            ]
            if qlora
            else []
        ),
        f'model = AutoModelForCausalLM.from_pretrained("{config.model}", dtype={weights}'
        f"{quantized}){where}",
    ]
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
        lines.append(f'apply_config(model, "{config_path}", checkpointing={manual_gc})  # {what}')
    elif manual_gc:
        lines.append(
            "model.activation_checkpointing_enable(every_n_layers="
            f'{config.gc_every}, activation_checkpointing_kwargs={{"use_reentrant": False}})'
        )
    kwargs = ", ".join(f"{k}={v!r}" for k, v in to_trainer(config).items())
    lines.append(f'args = TrainingArguments(output_dir="out", {kwargs})')
    if own_optimizer:
        lines += [
            f'optimizer = make_optimizer(model, "{config_path}", lr=1e-2)  # GaLore\'s '
            "pre-training lr; tune it",
            "trainer = Trainer(model=model, args=args, train_dataset=train_dataset, "
            "optimizers=(optimizer, None))",
        ]
    else:
        lines.append("trainer = Trainer(model=model, args=args, train_dataset=train_dataset)")
    lines.append("trainer.train()")
    return "\n".join(lines) + "\n"


def export(config: VeloraConfig) -> Export:
    """The ``--format trainer`` document: the keyword arguments, the notes and the snippet."""
    notes = trainer_notes(config)
    return Export(
        {
            "format": "trainer",
            "training_arguments": to_trainer(config),
            "notes": notes,
            "snippet": trainer_snippet(config),
            **({"sac_snippet": memory.sac_snippet(config)} if config.sac else {}),
        },
        notes,
    )
