"""What every export says the same way, so the run is the one planned: the model's head (its
transformers Auto class and ``num_labels``), ``attn_implementation``, checkpointing's
``use_reentrant``, QLoRA's ``BitsAndBytesConfig`` and peft's ``prepare_model_for_kbit_training``,
the Trainer ``optim`` name of the optimizer, and the collator of padded or packed batches.

Plain strings and dicts (no torch): the export formats put them in their JSON and snippets.
"""

from __future__ import annotations

from typing import Any

from velora_cli.configs import VeloraConfig
from velora_cli.methods.optimizer_names import OPTIMIZER_INFO

DEFAULT_ATTN = "sdpa"  # transformers' from_pretrained default where torch has SDPA
_TORCH_DTYPES = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}
_STORAGE = {"uint8": "torch.uint8", **_TORCH_DTYPES}


# the transformers Auto class that builds each head velora plans (models.TASKS)
AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "image-classification": "AutoModelForImageClassification",
}
# heads whose size is the number of classes: from_pretrained gets num_labels as planned
LABELLED = ("sequence-classification", "token-classification", "image-classification")


def task_of(config: VeloraConfig) -> str | None:
    """The head the model trains (`models.TASKS`): the config's, else read from the model; None
    when the model cannot be resolved here (an unreachable hub id)."""
    if config.task is not None:
        return config.task
    from velora_cli.models import ModelError, resolve_model

    try:
        return resolve_model(config.model).task
    except ModelError:
        return None


def auto_class(config: VeloraConfig) -> str:
    """The Auto class that loads the planned head (a causal LM where the head is unknown)."""
    return AUTO_CLASSES.get(task_of(config) or "causal-lm", "AutoModelForCausalLM")


def num_labels(config: VeloraConfig) -> int | None:
    """The planned classifier's number of classes (the model config's ``num_labels``, which the
    plan measured), or None for a head without classes or a model not resolvable here."""
    if task_of(config) not in LABELLED:
        return None
    from velora_cli.models import ModelError, resolve_model

    try:
        return int(resolve_model(config.model).config.num_labels)
    except (ModelError, AttributeError, TypeError):
        return None


def head_kwargs(config: VeloraConfig) -> str:
    """``from_pretrained`` arguments of the head, as Python source: ``num_labels=N, `` or ``""``."""
    labels = num_labels(config)
    return f"num_labels={labels}, " if labels is not None else ""


def attn_implementation(config: VeloraConfig) -> str:
    """The ``attn_implementation`` to load the model with: the planned one, else sdpa."""
    return config.attn_implementation or DEFAULT_ATTN


def checkpointing_kwargs(config: VeloraConfig) -> dict[str, Any]:
    """``gradient_checkpointing_kwargs`` (``activation_checkpointing_kwargs``) as planned."""
    return {"use_reentrant": config.gc_reentrant}


def bnb_kwargs(config: VeloraConfig) -> dict[str, str | bool]:
    """``BitsAndBytesConfig`` keyword arguments as planned, dtypes as Python source text."""
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": config.double_quant,
        "bnb_4bit_compute_dtype": _TORCH_DTYPES[config.compute_dtype],
        "bnb_4bit_quant_storage": _STORAGE[config.quant_storage],
    }


def bnb_source(config: VeloraConfig) -> str:
    """``BitsAndBytesConfig(...)`` as Python source."""
    parts = []
    for key, value in bnb_kwargs(config).items():
        text = value if isinstance(value, str) and value.startswith("torch.") else repr(value)
        parts.append(f"{key}={text}")
    return f"BitsAndBytesConfig({', '.join(parts)})"


def kbit_prepare_source(config: VeloraConfig, model: str = "model") -> str | None:
    """The ``prepare_model_for_kbit_training`` line (None when it was not planned).

    Its default ``use_gradient_checkpointing=True`` would turn on checkpointing (reentrant in
    transformers 5.25 + torch 2.13) whatever was planned: the line states the plan instead.
    """
    if not (config.kbit_prepare and config.mode == "qlora"):
        return None
    gc = config.gc_every is not None
    kwargs = f"use_gradient_checkpointing={gc}"
    if gc:
        kwargs += f", gradient_checkpointing_kwargs={checkpointing_kwargs(config)!r}"
    return f"{model} = peft.prepare_model_for_kbit_training({model}, {kwargs})"


