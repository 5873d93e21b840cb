"""The TRL export: ``trl.SFTConfig`` keyword arguments, the ``peft_config`` for ``SFTTrainer``,
the velora config (for `velora_cli.apply_config` and `velora_cli.VeloraCallback`) and a snippet
that reads this one file.

What it must say because TRL's defaults differ from the Trainer's (read in TRL 1.16,
``trainer/sft_config.py`` and ``sft_trainer.py``):

* ``SFTConfig`` turns gradient checkpointing on and ``bf16`` on by default: both are written
  explicitly, as measured (off unless the tune chose them).
* ``max_length`` (default 1024) is the measured sequence length.
* ``SFTTrainer`` computes the loss through a tiled LM head (``add_fused_lm_head``) instead of the
  model's full logits, with its entropy and token accuracy every step: a different step, which
  a plan must have measured (``velora tune --trainer trl``, `velora_cli.measure.trainers`). A
  plan made for another step is refused, with the command that plans this one.
* ``SFTTrainer`` casts the trained parameters of a 4-bit model to bf16 (QLoRA), where velora
  measured them in fp32 (peft's default): the snippet casts them back, so the run is the one
  measured; drop those lines to keep TRL's bf16 adapters (less memory than planned).

PEFT's own VeLoRA (``peft_config``) is used where it states the measured configuration exactly
(`velora_cli.exports.peft`); otherwise the snippet wraps the model with PEFT itself and applies
velora's VeLoRA to it, then hands the model to ``SFTTrainer``: either way the measured
configuration, and the callback checks it at train begin.
"""

from __future__ import annotations

import dataclasses
from importlib.util import find_spec
from typing import Any

from velora_cli.configs import LORA_MODES, VeloraConfig
from velora_cli.exports import Export, FormatUnavailable, NotExpressible
from velora_cli.exports import checkpointing as memory
from velora_cli.exports import peft as peft_export
from velora_cli.exports.recipe import (
    bnb_source,
    checkpointing_kwargs,
    kbit_prepare_source,
)
from velora_cli.exports.trainer import (
    OWN_OPTIMIZERS,
    _trainer_has,
    builds_builtin,
    manual_checkpointing,
    model_line,
    to_trainer,
    trainer_notes,
)

DEFAULT_PATH = "trl.json"  # where the snippet reads this export from


def trl_version() -> str | None:
    """The installed TRL's version, or None when it cannot be imported."""
    if find_spec("trl") is None:
        return None
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


def _sft_has(name: str) -> bool:
    from trl import SFTConfig

    return name in {f.name for f in dataclasses.fields(SFTConfig)}


def to_sft(config: VeloraConfig) -> dict[str, Any]:
    """Keyword arguments for ``trl.SFTConfig(output_dir=..., **d)``, every measured setting
    stated (TRL's own defaults turn checkpointing and bf16 on)."""
    d = to_trainer(config)
    if config.gc is False or memory.by_velora(config):  # selective: set up on the model
        off = "activation_checkpointing" if _trainer_has("activation_checkpointing") else None
        d[off or "gradient_checkpointing"] = False
    if config.offload == "all" and _sft_has("activation_offloading"):
        d["activation_offloading"] = True  # TRL's own (trl/models/activation_offloading.py)
    for amp in ("bf16", "fp16"):
        d.setdefault(amp, config.amp == amp)
    if config.seq_len:
        d["max_length" if _sft_has("max_length") else "max_seq_length"] = config.seq_len
    # packed rows as planned: packing=True with TRL's default "bfd" strategy makes the collator
    # padding-free (sft_trainer.py: padding_free = args.padding_free or packing and bfd)
    d["packing"] = config.packing
    return d


def peft_part(config: VeloraConfig) -> tuple[dict[str, Any] | None, bool]:
    """(``peft_config`` kwargs or None, whether velora's own VeLoRA must be applied).

    LoRA with VeLoRA that PEFT states exactly: PEFT's VeloraConfig. LoRA that it does not: the
    same LoRA without ``velora_config`` (the snippet wraps the model itself) + apply_config.
    """
    if config.mode not in LORA_MODES:
        return None, config.uses_velora
    try:
        return peft_export.to_peft(config), False
    except NotExpressible:
        lora = peft_export.lora_kwargs(config, peft_export.task_type(config))
        return lora, config.uses_velora


