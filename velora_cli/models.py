"""Resolve a model spec (local directory, built-in name, hub id) and build the model.

Memory and time of a training step depend on shapes, not on weight values, so models are built
from their config with seeded random weights unless real weights are asked for; on the meta
device a 13B model builds in well under a second without allocating anything.

Built-in architectures are plain JSON under ``builtin_configs/``: one file per model holding its
description, the config it was copied from, the hub ids it stands in for, and the config itself.

torch and transformers are imported inside functions so that ``velora --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

DEFAULT_MODEL = "llama-60m"
TASKS = ("causal-lm", "masked-lm")

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
    task: str  # "causal-lm" | "masked-lm": which Auto class and which loss
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


@cache
def _builtin_params(name: str) -> int:
    """Exact parameter count of a built-in, from a meta-device build (tied weights counted once)."""
    model = build_model(_builtin_spec(name, name), device="meta")
    return sum(p.numel() for p in model.parameters())


def list_builtins() -> list[dict[str, Any]]:
    """Describe the built-in architectures, smallest first.

    Returns:
        One dict per built-in with keys ``name``, ``model_type``, ``task``, ``layers``, ``hidden``,
        ``params`` (exact, from a meta-device build; tied weights counted once), ``max_seq`` (the
        longest sequence its position table allows, None when unbounded, e.g. RoPE), ``hub_ids``
        (the hub ids that fall back to it) and ``description``.
    """
    rows = []
    for name, entry in _builtin_table().items():
        config = _builtin_config(name)
        rows.append(
            {
                "name": name,
                "model_type": config.model_type,
                "task": entry["task"],
                "layers": config.num_hidden_layers,
                "hidden": config.hidden_size,
                "params": _builtin_params(name),
                "max_seq": max_sequence_length(config),
                "hub_ids": list(entry["hub_ids"]),
                "description": entry["description"],
            }
        )
    return sorted(rows, key=lambda row: row["params"])


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


def resolve_model(spec: str | None, *, trust_remote_code: bool = False) -> ModelSpec:
    """Resolve a model spec to a config, trying a local directory, a built-in, then the hub.

    Args:
        spec: a local directory holding config.json, a built-in name (case-insensitive, see
            :func:`list_builtins`), or a hub id; None or "" means :data:`DEFAULT_MODEL`.
        trust_remote_code: allow configs that need custom code from the hub or directory.

    Returns:
        The resolved :class:`ModelSpec`. A well-known hub id (e.g. ``meta-llama/Llama-2-7b``)
        whose config cannot be fetched (offline, unreachable, gated) resolves to the built-in
        with the same shapes, with ``notice`` saying so.

    Raises:
        ModelError: the directory has no readable config.json, the hub lookup failed for an id
            that has no built-in counterpart, or the model has no causal-LM / masked-LM head.
    """
    name = (spec or "").strip() or DEFAULT_MODEL
    path = Path(name).expanduser()
    if path.is_dir():
        return _resolve_local(name, path, trust_remote_code)
    if path.exists():
        raise ModelError(
            f"{name} is a file, not a model directory; pass a directory holding config.json, "
            "a built-in from `velora models`, or a hub id"
        )
    if name.lower() in _builtin_table():
        return _builtin_spec(name, name.lower())
    if name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1:
        raise ModelError(
            f"no such directory: {name}; pass an existing directory holding config.json, "
            "a built-in from `velora models`, or a hub id like owner/name"
        )
    return _resolve_hub(name, trust_remote_code)


def _resolve_local(name: str, path: Path, trust_remote_code: bool) -> ModelSpec:
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
        task=_task_for(config, name),
        builtin=None,
        weights_path=str(path),
        notice=None,
        tokenizer_path=str(path) if has_tokenizer else None,
    )


def _resolve_hub(name: str, trust_remote_code: bool) -> ModelSpec:
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
        return _builtin_spec(name, builtin, notice=notice)
    return ModelSpec(
        name=name,
        source="hub",
        config=config,
        task=_task_for(config, name),
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


def _task_for(config: PretrainedConfig, name: str) -> str:
    """Which head to train: from the config's architectures, auto_map, then model_type."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    architectures = getattr(config, "architectures", None) or []
    if any("MaskedLM" in a for a in architectures):
        return "masked-lm"
    if any(a.endswith(("CausalLM", "LMHeadModel")) for a in architectures):
        return "causal-lm"
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
    raise ModelError(
        f"{name} is a {kind!r} model, which has no causal-LM or masked-LM head in transformers; "
        f"velora profiles {' and '.join(TASKS)} models"
    )