def trainer_optim(config: VeloraConfig) -> str | None:
    """The ``TrainingArguments.optim`` that builds the planned optimizer (None: none does)."""
    info = OPTIMIZER_INFO.get(config.optimizer)
    return info.trainer_optim if info is not None else None


def recipe_notes(config: VeloraConfig) -> list[str]:
    """What the keyword arguments cannot carry, one line each."""
    notes = []
    if config.attn_implementation is None:
        notes.append(
            f"attention: the plan did not record attn_implementation; the snippet loads the "
            f"model with {DEFAULT_ATTN!r} (what velora's step models)"
        )
    if config.optimizer == "adamw_torch_forloop":
        notes.append(
            "for-loop AdamW (foreach=False) has no TrainingArguments optim: build "
            "torch.optim.AdamW(params, foreach=False) or velora_cli.make_optimizer(model, config, "
            "lr=...) and pass Trainer(..., optimizers=(optimizer, None))"
        )
    info = OPTIMIZER_INFO.get(config.optimizer)
    if info is not None and info.paged:
        notes.append(
            f"{config.optimizer}: its state is cudaMallocManaged memory: torch's "
            "max_memory_allocated/reserved leave it out, nvidia-smi shows it while resident"
        )
    if config.repeat_kv:
        notes.append(
            "attention: planned with K/V repeated to the query heads before SDPA (--repeat-kv); "
            "transformers 5 passes enable_gqa instead when there is no mask, which torch 2.13 "
            "runs on the math path (N x N kept) on a T4/V100 or in fp32: repeat them in the run "
            "too (transformers before its pull #39412, or a patch of "
            "scaled_dot_product_attention that repeat_interleaves K/V)"
        )
    if config.kbit_prepare and config.mode == "qlora":
        notes.append(
            "QLoRA: peft.prepare_model_for_kbit_training makes embeddings, norms and lm_head "
            "fp32, as planned; its checkpointing is set to the plan's (snippet)"
        )
    return notes


def collator_lines(config: VeloraConfig) -> tuple[list[str], str]:
    """Snippet lines that make the collator of the planned batches, and the ``Trainer``
    argument that passes it (``""`` for full-length batches, the default collator's).

    Packed rows: transformers' ``DataCollatorWithFlattening`` (one row, position_ids restarting,
    no attention mask), with ``use_cache`` off: a cache in the forward (the model's default in
    training without checkpointing) turns transformers' packed-sequence detection off
    (`masking_utils._preprocess_mask_arguments`), and SDPA would then attend across sequences.
    Padded batches: padded to the longest of each batch (``DataCollatorForLanguageModeling`` for
    language models, ``DataCollatorWithPadding`` for the other text heads).
    """
    task = task_of(config) or "causal-lm"
    if config.packing:
        return [
            "from transformers import DataCollatorWithFlattening",
            "model.config.use_cache = False  # a KV cache hides the packing from the masks",
            "collator = DataCollatorWithFlattening()  # a batch in one row, as planned",
        ], "data_collator=collator, "
    if not config.padding:
        return [], ""
    name = "DataCollatorWithPadding"
    make = f"{name}(tokenizer)"
    if task in ("causal-lm", "masked-lm"):
        name = "DataCollatorForLanguageModeling"
        make = f"{name}(tokenizer{', mlm=False' if task == 'causal-lm' else ''})"
    from velora_cli.models.public import is_builtin

    tokenizer = (
        "tokenizer = ...  # yours: a velora built-in has none"
        if is_builtin(config.model)
        else f'tokenizer = AutoTokenizer.from_pretrained("{config.model}")'
    )
    return [
        f"from transformers import AutoTokenizer, {name}",
        tokenizer,
        f"collator = {make}  # pads each batch to its longest, as planned",
    ], "data_collator=collator, "


def batch_notes(config: VeloraConfig) -> list[str]:
    """How the planned batches are formed, one line each (padded, packed)."""
    if config.packing:
        return [
            "packed batches: each batch's sequences in one row (DataCollatorWithFlattening; "
            "TRL packing=True), as planned; with sdpa or eager transformers builds a (1, 1, T, T) "
            "block-diagonal mask per step, flash_attention_2 runs varlen without one"
        ]
    if config.padding:
        return [
            "padded batches: each padded to its longest sequence (the collator in the snippet), "
            "planned for the longest batch"
        ]
    return []
