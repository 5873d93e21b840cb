"""Was the model prepared as the plan says? What a training run really set up, against the plan.

`observe` reads a model (and the Trainer's arguments and optimizer) as plain data: VeLoRA layers
and their sub-token sizes (velora's own, and PEFT's ``velora_config`` ones), LoRA adapters, 4-bit
base layers, which decoder layers checkpoint, micro-batch and accumulation, autocast, the
parameters' dtypes, the optimizer. `mismatches` compares that with a `VeloraConfig`, one line
per difference, each saying what to do. `velora_cli.runs.callback.VeloraCallback` runs both at train
begin; they take no Trainer, so they are tested on bare models too.
"""

from __future__ import annotations

from typing import Any

from velora_cli.configs import LORA_MODES, VeloraConfig

DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# What a wrapper adds in front of module names: DDP/accelerate (module.), torch.compile
# (_orig_mod.); PEFT's base_model.model. is kept (velora's plan records it too).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# what runs each planned optimizer: (package, class name in lower case, fused flag or None for
# either); torch's AdamW/SGD, velora's GaLoreAdamW and AdaRankGrad, galore-torch's GaLoreAdamW
# (transformers' galore_adamw), bitsandbytes' AdamW (the Trainer builds bnb.optim.AdamW for its
# 8-bit and paged names), transformers' Adafactor
OPTIMIZER_CLASSES: dict[str, set[tuple[str, str, bool | None]]] = {
    "adamw": {("torch", "adamw", False)},
    "adamw_torch": {("torch", "adamw", False)},
    "adamw_torch_fused": {("torch", "adamw", True)},
    "adamw_torch_forloop": {("torch", "adamw", False)},
    "sgd": {("torch", "sgd", None)},
    "galore": {("velora_cli", "galoreadamw", None), ("galore_torch", "galoreadamw", None)},
    "adarankgrad": {("velora_cli", "adarankgrad", None)},
    "adafactor": {("transformers", "adafactor", None)},
    **{
        name: {("bitsandbytes", "adamw", None), ("bitsandbytes", cls, None)}
        for name, cls in (
            ("adamw_bnb_8bit", "adamw8bit"),
            ("adamw_8bit", "adamw8bit"),
            ("paged_adamw_8bit", "pagedadamw8bit"),
            ("paged_adamw_32bit", "pagedadamw32bit"),
        )
    },
}


def optimizer_matches(planned: str, seen: dict[str, Any]) -> bool:
    """Whether the optimizer ``observe`` saw runs the planned one (unknown: assume it does)."""
    from velora_cli.methods.optimizer_names import OPTIMIZER_INFO

    info = OPTIMIZER_INFO.get(planned)
    if info is not None and info.family == "bnb":
        if seen.get("optimizer_paged", info.paged) != info.paged:
            return False
        if seen.get("optimizer_bits", info.bits) != info.bits:
            return False
    package = seen.get("optimizer_package")
    name = seen["optimizer"].lower()
    fused = seen.get("optimizer_fused")
    for want_package, want_name, want_fused in OPTIMIZER_CLASSES.get(planned, ()):
        if name != want_name or (package is not None and package != want_package):
            continue
        if want_fused is None or fused is None or bool(fused) == want_fused:
            return True
    return planned not in OPTIMIZER_CLASSES


