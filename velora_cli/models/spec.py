"""Resolve a model spec (local directory, built-in name, hub id): which config, which task.

Memory and time of a training step depend on shapes, not on weight values, so models are built
from their config with seeded random weights unless real weights are asked for; on the meta
device a 13B model builds in well under a second without allocating anything.

Built-in architectures are plain JSON under ``builtin_configs/``: one file per model holding its
description, the config it was copied from, the hub ids it stands in for, and the config itself.

torch and transformers are imported inside functions so that ``velora --help`` stays instant.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig

DEFAULT_MODEL = "llama-60m"
# The heads velora builds, with the architecture-name suffix that asks for each (transformers'
# `<Model>For<Head>` naming; GPT-2 style `LMHeadModel` is causal LM).
TASK_SUFFIXES: dict[str, tuple[str, ...]] = {
    "causal-lm": ("ForCausalLM", "LMHeadModel"),
    "masked-lm": ("ForMaskedLM",),
    "sequence-classification": ("ForSequenceClassification",),
    "token-classification": ("ForTokenClassification",),
    "question-answering": ("ForQuestionAnswering",),
    "image-classification": ("ForImageClassification",),
}
TASKS = tuple(TASK_SUFFIXES)
# HF's attn_implementation names velora can profile; "auto" is transformers' default (sdpa)
ATTENTIONS = ("auto", "sdpa", "eager", "flash_attention_2")

_BUILTIN_DIR = Path(__file__).parent / "builtin_configs"
_SEED = 0  # random init is seeded so that two builds of one spec are identical
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}  # fmt: skip
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading of HF_HUB_OFFLINE
# Learned absolute position tables: longer sequences index past them (a device-side assert on
# CUDA). RoBERTa-style models offset positions by pad_token_id + 1.
_ROBERTA_POSITIONS = {"roberta", "xlm-roberta", "camembert", "xmod", "data2vec-text"}
_ABSOLUTE_POSITIONS = _ROBERTA_POSITIONS | {"gpt2", "gpt_neo", "opt", "bert", "electra"}


class ModelError(Exception):
    """A model spec that cannot be resolved or built; the message is one line saying what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: where it came from, its config, and what it is trained with.

    Example:
        >>> spec = resolve_model("llama-tiny")
        >>> (spec.source, spec.task, spec.config.num_hidden_layers)
        ('builtin', 'causal-lm', 2)
        >>> model = build_model(spec, device="meta")
    """

    name: str  # what the user asked for, e.g. "meta-llama/Llama-2-7b"
    source: str  # "builtin" | "hub" | "local"
    config: PretrainedConfig
    task: str  # one of TASKS: which Auto class, which labels and which loss
    builtin: str | None  # the built-in used, if any (also set on a hub fallback)
    weights_path: str | None  # local directory or hub id holding weights; None for built-ins
    notice: str | None  # one line to show the user, e.g. a hub fallback to a built-in
    tokenizer_path: str | None  # where a tokenizer can be loaded from, if anywhere


# -- built-ins ------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _builtin_table() -> dict[str, dict[str, Any]]:
    """Built-in name -> its JSON entry (description, source, task, hub_ids, config)."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(_BUILTIN_DIR.glob("*.json"))}


@lru_cache(maxsize=1)
def _hub_aliases() -> dict[str, str]:
    """Lower-cased well-known hub id -> the built-in with the same shapes."""
    return {hub.lower(): name for name, e in _builtin_table().items() for hub in e["hub_ids"]}


def _builtin_config(name: str) -> PretrainedConfig:
    """A fresh config object for a built-in (callers may mutate it)."""
    from transformers import AutoConfig

    values = dict(_builtin_table()[name]["config"])
    return AutoConfig.for_model(values.pop("model_type"), **values)


def _builtin_spec(name: str, builtin: str, notice: str | None = None) -> ModelSpec:
    return ModelSpec(
        name=name,
        source="builtin",
        config=_builtin_config(builtin),
        task=_builtin_table()[builtin]["task"],
        builtin=builtin,
        weights_path=None,
        notice=notice,
        tokenizer_path=None,
    )


def max_sequence_length(config: PretrainedConfig) -> int | None:
    """The longest sequence a model's learned position table can index.

    Args:
        config: a transformers config.

    Returns:
        The limit for models with learned absolute positions (GPT-2: 1024, RoBERTa: 512), None
        for models whose positions do not bound the length (RoPE, ALiBi) or that are not known.
    """
    limit = getattr(config, "max_position_embeddings", None)
    if config.model_type not in _ABSOLUTE_POSITIONS or limit is None:
        return None
    if config.model_type in _ROBERTA_POSITIONS:
        return limit - (config.pad_token_id or 0) - 1
    return limit


