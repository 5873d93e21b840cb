"""Build the model a `ModelSpec` names: from its config with seeded random weights, or with the
checkpoint's weights when asked (`velora_cli.models.weights` checks and loads them).

torch and transformers are imported inside functions so that ``velora --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from functools import cache
from typing import TYPE_CHECKING, Any

from velora_cli.models.spec import (
    _DTYPES,
    _SEED,
    ModelError,
    ModelSpec,
    _builtin_config,
    _builtin_spec,
    _builtin_table,
    _first_line,
    _hub_offline,
    max_sequence_length,
)

if TYPE_CHECKING:
    import torch


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
        The model of the spec's task (`auto_class`: ``AutoModelForCausalLM``, ...) in train mode.
        Random init is seeded: two builds on one device are identical, and the caller's RNG
        state is left as it was.

    Raises:
        ModelError: unknown dtype, a config or attention implementation transformers rejects,
            weights asked for a spec without any (a built-in) or on the meta device, or a
            checkpoint that could not be loaded.
    """
    import torch

    auto = auto_class(spec.task)
    target = torch.device(device)
    config = copy.deepcopy(spec.config)  # the spec's config stays as resolved
    config.use_cache = False  # training: no KV cache
    if spec.task == "sequence-classification" and getattr(config, "pad_token_id", 0) is None:
        # decoder classifiers pool the last non-pad token and refuse batches > 1 without a pad
        # id; the batches are full length, so any id works: the end-of-sequence one, as the HF
        # fine-tuning recipes set it
        eos = getattr(config, "eos_token_id", None)
        config.pad_token_id = (eos[0] if isinstance(eos, list) else eos) or 0
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
            if "Unrecognized configuration class" in str(exc):
                raise ModelError(
                    f"{spec.name} is a {spec.config.model_type!r} model, which has no "
                    f"{spec.task} head in transformers; pick another --task"
                ) from exc
            attention = f" with attn_implementation={attn_implementation}" * bool(
                attn_implementation
            )
            raise ModelError(
                f"cannot build {spec.name}{attention}: {_first_line(exc)}; "
                "fix the config or pick another attention implementation"
            ) from exc
    model.config.use_cache = False
    return model.train()  # from_pretrained leaves eval mode, from_config train mode: be consistent


def auto_class(task: str) -> Any:
    """The transformers Auto class that builds ``task``'s head (one of `spec.TASKS`)."""
    import transformers

    return getattr(
        transformers,
        {
            "causal-lm": "AutoModelForCausalLM",
            "masked-lm": "AutoModelForMaskedLM",
            "sequence-classification": "AutoModelForSequenceClassification",
            "token-classification": "AutoModelForTokenClassification",
            "question-answering": "AutoModelForQuestionAnswering",
            "image-classification": "AutoModelForImageClassification",
        }[task],
    )


def _load_weights(auto: Any, spec: ModelSpec, config: Any, target: Any, kwargs: dict) -> Any:
    from velora_cli.models import weights as checkpoint

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


# -- the built-ins, counted by building them on meta ---------------------------------------------


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