def plain_name(name: str) -> str:
    """A module name without the prefixes DDP, accelerate or torch.compile put in front."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def velora_layers_of(model) -> dict[str, dict[str, Any]]:
    """Every VeLoRA layer of ``model``: ``{name: {in_features, sub_token_size, by}}``.

    ``by`` is ``velora`` for velora's layers and ``peft`` for PEFT's ``velora_config`` (its
    sub-token size is ``ceil(in_features / num_groups)``; the name is that of the A projection
    it compresses, as velora names it).
    """
    from velora_cli.methods.velora import is_velora

    found = {}
    for name, module in model.named_modules():
        if is_velora(module):
            found[plain_name(name)] = {
                "in_features": module.in_features,
                "sub_token_size": module.sub_token_size,
                "by": "velora",
            }
        for adapter, groups in (getattr(module, "lora_velora_num_groups", None) or {}).items():
            width = module.in_features
            found[plain_name(f"{name}.lora_A.{adapter}")] = {
                "in_features": width,
                "sub_token_size": -(-width // groups),
                "by": "peft",
            }
    return found


def checkpointed_layers(model) -> tuple[int, list[int]]:
    """(decoder layers, indices of those that checkpoint) from transformers' per-layer flags."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 4.52: no per-layer class
        GradientCheckpointingLayer = None  # noqa: N806
    layers = [
        m
        for m in model.modules()
        if GradientCheckpointingLayer is not None and isinstance(m, GradientCheckpointingLayer)
    ]
    if not layers:  # older models: one flag for the whole stack
        flags = [bool(m.gradient_checkpointing) for m in model.modules()
                 if isinstance(getattr(m, "gradient_checkpointing", None), bool)]  # fmt: skip
        return (1, [0]) if any(flags) else (1, [])
    return len(layers), [
        i for i, m in enumerate(layers) if getattr(m, "gradient_checkpointing", False)
    ]


def memory_setup(model, args=None) -> dict[str, str | None]:
    """The selective checkpointing and activation offload a run set up, from the first
    checkpointed layer's checkpoint function (as transformers stores it) and the model.

    ``sac``: velora's policy name (its ``context_fn`` carries it), ``"other"`` for another
    ``context_fn`` (a policy velora did not measure), None for plain checkpointing. ``offload``:
    ``inputs`` (transformers' offload=True or velora's, around each checkpoint), ``all``
    (velora's hooks on the model, or TRL's ``activation_offloading``), or None.
    """
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 4.52: no per-layer class, no per-layer function
        return {
            "sac": None,
            "offload": "all" if hasattr(model, "_velora_offload_handles") else None,
        }
    func = next(
        (
            m._gradient_checkpointing_func
            for m in model.modules()
            if isinstance(m, GradientCheckpointingLayer)
            and getattr(m, "gradient_checkpointing", False)
            and hasattr(m, "_gradient_checkpointing_func")
        ),
        None,
    )
    sac = offload = None
    if func is not None:
        inner = getattr(func, "__wrapped__", func)  # velora's offload wraps the partial
        context_fn = getattr(inner, "keywords", {}).get("context_fn")
        if context_fn is not None:
            sac = getattr(context_fn, "velora_sac", "other")
        wrapped = getattr(inner, "func", None)
        # transformers' offload=True: partial(checkpoint_func) where checkpoint_func enters
        # save_on_cpu (modeling_utils._activation_checkpointing_enable)
        names = getattr(getattr(wrapped, "__code__", None), "co_names", ())
        if getattr(func, "_velora_offload", False) or "save_on_cpu" in names:
            offload = "inputs"
    if hasattr(model, "_velora_offload_handles") or getattr(args, "activation_offloading", False):
        offload = "all"
    return {"sac": sac, "offload": offload}


def gc_every(layers: int, checkpointed: list[int]) -> int | str | None:
    """The checkpointing interval the indices show: None, n (layers 0, n, 2n, ...) or
    ``"irregular"``."""
    if not checkpointed:
        return None
    step = checkpointed[1] - checkpointed[0] if len(checkpointed) > 1 else layers
    if checkpointed == list(range(0, layers, step)):
        return 1 if step == 1 else step
    return "irregular"


# the shapes that decide a step's memory, from the (text) config: compared plan against run
SHAPE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def _shapes(config) -> dict[str, Any]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {k: getattr(text, k, None) for k in SHAPE_KEYS}