# -- resolution -----------------------------------------------------------------------------------


def resolve_model(
    spec: str | None, *, trust_remote_code: bool = False, task: str | None = None
) -> ModelSpec:
    """Resolve a model spec to a config, trying a local directory, a built-in, then the hub.

    Args:
        spec: a local directory holding config.json, a built-in name (case-insensitive, see
            :func:`list_builtins`), or a hub id; None or "" means :data:`DEFAULT_MODEL`.
        trust_remote_code: allow configs that need custom code from the hub or directory.
        task: the head to train (one of :data:`TASKS`); None: the one the config's
            architectures name.

    Returns:
        The resolved :class:`ModelSpec`. A well-known hub id (e.g. ``meta-llama/Llama-2-7b``)
        whose config cannot be fetched (offline, unreachable, gated) resolves to the built-in
        with the same shapes, with ``notice`` saying so.

    Raises:
        ModelError: the directory has no readable config.json, the hub lookup failed for an id
            that has no built-in counterpart, an unknown task, or (without ``task``) the config
            names a head velora does not build.
    """
    if task is not None and task not in TASKS:
        raise ModelError(f"--task {task!r}: choose {'|'.join(TASKS)}")
    name = (spec or "").strip() or DEFAULT_MODEL
    path = Path(name).expanduser()
    if path.is_dir():
        return _resolve_local(name, path, trust_remote_code, task)
    if path.exists():
        raise ModelError(
            f"{name} is a file, not a model directory; pass a directory holding config.json, "
            "a built-in from `velora models`, or a hub id"
        )
    if name.lower() in _builtin_table():
        return with_task(_builtin_spec(name, name.lower()), task)
    if "/" not in name and (close := _close_builtin(name)):
        try:
            return _resolve_hub(name, trust_remote_code, task)
        except ModelError as exc:  # a built-in's name, mistyped (lama-60m)
            raise ModelError(f"{exc}; did you mean {close}?") from None
    if name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1:
        raise ModelError(
            f"no such directory: {name}; pass an existing directory holding config.json, "
            "a built-in from `velora models`, or a hub id like owner/name"
        )
    return _resolve_hub(name, trust_remote_code, task)


def _close_builtin(name: str) -> str | None:
    """The built-in whose name is closest to ``name`` (a typo of it), or None."""
    import difflib

    found = difflib.get_close_matches(name.lower(), list(_builtin_table()), n=1, cutoff=0.75)
    return found[0] if found else None


def _resolve_local(name: str, path: Path, trust_remote_code: bool, task: str | None) -> ModelSpec:
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise ModelError(
            f"local directory {name} has no config.json; pass a directory written by "
            "save_pretrained, a built-in from `velora models`, or a hub id"
        )
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError, ValueError, JSON errors: any unreadable config
        hint = _remote_code_hint(exc, trust_remote_code) or "check the file, or pass a built-in"
        raise ModelError(f"cannot read {path / 'config.json'}: {_first_line(exc)}; {hint}") from exc
    has_tokenizer = any((path / f).is_file() for f in _TOKENIZER_FILES)
    return ModelSpec(
        name=name,
        source="local",
        config=config,
        task=task or _task_for(config, name),
        builtin=None,
        weights_path=str(path),
        notice=None,
        tokenizer_path=str(path) if has_tokenizer else None,
    )