def notes(config: VeloraConfig, lora: dict[str, Any] | None, own_velora: bool) -> list[str]:
    """What the SFTConfig leaves to the snippet or the user, one line each."""
    out = []
    if lora is not None and "velora_config" in lora:
        out += [n for n in peft_export.notes(config, lora.get("task_type")) if "scale" in n]
    if own_velora:
        why = "PEFT cannot state it (export-config --format peft says why)"
        if config.mode == "full":
            why = "full fine-tuning"
        out.append(
            f"VeLoRA by velora_cli.apply_config on the model before SFTTrainer ({why}); the "
            "model is then passed without peft_config"
        )
    if config.mode == "qlora":
        out.append(
            f"QLoRA: TRL {trl_version()} casts a 4-bit model's trained parameters to bf16, "
            "velora measured them in fp32 (peft's default): the snippet casts them back after "
            "SFTTrainer(...); without that the adapters, their gradients and AdamW state take "
            "half the bytes planned"
        )
    out.append(
        "planned with TRL's step (--trainer trl: TRL's "
        "tiled LM head, entropy and token accuracy, as SFTTrainer computes them); "
        "VeloraCallback reports the run's real peaks beside the plan"
    )
    if config.packing:
        out.append(
            "packing=True: each batch's sequences packed into one row of up to micro-batch × "
            "max_length tokens (padding-free, position_ids restart), as planned; with sdpa or "
            "eager transformers builds a block-diagonal mask over that row, flash_attention_2 "
            "runs varlen without one"
        )
    elif config.padding:
        out.append(
            f"packing=False: batches padded to their longest sequence (TRL's collator), planned "
            f"for the longest batch (max_length {config.seq_len})"
        )
    elif config.seq_len:
        out.append(
            f"max_length {config.seq_len}: velora measured every sequence at {config.seq_len} "
            "tokens with no padding mask; TRL pads batches of shorter sequences to their longest, "
            "which passes a mask (plan that with velora tune --padding or --packing)"
        )
    out += memory.notes(config, trl=True)
    skip = (
        "VeLoRA", "LoRA", "QLoRA", "selective checkpointing", "offload", "padded batches",
        "packed batches",
    )  # fmt: skip
    out += [n for n in trainer_notes(config) if not n.startswith(skip)]
    return out