def model_facts(model) -> dict[str, Any]:
    """What model a run trains: its class, its name (``config._name_or_path``: a hub id, a
    directory or a velora built-in's name; None when unknown) and its shapes (`SHAPE_KEYS`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(base, "module", base)  # a DDP wrapper
    config = getattr(base, "config", None)
    facts: dict[str, Any] = {
        "architecture": type(base).__name__,
        "name": (getattr(config, "_name_or_path", None) or None) if config is not None else None,
    }
    if config is not None:
        facts.update(_shapes(config))
    return facts


def planned_model(config: VeloraConfig) -> dict[str, Any] | None:
    """The plan's model as `model_facts` says it (resolved from its name: built-ins offline);
    None when the name cannot be resolved here (then the model is not compared)."""
    from velora_cli.models import ModelError, resolve_model

    try:
        spec = resolve_model(config.model)
    except (ModelError, OSError, ValueError):
        return None
    architectures = getattr(spec.config, "architectures", None) or [None]
    return {"architecture": architectures[0], "name": config.model, **_shapes(spec.config)}


def describe_model(facts: dict[str, Any]) -> str:
    """``LlamaForCausalLM (hidden 64, 2 layers, MLP 192, vocab 1024)``."""
    shapes = (
        f"hidden {facts.get('hidden_size')}, {facts.get('num_hidden_layers')} layers, MLP "
        f"{facts.get('intermediate_size')}, vocab {facts.get('vocab_size')}"
    )
    return f"{facts.get('architecture') or facts.get('model_type')} ({shapes})"


def is_sharded(model) -> bool:
    """Whether FSDP2 sharded the model's parameters (they are DTensors)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def trainer_of(model) -> str:
    """``trl`` when TRL's ``add_fused_lm_head`` patched the model's forward (SFTTrainer does it
    in ``__init__``), else ``hf``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = getattr(base.forward, "__func__", base.forward)
    code = getattr(forward, "__code__", None)
    return "trl" if code is not None and "fused_lm_head" in code.co_varnames else "hf"


def run_model_name(config: VeloraConfig, seen: dict[str, Any]) -> str:
    """The name a run record carries: the plan's model when the run trained it, else the
    trained model's own name (or its class and shapes when it has none)."""
    facts = seen.get("model") or {}
    if not seen.get("model_differs"):
        return config.model
    return facts.get("name") or (
        f"{facts.get('architecture')}-h{facts.get('hidden_size')}-l{facts.get('num_hidden_layers')}"
    )


def observe(model, args=None, optimizer=None) -> dict[str, Any]:
    """What a run set up, as plain data (the run record's ``observed``).

    Args:
        model: the model being trained (the Trainer's, after it enabled checkpointing).
        args: the ``TrainingArguments`` (micro-batch, accumulation, autocast, world size).
        optimizer: the optimizer (an accelerate wrapper is looked through).
    """
    from velora_cli.methods.quant import is_quantized

    lora = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m.lora_A, "items")]
    ranks = sorted({r for m in lora for r in getattr(m, "r", {}).values()})
    quantized = [m for m in model.modules() if is_quantized(m)]
    packed = {id(m.weight) for m in quantized}
    trained, frozen = set(), set()
    for p in model.parameters():
        if id(p) in packed:
            continue
        name = DTYPE_NAMES.get(str(p.dtype).removeprefix("torch."), str(p.dtype))
        (trained if p.requires_grad else frozen).add(name)
    layers, checkpointed = checkpointed_layers(model)
    out: dict[str, Any] = {
        "velora_layers": velora_layers_of(model),
        "lora_layers": len(lora),
        "lora_ranks": ranks,
        "quantized_layers": len(quantized),
        "decoder_layers": layers,
        "checkpointed_layers": len(checkpointed),
        "gc_every": gc_every(layers, checkpointed),
        **memory_setup(model, args),
        "trained_dtypes": sorted(trained),
        "frozen_dtypes": sorted(frozen),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "model": model_facts(model),
        "sharded": is_sharded(model),
        "trainer": trainer_of(model),
    }
    if args is not None:
        out.update(
            micro_batch_size=args.per_device_train_batch_size,
            grad_accum_steps=args.gradient_accumulation_steps,
            world_size=args.world_size,
            amp="bf16" if args.bf16 else "fp16" if args.fp16 else None,
            auto_find_batch_size=bool(getattr(args, "auto_find_batch_size", False)),
        )
    if optimizer is not None:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        out["optimizer"] = type(inner).__name__
        out["optimizer_package"] = type(inner).__module__.split(".")[0]
        defaults = getattr(inner, "defaults", {}) or {}
        if "fused" in defaults:  # torch's AdamW: fused or not (foreach/for-loop)
            out["optimizer_fused"] = bool(defaults["fused"])
        if hasattr(inner, "is_paged"):  # bitsandbytes: paged state, 8 or 32 bits
            out["optimizer_paged"] = bool(inner.is_paged)
            bits = getattr(getattr(inner, "args", None), "optim_bits", None)
            if bits is not None:
                out["optimizer_bits"] = bits
    return out


