"""The exported config: what `velora tune` recommended, in a form training code can use.

One small frozen dataclass, `VeloraConfig`, validated once (every error reported together), and
three ways out of it:

* the velora format itself (JSON, ``to_dict``), read back with `load_config` and applied to a
  user's model with `apply_config` (VeLoRA layers, sub-token sizes, init, checkpointing); its
  optimizer (AdamW, SGD, GaLore or AdaRankGrad) is built by `make_optimizer`;
* `velora_cli.exports.peft.to_peft`: keyword arguments of ``peft.LoraConfig``, when the
  recommendation can be said that way;
* `velora_cli.exports.trainer.to_trainer`: ``transformers.TrainingArguments`` keyword arguments,
  with a snippet showing where the rest goes.

No torch import at module level: ``velora export-config`` only moves JSON around.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from velora_cli.measure.layout import FSDP_INCOMPATIBLE_OPTIMIZERS  # names only: no torch
from velora_cli.methods.optimizer_names import LOWRANK as LOWRANK_OPTIMIZERS
from velora_cli.methods.optimizer_names import OPTIMIZER_NAMES as OPTIMIZERS

__all__ = [
    "ConfigError",
    "VeloraConfig",
    "apply_config",
    "from_tune_document",
    "load_config",
    "make_optimizer",
]

FORMAT = "velora-config"
VERSION = 1
MODES = ("full", "lora", "qlora")
LORA_MODES = ("lora", "qlora")  # qlora: LoRA on a 4-bit NF4 base (velora_cli.methods.quant)
DTYPES = ("fp32", "bf16", "fp16")
TASKS = ("causal-lm", "masked-lm")  # the heads velora_cli.models builds
TRAINERS = ("hf", "trl")  # measure.trainers.TRAINERS, repeated: no torch import (tested equal)
# The v initializations of velora.INIT_STRATEGIES, repeated here so that loading a config does not
# import torch (PEFT's VeloraConfig.init_type takes the same three names).
INITS = ("batch_average_once", "batch_average", "random")
# The optimizers of measure.train_step are velora_cli.methods.optimizer_names' (torch-free,
# imported above); the settings of velora_cli.methods.lowrank are repeated (tested equal).

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
QUANT_STORAGES = ("uint8", "bf16", "fp16", "fp32")  # bnb_4bit_quant_storage (train_step's)
DEFAULT_UPDATE_GAP = 200
DEFAULT_ETA = 0.9
GALORE_SCALE = 0.25  # lowrank.DEFAULT_SCALE, which transformers' galore_adamw defaults to too
SGD_MOMENTUM = 0.9  # what the tune measured (train_step.prepare)
# transformers' GaLore projects the nn.Linear modules named in optim_target_modules; without the
# names the tune recorded, attention and MLP linears by the usual module names (GaLore's README).
GALORE_TARGETS = (r".*attn.*", r".*attention.*", r".*mlp.*")


class ConfigError(ValueError):
    """A config that cannot be read or applied; the message lists every problem found."""


@dataclass(frozen=True)
class VeloraConfig:
    """A tuned training configuration, as `velora export-config` writes it.

    ``layers`` maps each wrapped layer's qualified name to ``{"in_features": D,
    "sub_token_size": M}`` (what the tune measured; `apply_config` checks the user's model
    against it); without it, ``placement`` + ``num_groups`` are applied as presets.

    ``rank``, ``update_gap`` and ``eta`` set galore/adarankgrad (``rank`` None: the model's
    hidden size / 4, resolved by `make_optimizer`); ``optimizer_targets`` names the linear
    modules whose weights they project in the tuned model (for transformers' GaLore).

    Example:
        >>> cfg = VeloraConfig(model="llama-60m", placement="paper", num_groups=32, gc=2,
        ...                    micro_batch_size=4, grad_accum_steps=2)
        >>> to_trainer(cfg)["gradient_accumulation_steps"]
        2
    """

    model: str
    mode: str = "full"
    placement: str | None = None
    num_groups: int | None = None
    layers: dict[str, dict[str, int]] | None = None
    init: str = "batch_average_once"
    gc: bool | int = False
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    seq_len: int | None = None
    dtype: str = "fp32"
    amp: str | None = None
    optimizer: str = "adamw"
    rank: int | None = None
    update_gap: int = DEFAULT_UPDATE_GAP
    eta: float = DEFAULT_ETA
    optimizer_targets: list[str] | None = None
    lora_rank: int | None = None
    lora_targets: str | None = None
    lora_layers: int | None = None  # how many layers LoRA adapts (PEFT applies VeLoRA to all)
    task: str | None = None  # models.ModelSpec.task: causal-lm or masked-lm (the head trained)
    budget_bytes: int | None = None
    peak_bytes: int | None = None  # what the tune compared with the budget (its backend's peak)
    # The prediction by measure: allocator peak (max_memory_allocated, or the tracked tensors of
    # the estimate/cpu backends), reserved and device-level (NVML) peaks where the tune had them
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    device_used_bytes: int | None = None
    step_seconds: float | None = None
    tokens_per_second: float | None = None
    loss_increase: float | None = None
    backend: str | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    # the multi-GPU layout (velora_cli.parallel): ranks, ddp|fsdp|fsdp-no-reshard, FSDP2 CPU
    # offload, the decoder layer classes sharded one by one; batch sizes above are per rank
    world_size: int = 1
    parallel: str | None = None
    cpu_offload: bool = False
    layer_classes: list[str] | None = None
    # whose step the plan measured (velora_cli.measure.trainers): hf (the model's own loss:
    # transformers' Trainer, a plain loop) or trl (SFTTrainer's fused LM head)
    trainer: str = "hf"
    # what the user's run must also set to be the run planned (the exports write them):
    # transformers' attn_implementation (None: not recorded, the exports write sdpa, what
    # from_pretrained picks where torch has it); gradient_checkpointing_kwargs' use_reentrant;
    # QLoRA's BitsAndBytesConfig (double quant, compute dtype, quant storage) and peft's
    # prepare_model_for_kbit_training. Configs written before these load with the defaults:
    # what those tunes measured.
    attn_implementation: str | None = None
    gc_reentrant: bool = False
    double_quant: bool = True
    compute_dtype: str = "bf16"
    quant_storage: str = "uint8"
    kbit_prepare: bool = False
    # selective checkpointing policy (op, attn, mlp: velora_cli.measure.selective) and activation
    # offload (inputs, all: velora_cli.measure.host_offload); None: plain / none
    sac: str | None = None
    offload: str | None = None
    # K/V repeated to the query heads before SDPA (StepSpec.repeat_kv): the run must repeat them
    # too (older transformers, or a shim); the exports say so
    repeat_kv: bool = False
    # how the batches were planned (the tune's --padding / --packing): padded to their longest
    # (DataCollatorWithPadding), or a batch's sequences packed in one row (transformers'
    # DataCollatorWithFlattening, TRL's packing / padding_free); neither: full-length batches
    padding: bool = False
    packing: bool = False

    def __post_init__(self) -> None:
        errors = []
        if not isinstance(self.model, str) or not self.model:
            errors.append(f"model must be a non-empty string, got {self.model!r}")
        if self.mode not in MODES:
            errors.append(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.placement is not None and (
            not isinstance(self.placement, str) or not self.placement
        ):
            errors.append(f"placement must be a preset name or null, got {self.placement!r}")
        if self.num_groups is not None and not _positive_int(self.num_groups):
            errors.append(f"num_groups must be a positive integer or null, got {self.num_groups!r}")
        if self.placement is None and (self.num_groups is not None or self.layers):
            errors.append("num_groups and layers need a placement (no placement = no VeLoRA)")
        errors += _layer_errors(self.layers)
        if self.init not in INITS:
            errors.append(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        gc = self.gc
        if not isinstance(gc, bool) and not _positive_int(gc):
            errors.append(f"gc must be false, true or every-n layers (an int >= 2), got {gc!r}")
        elif gc == 1 and not isinstance(gc, bool):
            object.__setattr__(self, "gc", True)  # every 1st layer = every layer: one spelling
        errors += _memory_errors(self)
        for name in ("micro_batch_size", "grad_accum_steps"):
            if not _positive_int(getattr(self, name)):
                errors.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.seq_len is not None and not _positive_int(self.seq_len):
            errors.append(f"seq_len must be a positive integer or null, got {self.seq_len!r}")
        if self.dtype not in DTYPES:
            errors.append(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.amp is not None and self.amp not in DTYPES[1:]:
            errors.append(f"amp must be bf16, fp16 or null, got {self.amp!r}")
        errors += self._optimizer_errors()
        errors += _layout_errors(self)
        if self.trainer not in TRAINERS:
            errors.append(f"trainer must be one of {', '.join(TRAINERS)}, got {self.trainer!r}")
        errors += _recipe_errors(self)
        if self.mode in LORA_MODES and not _positive_int(self.lora_rank):
            errors.append(
                f"mode {self.mode} needs lora_rank, a positive integer, got {self.lora_rank!r}"
            )
        if self.task is not None and self.task not in TASKS:
            errors.append(f"task must be one of {', '.join(TASKS)} or null, got {self.task!r}")
        for name in (
            "budget_bytes",
            "peak_bytes",
            "allocated_bytes",
            "reserved_bytes",
            "device_used_bytes",
        ):
            value = getattr(self, name)
            if value is not None and (not _positive_int(value)):
                errors.append(f"{name} must be a positive integer (bytes) or null, got {value!r}")
        if not isinstance(self.versions, dict):
            errors.append(f"versions must be an object, got {type(self.versions).__name__}")
        if errors:
            raise ConfigError("invalid velora config: " + "; ".join(errors))

    def _optimizer_errors(self) -> list[str]:
        errors = []
        if self.optimizer not in OPTIMIZERS:
            errors.append(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        elif self.optimizer in LOWRANK_OPTIMIZERS and self.mode != "full":
            errors.append(f"optimizer {self.optimizer} needs mode full, got {self.mode!r}")
        if self.rank is not None and not _positive_int(self.rank):
            errors.append(f"rank must be a positive integer or null, got {self.rank!r}")
        if not _positive_int(self.update_gap):
            errors.append(f"update_gap must be a positive integer, got {self.update_gap!r}")
        eta = self.eta
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 < eta <= 1:
            errors.append(f"eta must be a number in (0, 1], got {eta!r}")
        targets = self.optimizer_targets
        if targets is not None and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
        ):
            errors.append(
                f"optimizer_targets must be a list of module names or null, got {targets!r}"
            )
        return errors

    @property
    def uses_velora(self) -> bool:
        return self.placement is not None

    @property
    def gc_every(self) -> int | None:
        """Checkpointing interval in layers (1 = every layer), or None without checkpointing."""
        return None if self.gc is False else 1 if self.gc is True else int(self.gc)

    def to_dict(self) -> dict[str, Any]:
        """The velora format: ``{"format": "velora-config", "version": 1, ...fields}``."""
        return {"format": FORMAT, "version": VERSION, **dataclasses.asdict(self)}


def _layout_errors(config: VeloraConfig) -> list[str]:
    parallels = ("ddp", "fsdp", "fsdp-no-reshard")  # velora_cli.parallel.PARALLEL (no torch)
    errors = []
    if not _positive_int(config.world_size):
        errors.append(f"world_size must be a positive integer, got {config.world_size!r}")
    if config.parallel is not None and config.parallel not in parallels:
        errors.append(f"parallel must be one of {', '.join(parallels)} or null")
    elif config.parallel is None and config.world_size != 1:
        errors.append("world_size > 1 needs a parallel strategy (ddp, fsdp, fsdp-no-reshard)")
    if config.cpu_offload and not (config.parallel or "").startswith("fsdp"):
        errors.append("cpu_offload is FSDP2's CPUOffloadPolicy: it needs parallel fsdp*")
    # measure.layout's reasons: GaLore/AdaRankGrad project whole gradients; Adafactor and the
    # bitsandbytes optimizers cannot step FSDP2's DTensor parameters
    if (config.parallel or "").startswith("fsdp") and (
        config.optimizer in LOWRANK_OPTIMIZERS or config.optimizer in FSDP_INCOMPATIBLE_OPTIMIZERS
    ):
        errors.append(f"optimizer {config.optimizer} does not run under FSDP2: use parallel ddp")
    return errors


def _recipe_errors(config: VeloraConfig) -> list[str]:
    errors = []
    attn = config.attn_implementation
    if attn is not None and not isinstance(attn, str):
        errors.append(f"attn_implementation must be a name ({', '.join(ATTN_IMPLEMENTATIONS)})")
    if config.padding is True and config.packing is True:
        errors.append("padding and packing exclude each other: a packed row has no padding")
    for name in ("gc_reentrant", "double_quant", "kbit_prepare", "padding", "packing"):
        if not isinstance(getattr(config, name), bool):
            errors.append(f"{name} must be true or false, got {getattr(config, name)!r}")
    if config.compute_dtype not in DTYPES:
        errors.append(f"compute_dtype must be one of {', '.join(DTYPES)}")
    if config.quant_storage not in QUANT_STORAGES:
        errors.append(f"quant_storage must be one of {', '.join(QUANT_STORAGES)}")
    return errors


def _memory_errors(config: VeloraConfig) -> list[str]:
    from velora_cli.measure.train_step import OFFLOAD_KINDS, SAC_POLICIES  # plain names

    errors = []
    if config.sac is not None and config.sac not in SAC_POLICIES:
        errors.append(f"sac must be one of {', '.join(SAC_POLICIES)} or null, got {config.sac!r}")
    elif config.sac is not None and config.gc is False:
        errors.append("sac (selective checkpointing) needs gc")
    if config.offload is not None and config.offload not in OFFLOAD_KINDS:
        errors.append(
            f"offload must be one of {', '.join(OFFLOAD_KINDS)} or null, got {config.offload!r}"
        )
    elif config.offload == "inputs" and config.gc is False:
        errors.append("offload inputs (checkpoint inputs in host memory) needs gc")
    return errors


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _layer_errors(layers: Any) -> list[str]:
    if layers is None:
        return []
    if not isinstance(layers, dict):
        return [f"layers must map layer names to {{in_features, sub_token_size}}, got {layers!r}"]
    errors = []
    for name, entry in layers.items():
        d = entry.get("in_features") if isinstance(entry, dict) else None
        m = entry.get("sub_token_size") if isinstance(entry, dict) else None
        if not (_positive_int(d) and _positive_int(m)):
            errors.append(f"layers[{name!r}] needs positive in_features and sub_token_size")
        elif d % m:
            errors.append(f"layers[{name!r}]: sub_token_size {m} does not divide in_features {d}")
    return errors


# -- reading ------------------------------------------------------------------------------------


def from_tune_document(document: dict[str, Any], source: str | None = None) -> VeloraConfig:
    """The recommendation of a ``velora tune`` document as a `VeloraConfig`.

    Raises:
        ConfigError: the document has no recommendation (nothing fitted the budget) or is not a
            tune document.
    """
    rec = document.get("recommendation")
    where = f"{source}: " if source else ""
    if not isinstance(rec, dict):
        raise ConfigError(
            f"{where}the tune found no configuration within its budget, so there is nothing to "
            "export; rerun velora tune with a larger --budget"
        )
    settings = document.get("settings", {})
    env = document.get("environment", {})
    versions = {k: env.get(k) for k in ("torch", "transformers", "peft", "python") if k in env}
    versions["velora"] = document.get("velora_version")
    lora = rec.get("mode") in LORA_MODES
    lowrank = rec.get("optimizer") in LOWRANK_OPTIMIZERS
    return VeloraConfig(
        model=document.get("model"),
        mode=rec.get("mode", "full"),
        placement=rec.get("placement"),
        num_groups=rec.get("num_groups"),
        layers=rec.get("velora_layers") or None,
        init=settings.get("init", "batch_average_once"),
        gc=rec.get("gc", False),
        micro_batch_size=rec.get("micro_batch_size", 1),
        grad_accum_steps=rec.get("grad_accum_steps", 1),
        seq_len=document.get("seq_len"),
        dtype=document.get("dtype", "fp32"),
        amp=document.get("amp"),
        optimizer=rec.get("optimizer", "adamw"),
        rank=(rec.get("optimizer_rank_cap") or settings.get("rank")) if lowrank else None,
        update_gap=settings.get("update_gap", DEFAULT_UPDATE_GAP),
        eta=settings.get("eta", DEFAULT_ETA),
        optimizer_targets=rec.get("optimizer_targets") if lowrank else None,
        lora_rank=settings.get("lora_rank") if lora else None,
        lora_targets=settings.get("lora_targets") if lora else None,
        lora_layers=rec.get("lora_layers") if lora else None,
        task=rec.get("task", document.get("task")),
        budget_bytes=rec.get("budget_bytes", document.get("budget_bytes")),
        peak_bytes=rec.get("peak_bytes"),
        **_predicted(rec),
        # a verification run the tune flagged as timing noise gives no throughput to plan with
        step_seconds=None if rec.get("timing_noise") else rec.get("step_seconds"),
        tokens_per_second=None if rec.get("timing_noise") else rec.get("tokens_per_second"),
        loss_increase=rec.get("loss_increase"),
        backend=rec.get("backend", document.get("backend")),
        versions=versions,
        source=source,
        world_size=rec.get("world_size") or 1,
        parallel=rec.get("parallel"),
        layer_classes=rec.get("layer_classes"),
        trainer=settings.get("trainer", "hf"),
        **_recipe(rec, settings),
        sac=rec.get("sac"),
        offload=rec.get("offload"),
    )


def _recipe(rec: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The recipe fields of a tune's recommendation (tunes from before them: the defaults)."""
    attn = rec.get("attn_implementation", settings.get("attn_implementation"))
    if attn is None and settings.get("attn") not in (None, "auto"):
        attn = settings["attn"]  # the tune's --attn (StepSpec.attn): HF's attn_implementation
    return {
        "attn_implementation": attn if isinstance(attn, str) else None,
        "gc_reentrant": bool(settings.get("gc_reentrant", False)),
        "double_quant": settings.get("double_quant", True),
        "compute_dtype": settings.get("compute_dtype", "bf16"),
        "quant_storage": settings.get("quant_storage", "uint8"),
        "kbit_prepare": bool(settings.get("kbit_prepare")) and rec.get("mode") == "qlora",
        "repeat_kv": bool(settings.get("repeat_kv", False)),
        "padding": bool(settings.get("padding")),
        "packing": bool(settings.get("packing")),
    }


def _predicted(rec: dict[str, Any]) -> dict[str, int | None]:
    """The recommendation's peaks by measure. On cuda the tune's ``peak_bytes`` is the
    device-level peak and the allocator's is ``allocator_peak_bytes``; on the estimate and cpu
    backends ``peak_bytes`` is the tracked tensor peak, which predicts the allocator's."""
    allocated = rec.get("allocator_peak_bytes")
    if allocated is None and rec.get("peak_source") is None:
        allocated = rec.get("peak_bytes")
    return {
        "allocated_bytes": allocated,
        "reserved_bytes": rec.get("reserved_bytes"),
        "device_used_bytes": rec.get("device_used_bytes"),
    }


def load_config(path_or_dict: str | os.PathLike | dict[str, Any]) -> VeloraConfig:
    """Read a velora-format config (or the recommendation of a tune document).

    Args:
        path_or_dict: a JSON file written by ``velora export-config`` or ``velora tune``, or the
            parsed dict.

    Returns:
        The validated config.

    Raises:
        FileNotFoundError: no file at the path.
        ConfigError: not JSON, not a velora config (a peft/trainer export, an unknown format),
            unknown fields, or invalid values (all listed together).
    """
    source = None
    if isinstance(path_or_dict, dict):
        data = path_or_dict
    else:
        path = Path(path_or_dict)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no config file at {path}; write one with velora export-config"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                "write a fresh one with velora export-config"
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a text file; pass a velora config JSON") from None
    where = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}expected a JSON object, got {type(data).__name__}")
    if "recommendation" in data and "candidates" in data:
        return from_tune_document(data, source)
    if "rows" in data and "settings" in data:  # what velora profile saves
        model = data.get("model") or "MODEL"
        raise ConfigError(
            f"{where}this is a profile document (velora profile), not a tune document: a profile "
            "measures strategies and recommends none; run velora tune "
            f"{model} --budget SIZE and export its document"
        )
    if data.get("kind") == "velora-run":
        raise ConfigError(
            f"{where}this is a run record (VeloraCallback's), not a tune document: export the "
            "tune document the run was planned from (velora export-config --from tune-*.json), "
            f"or set the run beside a prediction with velora profile --compare {source or 'RUN'}"
        )
    kind = data.get("format")
    if kind in ("trl", "trainer") and isinstance(data.get("velora"), dict):
        data = data["velora"]  # trl/trainer exports carry the velora config they came from
        kind = data.get("format")
    if kind != FORMAT:
        hint = (
            f"it is a {kind} export; "
            if kind in ("peft", "trainer", "trl")
            else "no 'format': 'velora-config' field; "
        )
        raise ConfigError(
            f"{where}not a velora config ({hint}use velora export-config --format velora)"
        )
    if data.get("version") != VERSION:
        raise ConfigError(
            f"{where}velora config version {data.get('version')!r}; this velora reads {VERSION}"
        )
    names = {f.name for f in dataclasses.fields(VeloraConfig)}
    fields_ = {k: v for k, v in data.items() if k not in ("format", "version")}
    unknown = sorted(set(fields_) - names)
    if unknown:
        raise ConfigError(
            f"{where}unknown fields {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    try:
        return VeloraConfig(**fields_)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    except TypeError as exc:  # a missing required field
        raise ConfigError(f"{where}{exc}") from None


# -- applying to a model ------------------------------------------------------------------------


def apply_config(
    model,
    path_or_dict: str | os.PathLike | dict[str, Any] | VeloraConfig,
    *,
    checkpointing: bool = True,
) -> list[str]:
    """Apply a velora config to ``model`` in place: VeLoRA layers, sizes, init, checkpointing.

    The layers the config's placement selects in ``model`` must be the ones the tune wrapped,
    with the same widths; nothing is changed unless they are.

    Args:
        model: the Hugging Face model to train (wrapped with peft first for a LoRA config).
        path_or_dict: a velora config file, its dict, a tune document, or a `VeloraConfig`.
        checkpointing: also enable the config's gradient checkpointing, selective or not, and
            the offload of checkpoint inputs (False when the HF Trainer does it from
            ``TrainingArguments``); ``offload="all"`` is set up in either case.

    Returns:
        The qualified names of the wrapped layers (empty when the config uses no VeLoRA).

    Raises:
        ConfigError: the model does not match the config (missing layers, other widths, no LoRA
            layers for a LoRA config), or checkpointing is not supported by the model.
    """
    from velora_cli.methods.placement import PlacementError, apply_velora, select_layers
    from velora_cli.methods.velora import SubTokenSizeError

    config = path_or_dict if isinstance(path_or_dict, VeloraConfig) else load_config(path_or_dict)
    has_lora = any(hasattr(m, "lora_A") for m in model.modules())
    if config.mode in LORA_MODES and not has_lora:
        raise ConfigError(
            f"this config was tuned for LoRA (rank {config.lora_rank}, targets "
            f"{config.lora_targets}); wrap the model with peft.get_peft_model first"
        )
    if config.mode == "full" and has_lora:
        raise ConfigError(
            "this config was tuned for full fine-tuning, but the model has LoRA layers"
        )
    sizes: dict[str, int] | None = None
    if config.uses_velora:
        try:
            selected = _targets(select_layers(model, config.placement))
        except PlacementError as exc:
            raise ConfigError(str(exc)) from None
        if config.layers:
            errors = _layer_mismatches(config.layers, selected)
            if errors:
                raise ConfigError(
                    f"the model does not match the tuned config ({config.model}): "
                    + "; ".join(errors)
                )
            sizes = {name: entry["sub_token_size"] for name, entry in config.layers.items()}
    wrapped: list[str] = []
    if config.uses_velora:
        try:
            wrapped = apply_velora(
                model,
                config.placement,  # selects exactly config.layers (checked above)
                sub_token_size=_exact_sizes(sizes) if sizes else None,
                num_groups=None if sizes else config.num_groups,
                init=config.init,
            )
        except (PlacementError, SubTokenSizeError) as exc:
            raise ConfigError(str(exc)) from None
    if checkpointing and config.gc_every:
        from velora_cli.measure.train_step import SpecError, enable_checkpointing

        try:
            enable_checkpointing(
                model, config.gc_every, reentrant=config.gc_reentrant, sac=config.sac
            )
        except SpecError as exc:
            raise ConfigError(str(exc)) from None
    if config.offload and (checkpointing or config.offload == "all"):
        from velora_cli.measure.host_offload import enable_offload

        try:
            enable_offload(model, config.offload)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return wrapped


def make_optimizer(
    model, path_or_dict: str | os.PathLike | dict[str, Any] | VeloraConfig, *, lr: float
):
    """The optimizer the config was tuned with, over ``model``'s trainable parameters.

    AdamW and SGD (momentum 0.9) as ``torch.optim`` builds them, the HF Trainer's names
    (fused/for-loop AdamW, bitsandbytes 8-bit and paged AdamW, Adafactor) as the Trainer builds
    them (`velora_cli.methods.optimizers`); galore and adarankgrad as
    `velora_cli.methods.lowrank` does (2-D weights projected, embeddings and the output layer plain
    AdamW), with the config's rank (None: the model's hidden size / 4), update gap and η. Call it
    after `apply_config` (VeLoRA keeps the layers' parameters, so either order works).

    Args:
        model: the model to train (after ``peft.get_peft_model`` for a LoRA config).
        path_or_dict: a velora config file, its dict, a tune document, or a `VeloraConfig`.
        lr: the learning rate (the tune does not choose one; GaLore's paper pre-trains at 1e-2,
            AdamW at 1e-3).

    Returns:
        A ``torch.optim.Optimizer``.

    Raises:
        ConfigError: a low-rank optimizer without a rank for a model that has no
            ``config.hidden_size``, or a setting out of range.

    Example:
        >>> apply_config(model, "velora-config.json")
        >>> optimizer = make_optimizer(model, "velora-config.json", lr=1e-3)
        >>> trainer = Trainer(model=model, args=args, optimizers=(optimizer, None))
    """
    from velora_cli.measure.train_step import SpecError, build_optimizer

    config = path_or_dict if isinstance(path_or_dict, VeloraConfig) else load_config(path_or_dict)
    try:
        return build_optimizer(
            config.optimizer,
            model,
            lr=lr,
            rank=config.rank,
            update_gap=config.update_gap,
            eta=config.eta,
        )
    except SpecError as exc:
        raise ConfigError(str(exc)) from None


def _targets(selected: dict) -> dict[str, int]:
    """Selected layers → {name of the module VeLoRA wraps: in_features}; LoRA → its A layers."""
    from velora_cli.methods.placement import _in_features

    out = {}
    for name, module in selected.items():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and hasattr(lora_a, "items"):
            for adapter, layer in lora_a.items():
                out[f"{name}.lora_A.{adapter}"] = layer.in_features
        else:
            out[name] = _in_features(module)
    return out


def _layer_mismatches(expected: dict[str, dict[str, int]], found: dict[str, int]) -> list[str]:
    errors = []
    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected]
    if missing:
        errors.append(f"{len(missing)} tuned layers are not in the model (e.g. {missing[0]})")
    if extra:
        errors.append(f"{len(extra)} model layers were not tuned (e.g. {extra[0]})")
    for name, entry in expected.items():
        if name in found and found[name] != entry["in_features"]:
            errors.append(
                f"{name} has in_features {found[name]}, the config {entry['in_features']}"
            )
    return errors


def _exact_sizes(sizes: dict[str, int]) -> dict[str, int]:
    # "[.]" is fnmatch for a literal dot: a glob that matches this one name only, where
    # apply_velora would match a plain string as a substring of a longer name
    return {name.replace(".", "[.]"): m for name, m in sizes.items()}