# -- building -------------------------------------------------------------------------------------


def build_model(
    spec: ModelSpec,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = "float32",
    weights: bool = False,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """Build the model of a resolved spec, set up for training (``config.use_cache=False``).

    Args:
        spec: from :func:`resolve_model`.
        device: where parameters live; "meta" allocates nothing (shapes only).
        dtype: parameter dtype, a torch.dtype or a name ("float32", "bf16", "float16", ...).
        weights: load the checkpoint from ``spec.weights_path`` instead of seeded random init
            (memory and time do not depend on weight values, so random is the default).
        attn_implementation: passed to transformers ("sdpa", "eager", a registered name, ...);
            None keeps transformers' default.
        trust_remote_code: allow models whose code comes with the checkpoint.

    Returns:
        The model (an ``AutoModelForCausalLM`` or ``AutoModelForMaskedLM``) in train mode.
        Random init is seeded: two builds on one device are identical, and the caller's RNG
        state is left as it was.

    Raises:
        ModelError: unknown dtype, a config or attention implementation transformers rejects,
            weights asked for a spec without any (a built-in) or on the meta device, or a
            checkpoint that could not be loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModelForMaskedLM if spec.task == "masked-lm" else AutoModelForCausalLM
    target = torch.device(device)
    config = copy.deepcopy(spec.config)  # the spec's config stays as resolved
    config.use_cache = False  # training: no KV cache
    kwargs: dict[str, Any] = {"dtype": _as_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if weights:
        model = _load_weights(auto, spec, config, target, kwargs)
    else:
        try:
            with _seeded_rng(target), target:
                model = auto.from_config(config, **kwargs)
        except (ValueError, ImportError) as exc:  # inconsistent config, unknown attention, ...
            attention = f" with attn_implementation={attn_implementation}" * bool(
                attn_implementation
            )
            raise ModelError(
                f"cannot build {spec.name}{attention}: {_first_line(exc)}; "
                "fix the config or pick another attention implementation"
            ) from exc
    model.config.use_cache = False
    return model.train()  # from_pretrained leaves eval mode, from_config train mode: be consistent


def _load_weights(auto: Any, spec: ModelSpec, config: Any, target: Any, kwargs: dict) -> Any:
    from velora_cli import checkpoint

    checkpoint.check_weights(spec)
    if target.type == "meta":
        raise ModelError(
            f"cannot load weights for {spec.name} on the meta device, which holds shapes only; "
            "pick cpu or cuda, or build with random weights"
        )
    try:
        with checkpoint.quiet_loading():
            return auto.from_pretrained(
                spec.weights_path,
                config=config,
                device_map=None if target.type == "cpu" else str(target),
                local_files_only=_hub_offline(),
                **checkpoint.load_kwargs(spec),
                **kwargs,
            )
    except Exception as exc:  # OSError (missing files, hub), ValueError, safetensors errors
        if checkpoint.unsafe_pickle(exc):
            raise ModelError(
                f"cannot load weights for {spec.name}: its pytorch_model.bin is a pickle that "
                "torch.load(weights_only=True) refuses (it holds more than tensors, and loading "
                "it would run its code); if you trust it, convert it to safetensors "
                "(save_pretrained(..., safe_serialization=True))"
            ) from exc
        raise ModelError(
            f"cannot load weights for {spec.name} from {spec.weights_path}: {_first_line(exc)}; "
            "pass a directory written by save_pretrained or a hub id you can download"
        ) from exc


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(set(_DTYPES)))}")
    return getattr(torch, name)


@contextlib.contextmanager
def _seeded_rng(device: torch.device) -> Iterator[None]:
    """Seed random init for reproducible builds without disturbing the caller's RNG state."""
    import torch

    if device.type in ("cpu", "meta"):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(_SEED)
            yield
        return
    backend = getattr(torch, device.type)  # torch.cuda, torch.xpu, ...
    index = device.index if device.index is not None else backend.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        torch.default_generator.manual_seed(_SEED)
        with backend.device(index):
            backend.manual_seed(_SEED)
        yield