def planned_layers(config: VeloraConfig) -> dict[str, dict[str, int]] | None:
    """The layers the plan compresses that train (None when it did not record them)."""
    if not config.layers:
        return None
    layers = {plain_name(n): e for n, e in config.layers.items()}
    if config.mode in LORA_MODES:  # older tunes also listed frozen base linears (no effect)
        layers = {n: e for n, e in layers.items() if ".lora_A." in n}
    return layers


def mismatches(config: VeloraConfig, seen: dict[str, Any]) -> list[str]:
    """Each way the run differs from the plan, one line saying what to do (empty: as planned)."""
    from velora_cli.methods.precision import describe

    out = _model_mismatches(config, seen) + _layout_mismatches(config, seen)
    out += _lora_mismatches(config, seen) + _velora_mismatches(config, seen)
    planned_gc = config.gc_every
    if seen["gc_every"] != planned_gc:
        want = "no checkpointing" if planned_gc is None else _every(planned_gc)
        got = "none" if seen["gc_every"] is None else _every(seen["gc_every"])
        out.append(
            f"checkpointing: the plan has {want}, the model has {got} ("
            + (
                "set activation_checkpointing=False: TRL's SFTConfig turns it on by default)"
                if planned_gc is None
                else "set activation_checkpointing=True and activation_checkpointing_kwargs="
                f"{{'use_reentrant': {config.gc_reentrant}{_n(planned_gc)}}})"
            )
        )
    out += _memory_mismatches(config, seen)
    if "micro_batch_size" in seen:
        if seen["micro_batch_size"] != config.micro_batch_size:
            out.append(
                f"micro-batch: per_device_train_batch_size={seen['micro_batch_size']}, the plan "
                f"{config.micro_batch_size}"
            )
        if seen["grad_accum_steps"] != config.grad_accum_steps:
            out.append(
                f"accumulation: gradient_accumulation_steps={seen['grad_accum_steps']}, the plan "
                f"{config.grad_accum_steps}"
            )
        if seen.get("auto_find_batch_size"):
            out.append("auto_find_batch_size=True may change the micro-batch the plan measured")
        if seen["amp"] != config.amp:
            out.append(
                f"autocast: the run has {seen['amp'] or 'none'}, the plan "
                f"{config.amp or 'none'} (set bf16={config.amp == 'bf16'}, "
                f"fp16={config.amp == 'fp16'})"
            )
    planned = describe(config.mode, config.dtype, config.amp)
    if seen["trained_dtypes"] and seen["trained_dtypes"] != [planned.trained]:
        hint = ""
        if config.mode == "qlora" and "bf16" in seen["trained_dtypes"]:
            hint = " (TRL's SFTTrainer casts a 4-bit model's adapters to bf16: cast them back)"
        out.append(
            f"trained parameters are {'/'.join(seen['trained_dtypes'])}, the plan measured "
            f"{planned.trained}{hint}"
        )
    if planned.frozen and seen["frozen_dtypes"] and seen["frozen_dtypes"] != [planned.frozen]:
        out.append(
            f"frozen parameters are {'/'.join(seen['frozen_dtypes'])}, the plan measured "
            f"{planned.frozen} (load the model with that dtype)"
        )
    if seen.get("optimizer") and not optimizer_matches(config.optimizer, seen):
        out.append(
            f"optimizer: {seen['optimizer']}, the plan measured {config.optimizer} (velora "
            "export-config --format trainer/trl sets optim)"
        )
    return out