def snippet(config: VeloraConfig, lora: dict[str, Any] | None, own_velora: bool) -> str:
    """Python that trains with this export under ``trl.SFTTrainer``, reading it from
    ``trl.json``, with `velora_cli.VeloraCallback` checking the plan."""
    dtype = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}
    weights = dtype[config.dtype if config.amp is None else "fp32"]
    qlora = config.mode == "qlora"
    own_optimizer = config.optimizer in OWN_OPTIMIZERS
    builtin = builds_builtin(config)
    names = ["VeloraCallback"] + (["apply_config"] if own_velora else [])
    names += ["build_model"] if builtin else []
    names += ["make_optimizer"] if own_optimizer else []
    manual_gc = manual_checkpointing(config)
    names += ["apply_config"] if memory.by_velora(config) and not own_velora else []
    lines = [
        "import json",
        "",
        *(["import peft"] if lora is not None else []),
        "import torch",
        *(
            []
            if builtin
            else [
                "from transformers import AutoModelForCausalLM, AutoTokenizer"
                + (", BitsAndBytesConfig" if qlora else "")
            ]
        ),
        "from trl import SFTConfig, SFTTrainer",
        f"from velora_cli import {', '.join(names)}",
        "",
        f'export = json.load(open("{DEFAULT_PATH}"))  # velora export-config --format trl -o '
        f"{DEFAULT_PATH}",
        f'name = "{config.model}"',
        *([f"bnb = {bnb_source(config)}"] if qlora else []),
        model_line(config, "name", weights, ", quantization_config=bnb" if qlora else ""),
    ]
    prepare = kbit_prepare_source(config)
    if prepare:
        lines.append(prepare)
    peft_arg = ""
    if lora is not None and own_velora:
        lines.append('model = peft.get_peft_model(model, peft.LoraConfig(**export["peft_config"]))')
    elif lora is not None:
        peft_arg = ', peft_config=peft.LoraConfig(**export["peft_config"])'
    if own_velora or memory.by_velora(config):
        what = "VeLoRA" if own_velora else "selective checkpointing"
        lines.append(f'apply_config(model, export["velora"], checkpointing={manual_gc})  # {what}')
    elif manual_gc:
        lines.append(
            f"model.activation_checkpointing_enable(every_n_layers={config.gc_every}, "
            f"activation_checkpointing_kwargs={checkpointing_kwargs(config)!r})"
        )
    optimizers = ""
    if own_optimizer:
        lr = "1e-2" if config.optimizer == "adarankgrad" else "1e-5"
        lines.append(f'optimizer = make_optimizer(model, export["velora"], lr={lr})  # tune the lr')
        optimizers = ", optimizers=(optimizer, None)"
    if builtin:
        lines.append(
            "# tokenizer: yours, a velora built-in has none (ids < vocab_size, a pad token)"
        )
    lines += [
        'args = SFTConfig(output_dir="out", **export["sft_config"])',
        "trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,  # a 'text' column",
        "                     processing_class="
        + ("tokenizer" if builtin else "AutoTokenizer.from_pretrained(name)")
        + f'{peft_arg}{optimizers}, callbacks=[VeloraCallback(export["velora"])])',
    ]
    if qlora:
        lines += [
            "for p in trainer.model.parameters():  # TRL made the adapters bf16; velora measured fp32",
            "    if p.requires_grad:",
            "        p.data = p.data.float()",
        ]
    lines.append("trainer.train()")
    return "\n".join(lines) + "\n"


def export(config: VeloraConfig) -> Export:
    """The ``--format trl`` document.

    Raises:
        FormatUnavailable: TRL cannot be imported here.
        NotExpressible: the model is not a causal LM (SFTTrainer trains those).
    """
    version = trl_version()
    if version is None:
        raise FormatUnavailable(
            "--format trl needs TRL, which cannot be imported here: pip install trl "
            "(--format trainer writes the same settings for transformers' Trainer)"
        )
    task = peft_export.task_of(config)
    if task not in (None, "causal-lm"):
        raise NotExpressible(
            "an SFTTrainer run",
            [f"TRL's SFTTrainer trains causal language models; {config.model} is {task}"],
            None,
            "--format trainer writes this configuration for transformers' Trainer",
        )
    if config.trainer != "trl":
        from velora_cli.exports import Nearest
        from velora_cli.exports.nearest import tune_command

        nearest = dataclasses.replace(config, trainer="trl", layers=None)
        raise NotExpressible(
            "an SFTTrainer run",
            [
                f"the plan measured the {config.trainer} step (the model's own loss from the "
                "full logits); TRL's SFTTrainer computes its loss through a tiled LM head, "
                "with entropy and token accuracy every step, whose memory differs (60% above "
                "such a plan for llama-60m, issue 28)"
            ],
            Nearest(
                "the same search planned for TRL's step", nearest, tune_command(nearest, "trl")
            ),
            "--format trainer states this plan for transformers' Trainer",
        )
    lora, own_velora = peft_part(dataclasses.replace(config, task=task))
    said = notes(config, lora, own_velora)
    data = {
        "format": "trl",
        "trl": version,
        "sft_config": to_sft(config),
        "peft_config": lora,
        "velora": config.to_dict(),
        "apply_velora": own_velora,
        "notes": said,
        "snippet": snippet(config, lora, own_velora),
        **({"sac_snippet": memory.sac_snippet(config)} if config.sac else {}),
    }
    return Export(data, said)
