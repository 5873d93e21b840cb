"""A published setup as velora's step: the `StepSpec` and estimate settings, or what is missing.

One table, `RULES`: each rule reads one setting of a corpus record's ``setup`` and maps each value
velora can run to the `StepSpec` fields (``spec.*``) or `EstimateBackend` settings
(``backend.*``) that express it. A value the rule does not list makes the case "not
expressible", with the rule's ``missing`` text (e.g. ``attn eager``). When velora learns a
feature (another attention kernel, optimizer, quantization recipe, task head), the rule gains a
value and the cases that need it become expressible: nothing else changes.

A few settings have no StepSpec field but cannot change what is measured beyond a stated bound;
their values map to a ``note`` that the case carries (e.g. the LoRA alpha, which scales values,
not shapes). No torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

NOTE = "note"  # a value's key holding a note instead of settings


@dataclass(frozen=True)
class Rule:
    """One setting: how to read it from a setup, and what each value velora supports maps to.

    ``accept`` maps a value to settings: ``"spec.<field>"`` (a StepSpec field),
    ``"strategy.<field>"`` (its Strategy), ``"backend.<field>"`` (an EstimateBackend setting)
    or `NOTE`. ``read`` returns a hashable value; `SKIP` means the rule does not apply.
    """

    name: str
    read: Callable[[Mapping[str, Any]], Any]
    accept: Mapping[Any, Mapping[str, Any]]
    missing: Callable[[Any], str]


SKIP = object()


def _get(path: str) -> Callable[[Mapping[str, Any]], Any]:
    """``"qlora.double_quant"`` -> setup["qlora"]["double_quant"]; SKIP where a parent is null."""

    def read(setup: Mapping[str, Any]) -> Any:
        value: Any = setup
        for part in path.split("."):
            if not isinstance(value, Mapping):
                return SKIP
            value = value.get(part)
        return value

    return read


def _checkpointing(setup: Mapping[str, Any]) -> str:
    gc = setup.get("gradient_checkpointing") or {}
    if not gc.get("enabled"):
        return "off"
    return {False: "non-reentrant", True: "reentrant"}.get(gc.get("reentrant"), "unstated")


def _amp(setup: Mapping[str, Any]) -> str:
    """``off``, or autocast's dtype: ``amp`` true with the weights in fp32 is the Trainer's
    ``fp16=True`` unless the record names bf16 (``amp_dtype``)."""
    amp = setup.get("amp")
    if not amp:
        return "off"
    named = str(setup.get("amp_dtype") or amp)
    return "bf16" if "bf16" in named or "bfloat16" in named else "fp16"


def _amp_weights(setup: Mapping[str, Any]) -> Any:
    """Autocast over half-precision weights (the Trainer's ``bf16=True`` with
    ``torch_dtype=bfloat16``): ``"<amp> on <dtype>"``; SKIP without autocast or on fp32 weights
    (AMP's usual fp32 master weights)."""
    amp, dtype = _amp(setup), setup.get("dtype")
    if amp == "off" or dtype in (None, "float32"):
        return SKIP
    return f"{amp} on {dtype}"


def _padding(setup: Mapping[str, Any]) -> str:
    text = str(setup.get("padding") or "")
    return "none" if text.startswith("none") else text


def _targets(setup: Mapping[str, Any]) -> Any:
    lora = setup.get("lora")
    if not isinstance(lora, Mapping):
        return SKIP
    targets = lora.get("targets")
    return ",".join(targets) if isinstance(targets, list) else targets


def _gqa_repeat(setup: Mapping[str, Any]) -> Any:
    """Whether K/V were repeated to the query heads before SDPA (a harness shim), for GQA models."""
    if setup.get("attn_implementation") != "sdpa":
        return SKIP
    config = setup.get("model_config") or {}
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if not heads or not kv or kv == heads:
        return SKIP
    return "repeated" if "repeat" in str(setup.get("attn_detail") or "") else "native"


def _loop(key: str, *, required: bool = False) -> Callable[[Mapping[str, Any]], Any]:
    """A setting of the record's training loop (``setup.loop``); a record without one is
    missing it once (the ``required`` rule), not once per setting."""

    def read(setup: Mapping[str, Any]) -> Any:
        loop = setup.get("loop")
        if not isinstance(loop, Mapping):
            return None if required else SKIP
        return loop.get(key)

    return read


def _words(prefix: str) -> Callable[[Any], str]:
    return lambda value: f"{prefix} {str(value).replace('_', ' ')}"


# The table. Order = the order missing features are listed in.
RULES: tuple[Rule, ...] = (
    Rule(
        "task",
        _get("task"),
        {
            "causal_lm": {},
            "sequence_classification": {"spec.task": "sequence-classification"},
            "token_classification": {"spec.task": "token-classification"},
            "question_answering": {"spec.task": "question-answering"},
            "image_classification": {"spec.task": "image-classification"},
        },
        _words("task"),
    ),
    Rule(
        "mode",
        _get("mode"),
        {m: {"spec.mode": m} for m in ("full", "lora", "qlora")},
        _words("mode"),
    ),
    Rule(
        "dtype",
        _get("dtype"),
        {
            "float32": {"spec.dtype": "fp32"},
            "float16": {"spec.dtype": "fp16"},
            "bfloat16": {"spec.dtype": "bf16"},
        },  # fmt: skip
        _words("weights dtype"),
    ),
    Rule(
        "amp",
        _amp,
        {"off": {}, "fp16": {"spec.amp": "fp16"}, "bf16": {"spec.amp": "bf16"}},
        lambda v: f"amp {v}",
    ),
    # velora's AMP keeps fp32 master weights (StepSpec: --amp with --dtype fp32); autocast over
    # bf16/fp16 weights (no master copy, autocast's fp32 ops upcasting) is not planned yet
    Rule(
        "amp on half weights",
        _amp_weights,
        {SKIP: {}},
        lambda v: f"amp {v} weights (autocast without fp32 master weights)",
    ),
    Rule(
        "optimizer",
        _get("optimizer"),
        {
            "adamw_torch": {"spec.optimizer": "adamw"},
            "adamw_torch_fused": {"spec.optimizer": "adamw_torch_fused"},
            "adamw_bnb_8bit": {"spec.optimizer": "adamw_bnb_8bit"},
            "paged_adamw_8bit": {"spec.optimizer": "paged_adamw_8bit"},
            "paged_adamw_32bit": {"spec.optimizer": "paged_adamw_32bit"},
            "adafactor": {"spec.optimizer": "adafactor"},
            # transformers' own AdamW (optim="adamw_hf", removed in v5) steps one parameter at
            # a time with fp32 moments, as torch's for-loop AdamW does; its per-parameter
            # temporaries are the for-loop's (denominator of one parameter), not foreach's
            "adamw_hf": {
                "spec.optimizer": "adamw_torch_forloop",
                NOTE: "adamw_hf (transformers' own AdamW) planned as torch's for-loop AdamW: "
                "the same state, one parameter's temporaries at a time",
            },
        },
        _words("optimizer"),
    ),  # fmt: skip
    Rule(
        "attention",
        _get("attn_implementation"),
        {
            "sdpa": {},  # transformers' default, velora's "auto"
            "eager": {"spec.attn": "eager"},
            "flash_attention_2": {"spec.attn": "flash_attention_2"},
        },
        _words("attn"),
    ),
    Rule(
        "sdpa gqa",
        _gqa_repeat,
        {
            "native": {},
            # fitcheck's shim repeat_interleaves K/V before SDPA (and drops enable_gqa): a
            # (B, H, N, d) copy of each, the same unsqueeze/expand/clone/view ops as
            # transformers' repeat_kv, which StepSpec.repeat_kv runs
            "repeated": {"spec.repeat_kv": True},
        },
        lambda v: f"sdpa gqa {v}",
    ),
    Rule(
        "checkpointing",
        _checkpointing,
        {
            "off": {"strategy.gc": False},
            "non-reentrant": {"strategy.gc": True},
            "reentrant": {"strategy.gc": True, "spec.gc_reentrant": True},
        },
        lambda v: f"gradient checkpointing {v}",
    ),
    # accumulation is StepSpec.grad_accum_steps (run.step_spec sets it with the batch)
    Rule(
        "grad accumulation",
        _get("grad_accum"),
        {**{n: {} for n in range(1, 1025)}, None: {}},
        lambda v: f"gradient accumulation {v}",
    ),  # fmt: skip
    Rule("padding", _padding, {"none": {}}, lambda v: f"padding: {v}"),
    Rule("lora dropout", _get("lora.dropout"), {0.0: {}, SKIP: {}}, _words("lora dropout")),
    Rule("lora bias", _get("lora.bias"), {"none": {}, SKIP: {}}, _words("lora bias")),
    Rule("dora", _get("lora.use_dora"), {False: {}, None: {}, SKIP: {}}, lambda v: "dora"),
    Rule("quant type", _get("qlora.quant_type"), {"nf4": {}, SKIP: {}}, _words("quant")),
    Rule(
        "double quant",
        _get("qlora.double_quant"),
        {True: {}, False: {"spec.double_quant": False}, SKIP: {}},
        lambda v: f"double quant {v}",
    ),
    Rule(
        "compute dtype",
        _get("qlora.compute_dtype"),
        {
            "bfloat16": {},  # velora's default
            "float16": {"spec.compute_dtype": "fp16"},
            "float32": {"spec.compute_dtype": "fp32"},
            None: {},
            SKIP: {},
        },
        _words("compute dtype"),
    ),
    Rule(
        "quant storage",
        _get("qlora.quant_storage"),
        {"uint8": {}, None: {}, SKIP: {}},
        _words("quant storage"),
    ),
    Rule(
        "kbit prep",
        _get("qlora.prepare_model_for_kbit_training"),
        {False: {}, None: {}, True: {"spec.kbit_prepare": True}, SKIP: {}},
        lambda v: f"prepare_model_for_kbit_training {v}",
    ),
    Rule(
        "warm-up",
        _loop("warmup_steps", required=True),
        {n: {"backend.cuda_warmup": n - 1} for n in range(1, 11)},
        lambda v: (
            "training loop unstated (warm-up / measured steps)"
            if v is None
            else f"{v} warm-up steps"
        ),
    ),
    Rule(
        "measured steps",
        _loop("measured_steps"),
        {n: {"backend.cuda_steps": n} for n in range(1, 11)},
        lambda v: f"{v} measured steps",
    ),  # fmt: skip
    Rule(
        "empty cache",
        _loop("empty_cache_before_measure"),
        {True: {"backend.cuda_empty_cache": True}, False: {"backend.cuda_empty_cache": False}},
        lambda v: f"empty_cache before measuring: {v}",
    ),
    Rule(
        "peak reset",
        _loop("peak_reset"),
        {None: {}, True: {}, False: {"backend.cuda_reset_peak": False}},
        lambda v: f"peak counters reset after the warm-up: {v}",
    ),
    Rule(
        "torch version",
        _get("torch_version"),
        {None: {}, SKIP: {}, "1.10": {"spec.torch_version": "1.10"}},
        _words("torch"),
    ),
    Rule(
        "zero_grad",
        _loop("zero_grad_set_to_none"),
        {
            True: {},
            None: {},
            SKIP: {},
            False: {"spec.zero_grad_set_to_none": False},  # gradients kept, zeroed in place
        },
        lambda v: f"zero_grad set_to_none: {v}",
    ),
    Rule(
        "outputs held",
        _loop("holds_outputs"),
        {True: {"spec.keep_outputs": True}, False: {}},
        lambda v: f"model outputs held: {v}",
    ),
)


@dataclass
class Mapped:
    """A case's setup in velora's terms: settings for StepSpec, Strategy and the backend, the
    features missing (empty: expressible) and the notes of approximations."""

    spec: dict[str, Any] = field(default_factory=dict)
    strategy: dict[str, Any] = field(default_factory=dict)
    backend: dict[str, Any] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def expressible(self) -> bool:
        return not self.missing


def _lora_settings(setup: Mapping[str, Any]) -> dict[str, Any]:
    lora = setup.get("lora")
    if not isinstance(lora, Mapping):
        return {}
    out: dict[str, Any] = {}
    if lora.get("r"):
        out["spec.lora_rank"] = int(lora["r"])
    targets = _targets(setup)
    if targets and targets is not SKIP:
        out["spec.lora_targets"] = targets
    return out


def _version_settings(versions: Mapping[str, Any] | None) -> dict[str, Any]:
    """The run's transformers release, taken as given (free-valued): the step computes a causal
    LM's loss as that release did (velora_cli.measure.loss_path). A record without one runs the
    installed transformers' loss."""
    version = (versions or {}).get("transformers") if isinstance(versions, Mapping) else None
    return {"spec.transformers_version": str(version)} if version else {}


def map_setup(
    setup: Mapping[str, Any],
    rules: tuple[Rule, ...] = RULES,
    versions: Mapping[str, Any] | None = None,
) -> Mapped:
    """Apply every rule to ``setup``; a value no rule accepts is a missing feature.
    ``versions``: the record's library versions (its ``versions``), where the step depends on
    one."""
    mapped = Mapped()
    for rule in rules:
        value = rule.read(setup)
        try:
            settings = rule.accept.get(value) if value is not SKIP else rule.accept.get(SKIP, {})
        except TypeError:  # an unhashable value (a list, a dict): not one the rule knows
            settings = None
        if settings is None and value is SKIP:
            settings = {}
        if settings is None:
            mapped.missing.append(rule.missing(value))
            continue
        _apply(mapped, settings)
    _apply(mapped, _lora_settings(setup))  # rank and targets are free-valued: taken as given
    _apply(mapped, _version_settings(versions))
    return mapped


def _apply(mapped: Mapped, settings: Mapping[str, Any]) -> None:
    for key, value in settings.items():
        if key == NOTE:
            mapped.notes.append(value)
            continue
        where, _, name = key.partition(".")
        getattr(mapped, where)[name] = value