def _model_mismatches(config: VeloraConfig, seen: dict[str, Any]) -> list[str]:
    """Another model than the plan's (architecture or shapes); sets ``seen["model_differs"]``."""
    facts, planned = seen.get("model"), planned_model(config)
    if not facts or planned is None:
        return []
    keys = [k for k in SHAPE_KEYS if planned.get(k) is not None and facts.get(k) is not None]
    differs = [k for k in keys if planned[k] != facts[k]]
    if planned["architecture"] and facts["architecture"] != planned["architecture"]:
        differs.insert(0, "architecture")
    seen["model_differs"] = bool(differs)
    if not differs:
        return []
    name = f" {facts['name']}" if facts.get("name") else ""
    return [
        f"model: the run trains{name} {describe_model(facts)}, the plan {config.model} "
        f"{describe_model(planned)} (differs in {', '.join(differs)}): the plan's figures are "
        f"for another model; plan this one (velora tune{name or ' MODEL'})"
    ]


def _layout_mismatches(config: VeloraConfig, seen: dict[str, Any]) -> list[str]:
    """World size, sharding and whose step (hf or TRL's) against the plan."""
    out = []
    world = seen.get("world_size")
    if world is not None and world != config.world_size:
        out.append(
            f"world size: the run has {world} process{'es' if world != 1 else ''}, the plan "
            f"{config.world_size} ({config.parallel or 'one process'}): per-rank memory differs; "
            + (
                "launch it as planned (velora export-config --format torchrun or accelerate)"
                if config.world_size > 1
                else "plan this layout (velora tune --world-size N)"
            )
        )
    planned_sharded = (config.parallel or "").startswith("fsdp")
    if "sharded" in seen and seen["sharded"] != planned_sharded and (world or 1) > 1:
        out.append(
            "sharding: the plan "
            + ("shards parameters with FSDP2" if planned_sharded else "does not shard")
            + ", the run's parameters "
            + ("are" if seen["sharded"] else "are not")
            + " sharded (velora export-config --format accelerate or torchrun shards as planned)"
        )
    ran = seen.get("trainer")
    if ran and ran != config.trainer:
        out.append(
            f"step: the run computes the {ran} step, the plan measured the {config.trainer} step "
            + (
                "(TRL's SFTTrainer: plan it with velora tune --trainer trl)"
                if ran == "trl"
                else "(plan it without --trainer trl)"
            )
        )
    return out


def _lora_mismatches(config: VeloraConfig, seen: dict[str, Any]) -> list[str]:
    out = []
    lora = seen["lora_layers"]
    if config.mode in LORA_MODES and not lora:
        out.append(
            f"LoRA: the plan trains adapters (rank {config.lora_rank}, targets "
            f"{config.lora_targets}), the model has none: wrap it with peft.get_peft_model or "
            "pass peft_config to SFTTrainer"
        )
    elif config.mode == "full" and lora:
        out.append(f"LoRA: the plan is a full fine-tune, the model has {lora} LoRA adapters")
    elif lora:
        if config.lora_layers is not None and lora != config.lora_layers:
            out.append(f"LoRA: {lora} adapters, the plan {config.lora_layers} (--lora-targets)")
        if config.lora_rank and seen["lora_ranks"] != [config.lora_rank]:
            out.append(f"LoRA rank {seen['lora_ranks']}, the plan {config.lora_rank}")
    if config.mode == "qlora" and not seen["quantized_layers"]:
        out.append(
            "QLoRA: the base is not 4-bit; load it with quantization_config="
            "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', ...)"
        )
    elif config.mode != "qlora" and seen["quantized_layers"]:
        out.append(f"the base has {seen['quantized_layers']} 4-bit layers; the plan has none")
    return out


