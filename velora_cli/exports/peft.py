"""The PEFT export: ``peft.LoraConfig`` keyword arguments, VeLoRA as PEFT's ``velora_config``.

PEFT (≥ 0.20; read in 0.21: ``tuners/lora/variants.py`` ``VeloraLinearVariant``,
``tuners/lora/bnb.py``) applies one ``VeloraConfig`` to the A projection of *every* LoRA target,
with sub-token size ``ceil(in_features / num_groups)``, and its bitsandbytes 4-bit and 8-bit LoRA
layers raise "does not support VeLoRA". So a measured configuration is written only when PEFT
would build exactly it:

* LoRA mode (not full fine-tuning, whose weights a LoraConfig does not train);
* no VeLoRA, or VeLoRA on every trained LoRA adapter with one number of groups (frozen base
  linears do not count: they form no weight gradient, and velora leaves them plain);
* not VeLoRA on a 4-bit (QLoRA) base.

Anything else is refused (`NotExpressible`) with the nearest configuration PEFT can state and
the ``velora tune`` command that measures it. What a LoraConfig does not hold (checkpointing,
micro-batch and accumulation, precision, optimizer) is said in the notes: ``--format trl`` or
``trainer`` carries it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from velora_cli.configs import LORA_MODES, VeloraConfig
from velora_cli.exports import Export, Nearest, NotExpressible
from velora_cli.exports.nearest import tune_command
from velora_cli.exports.recipe import task_of

# velora_cli.models' heads -> peft.TaskType (PEFT has none for masked LM: a plain PeftModel, as
# velora's own measurement builds it)
TASK_TYPES = {"causal-lm": "CAUSAL_LM", "masked-lm": None}
VELORA_SCALE = 1.0  # velora's VeLoRA has no scale: what every measured run used


def trained_layers(config: VeloraConfig) -> dict[str, dict[str, int]]:
    """The measured VeLoRA layers that train: in LoRA modes the adapters' A projections only
    (tune documents written before placements skipped frozen layers also list frozen base
    linears, which compress nothing)."""
    layers = config.layers or {}
    if config.mode in LORA_MODES:
        return {name: e for name, e in layers.items() if ".lora_A." in name}
    return dict(layers)


def num_groups_of(config: VeloraConfig) -> list[int]:
    """The numbers of groups D / M of the trained VeLoRA layers, most common first."""
    counts = Counter(
        e["in_features"] // e["sub_token_size"] for e in trained_layers(config).values()
    )
    return [g for g, _ in counts.most_common()]


def task_type(config: VeloraConfig) -> str | None:
    """PEFT's ``task_type`` for the model's head (None: PEFT has none, or the head is unknown)."""
    return TASK_TYPES.get(task_of(config))


def lora_kwargs(config: VeloraConfig, task: str | None) -> dict[str, Any]:
    """The LoRA part as velora measured it (``train_step._apply_lora``): rank r, alpha 2r, no
    dropout, its targets."""
    targets: str | list[str] = config.lora_targets or "all-linear"
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    d: dict[str, Any] = {
        "r": config.lora_rank,
        "lora_alpha": 2 * config.lora_rank,
        "lora_dropout": 0.0,
        "target_modules": targets,
    }
    if task:
        d["task_type"] = task
    return d


def check(config: VeloraConfig) -> tuple[list[str], Nearest | None, str]:
    """Why PEFT would not build ``config`` (empty: it would), the nearest it would, and a line
    on how to run the measured configuration itself."""
    if config.mode not in LORA_MODES:
        groups = config.num_groups or (num_groups_of(config) or [32])[0]
        nearest = dataclasses.replace(
            config,
            mode="lora",
            lora_rank=config.lora_rank or 8,
            lora_targets="all-linear",
            placement="all-linear" if config.uses_velora else None,
            num_groups=groups if config.uses_velora else None,
            layers=None,
            optimizer="adamw",
            rank=None,
            optimizer_targets=None,
        )
        return (
            [f"mode {config.mode}: a LoraConfig trains adapters, not the model's own weights"],
            Nearest(
                f"LoRA r={nearest.lora_rank} on all linear layers"
                + (f", VeLoRA on every adapter (g{groups})" if config.uses_velora else ""),
                nearest,
                tune_command(nearest, then="peft"),
            ),
            "The measured full fine-tune itself: --format trainer or trl",
        )
    if not config.uses_velora:
        return [], None, ""
    if config.mode == "qlora":
        nearest = dataclasses.replace(config, placement=None, num_groups=None, layers=None)
        return (
            [
                f"PEFT{_peft_version()} refuses VeLoRA on bitsandbytes 4-bit layers "
                "(lora.bnb.Linear4bit: 'does not support VeLoRA')"
            ],
            Nearest("the same QLoRA without VeLoRA", nearest, tune_command(nearest, then="peft")),
            "The measured QLoRA + VeLoRA itself: --format trl or trainer (velora's VeLoRA on "
            "the peft model, velora_cli.apply_config)",
        )
    layers = trained_layers(config)
    if not layers or config.lora_layers is None:
        return (
            [
                "the config does not record which LoRA adapters VeLoRA compressed (export it "
                "from a velora tune document)"
            ],
            None,
            "",
        )
    groups = num_groups_of(config)
    compressed = sorted({n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n in layers})
    why = []
    if len(layers) != config.lora_layers:
        why.append(
            f"placement {config.placement!r} compresses {len(layers)} of the "
            f"{config.lora_layers} LoRA adapters ({', '.join(compressed)}); PEFT's VeloraConfig "
            "applies to every LoRA target"
        )
    if len(groups) > 1:
        why.append(f"the layers use {len(groups)} numbers of groups {groups}; PEFT takes one")
    if not why:
        return [], None, ""
    nearest = dataclasses.replace(config, placement="all-linear", num_groups=groups[0], layers=None)
    description = f"VeLoRA on all {config.lora_layers} LoRA adapters, g{groups[0]}, the same LoRA"
    if len(layers) != config.lora_layers:
        description += f" (or LoRA only where it compressed: --lora-targets {','.join(compressed)})"
    return (
        why,
        Nearest(description, nearest, tune_command(nearest, then="peft")),
        "The measured configuration itself: --format trl or trainer (velora_cli.apply_config "
        "on the peft model)",
    )


def to_peft(config: VeloraConfig) -> dict[str, Any]:
    """Keyword arguments for ``peft.LoraConfig(**d)``: the measured LoRA, its VeLoRA, task type.

    Raises:
        NotExpressible: PEFT would build a different configuration (`check` says why).
    """
    why, nearest, also = check(config)
    if why:
        raise NotExpressible("a peft.LoraConfig", why, nearest, also)
    d = lora_kwargs(config, task_type(config))
    if config.uses_velora:
        d["velora_config"] = {
            "num_groups": num_groups_of(config)[0],
            "scale": VELORA_SCALE,
            "init_type": config.init,
        }
    return d


def notes(config: VeloraConfig, task: str | None) -> list[str]:
    """What the LoraConfig leaves out, or says that is not obvious, one line each."""
    out = []
    if config.uses_velora:
        out.append(
            f"velora_config.scale {VELORA_SCALE}: velora's VeLoRA has no scale, so the measured "
            "run used 1.0 (a different scale changes the weight gradient, not the memory)"
        )
    head = task_of(config)
    if task is None and head is None:
        out.append(
            f"no task_type: {config.model}'s head is unknown here; add task_type='CAUSAL_LM' "
            "for a causal LM (velora measured a plain PeftModel, the same layers)"
        )
    elif task is None:
        out.append(
            f"no task_type: PEFT has none for a {head} head, so get_peft_model builds a plain "
            "PeftModel (as velora measured)"
        )
    rest = [f"micro-batch {config.micro_batch_size} × {config.grad_accum_steps} accumulation"]
    if config.gc_every:
        rest.append(
            "checkpointing every layer"
            if config.gc_every == 1
            else f"checkpointing every {config.gc_every} layers"
        )
    rest.append(f"{config.amp} autocast" if config.amp else f"{config.dtype} base weights")
    out.append(f"not part of a LoraConfig: {', '.join(rest)}: --format trl or trainer writes them")
    if config.mode == "qlora":
        from velora_cli.exports.recipe import bnb_source, kbit_prepare_source

        out.append(
            f"QLoRA: load the base with quantization_config={bnb_source(config)} (as measured)"
        )
        prepare = kbit_prepare_source(config)
        if prepare:
            out.append(f"QLoRA: then {prepare}, before get_peft_model (as measured)")
    return out


def export(config: VeloraConfig) -> Export:
    """The ``--format peft`` document: exactly ``peft.LoraConfig(**data)``, or a refusal.

    Raises:
        NotExpressible: see `to_peft`.
    """
    data = to_peft(config)
    return Export(data, notes(config, data.get("task_type")))


def _peft_version() -> str:
    """`` 0.21.2`` (with its space) when peft is installed, else empty (read in 0.21)."""
    try:
        import peft
    except ImportError:
        return ""
    return f" {peft.__version__}"