def _resolve_hub(name: str, trust_remote_code: bool, task: str | None) -> ModelSpec:
    from transformers import AutoConfig

    offline = _hub_offline()
    try:
        # local_files_only: huggingface_hub reads HF_HUB_OFFLINE once, at import; read it per call
        config = AutoConfig.from_pretrained(
            name, trust_remote_code=trust_remote_code, local_files_only=offline
        )
    except Exception as exc:  # any hub failure either falls back to a built-in or is reported
        kind = _hub_failure(exc, offline)
        builtin = _hub_aliases().get(name.lower())
        if builtin is None:
            raise ModelError(_hub_error(name, kind, exc, trust_remote_code)) from exc
        why = {"offline": "offline", "network": "network error", "gated": "gated repo, no access"}
        what = "unreachable" if kind in ("offline", "network") else "config unavailable"
        notice = (
            f"hub {what} for {name} ({why.get(kind, kind)}); using built-in architecture "
            f"{builtin} (same shapes, random weights)"
        )
        if kind == "network":  # each lookup retried for ~25 s before giving up
            notice += "; set HF_HUB_OFFLINE=1 to skip the hub lookup"
        return with_task(_builtin_spec(name, builtin, notice=notice), task)
    return ModelSpec(
        name=name,
        source="hub",
        config=config,
        task=task or _task_for(config, name),
        builtin=None,
        weights_path=name,
        notice=None,
        tokenizer_path=name,
    )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.upper() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def _hub_failure(exc: BaseException, offline: bool) -> str:
    """Classify a failed hub lookup from the exception chain transformers wraps around it."""
    from huggingface_hub import errors

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, errors.GatedRepoError):
            return "gated"
        if isinstance(seen, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError)):
            return "not found"
        if isinstance(seen, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
            return "offline" if offline else "network"
        if isinstance(seen, errors.EntryNotFoundError):
            return "no config.json"
        if isinstance(seen, errors.HFValidationError):
            return "invalid id"
        if isinstance(seen, (ConnectionError, TimeoutError)) or type(seen).__name__.endswith(
            ("ConnectError", "Timeout", "TimeoutException")  # httpx's, should one escape unwrapped
        ):
            return "network"
        seen = seen.__cause__ or seen.__context__
    if "trust_remote_code" in str(exc):
        return "remote code"
    return "error"


def _hub_error(name: str, kind: str, exc: BaseException, trust_remote_code: bool) -> str:
    pick = "pick a built-in from `velora models`"
    tried = f"{name!r} is not a built-in or a local directory, and the hub lookup failed"
    todo = {
        "offline": "(HF_HUB_OFFLINE is set and it is not in the local cache); unset "
        f"HF_HUB_OFFLINE to download it, pass a local directory, or {pick}",
        "network": "(hub unreachable); check your network (or set HF_HUB_OFFLINE=1 to use the "
        f"cache), pass a local directory, or {pick}",
        "gated": f"(gated repo, no access); request access at https://huggingface.co/{name} and "
        f"run `huggingface-cli login`, or {pick}",
        "not found": "(no such repo); check the spelling (private repos need `huggingface-cli "
        f"login`), pass a local directory, or {pick}",
        "no config.json": "(the repo has no config.json); pass a transformers model repo or "
        f"directory, or {pick}",
        "invalid id": f"(not a valid hub id); pass an existing directory, {pick}, or a hub id "
        "like owner/name",
        "remote code": "(its config needs custom code); "
        + (_remote_code_hint(exc, trust_remote_code) or "check that its code runs here"),
    }
    return f"{tried} {todo.get(kind, f'({_first_line(exc)}); pass a local directory or {pick}')}"


def _remote_code_hint(exc: BaseException, trust_remote_code: bool) -> str | None:
    if "trust_remote_code" in str(exc) and not trust_remote_code:
        return "pass --trust-remote-code if you trust the model's code"
    return None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def with_task(spec: ModelSpec, task: str | None) -> ModelSpec:
    """``spec`` trained with another head (``--task``); None keeps the one its config names.

    Raises:
        ModelError: an unknown task.
    """
    import dataclasses

    if task is None or task == spec.task:
        return spec
    if task not in TASKS:
        raise ModelError(f"--task {task!r}: choose {'|'.join(TASKS)}")
    return dataclasses.replace(spec, task=task)


def _task_for(config: PretrainedConfig, name: str) -> str:
    """Which head to train: the config's architectures, then auto_map, then model_type.

    An architecture naming a head velora does not build (``T5ForConditionalGeneration``,
    ``BertForPreTraining``, ...) is refused, never replaced by another head; a headless one
    (``LlamaModel``) or none at all falls back to the language-model head of its model type, or,
    for vision encoders with none, image classification.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    architectures = getattr(config, "architectures", None) or []
    for task, suffixes in TASK_SUFFIXES.items():
        if any(a.endswith(suffixes) for a in architectures):
            return task
    headed = [a for a in architectures if "For" in a or a.endswith("HeadModel")]
    if headed:
        raise ModelError(
            f"{name} is a {', '.join(headed)}: velora builds no such head; it profiles "
            f"{', '.join(TASKS)} (pick one with --task to train that head instead)"
        )
    auto_map = getattr(config, "auto_map", None) or {}
    if "AutoModelForCausalLM" in auto_map:
        return "causal-lm"
    if "AutoModelForMaskedLM" in auto_map:
        return "masked-lm"
    kind = config.model_type
    in_causal = kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    in_masked = kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    # encoders such as bert have both heads; the causal one is only for is_decoder configs
    if in_masked and not (in_causal and getattr(config, "is_decoder", False)):
        return "masked-lm"
    if in_causal:
        return "causal-lm"
    if kind in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:  # vision encoders: ViT, DeiT, ...
        return "image-classification"
    raise ModelError(
        f"{name} is a {kind!r} model, which has no causal-LM or masked-LM head in transformers; "
        f"velora profiles {', '.join(TASKS)} models (its config names no architecture: add one, "
        "or pick a task with --task)"
    )