def _velora_mismatches(config: VeloraConfig, seen: dict[str, Any]) -> list[str]:
    found = seen["velora_layers"]
    if not config.uses_velora:
        if found:
            return [f"VeLoRA on {len(found)} layers, the plan has none (e.g. {next(iter(found))})"]
        return []
    planned = planned_layers(config)
    fix = "call velora_cli.apply_config(model, config) before building the Trainer"
    if planned is None:  # the plan names a placement and a number of groups only
        if not found:
            return [f"VeLoRA: the plan compresses placement {config.placement!r}, no layer is "
                    f"wrapped: {fix}"]  # fmt: skip
        bad = [n for n, e in found.items()
               if config.num_groups and e["in_features"] // e["sub_token_size"] != config.num_groups]  # fmt: skip
        return (
            [f"VeLoRA: {len(bad)} layers not at g{config.num_groups} (e.g. {bad[0]})"]
            if bad
            else []
        )
    out = []
    missing = [n for n in planned if n not in found]
    extra = [n for n in found if n not in planned]
    if missing:
        out.append(
            f"VeLoRA: {len(planned) - len(missing)} of {len(planned)} planned layers are wrapped "
            f"(missing e.g. {missing[0]}): {fix}"
        )
    if extra:
        out.append(f"VeLoRA on {len(extra)} layers the plan does not compress (e.g. {extra[0]})")
    other = [
        (n, found[n]["sub_token_size"], e["sub_token_size"])
        for n, e in planned.items()
        if n in found and found[n]["sub_token_size"] != e["sub_token_size"]
    ]
    if other:
        name, got, want = other[0]
        out.append(
            f"VeLoRA: {len(other)} layers with other sub-token sizes (e.g. {name}: {got}, "
            f"planned {want})"
        )
    return out


def _memory_mismatches(config: VeloraConfig, seen: dict[str, Any]) -> list[str]:
    """Selective checkpointing and offload: the plan's against the run's (records written
    before these were observed have neither key and are not checked)."""
    out = []
    if "sac" in seen and seen["sac"] != config.sac and config.gc_every is not None:
        want = f"selective checkpointing ({config.sac})" if config.sac else "plain checkpointing"
        got = {None: "plain", "other": "a policy velora did not measure"}.get(
            seen["sac"], seen["sac"]
        )
        out.append(
            f"checkpointing kind: the plan has {want}, the run has {got} ("
            + (
                "set it up with velora_cli.apply_config(model, config) and leave the trainer's "
                "activation_checkpointing off"
                if config.sac
                else "drop the context_fn from the checkpointing kwargs"
            )
            + ")"
        )
    if "offload" in seen and seen["offload"] != config.offload:
        want = f"offload {config.offload}" if config.offload else "no activation offload"
        got = f"offload {seen['offload']}" if seen["offload"] else "none"
        fix = {
            "inputs": "activation_checkpointing_kwargs={'use_reentrant': False, 'offload': True}",
            "all": "TRL's activation_offloading=True or velora_cli.apply_config",
            None: "turn offload off: the plan's device memory includes the activations",
        }[config.offload]
        out.append(f"activation offload: the plan has {want}, the run has {got} ({fix})")
    return out


def _every(n: int | str) -> str:
    return "every layer" if n == 1 else f"every {n} layers" if isinstance(n, int) else str(n)


def _n(n: int) -> str:
    return "" if n == 1 else f", 'every_n_layers': {n}"
