"""`build_model(name)`: a velora built-in as a model your training code can use.

velora's built-ins (``velora models``: llama-tiny, llama-60m, ...) are architectures, written as
configs, with no weights and no tokenizer: ``AutoModelForCausalLM.from_pretrained("llama-60m")``
cannot load one. The exports' snippets (``--format trainer``, ``trl``, the torchrun script) build
them with this function instead, as velora built them when it measured the plan.

Tokenizers: a built-in has none. Data for it must use token ids below ``model.config.vocab_size``
(e.g. a tokenizer of that size, or the tokenizer of the checkpoint the built-in stands for, such
as a Llama-2 tokenizer for the 32000-token llama-60m); SFTTrainer also needs a
``processing_class`` with a pad token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from velora_cli.models.build import build_model as _build
from velora_cli.models.spec import ModelError, _builtin_spec, _builtin_table

if TYPE_CHECKING:
    import torch


def build_model(name: str, *, dtype: torch.dtype | str = "float32", device: str = "cpu"):
    """A velora built-in model with seeded random weights (the same ones on every call).

    Args:
        name: a built-in name (``velora models`` lists them; case-insensitive).
        dtype: parameter dtype (``torch.bfloat16``, ``"bf16"``, ...); float32 by default.
        device: where the parameters live.

    Returns:
        The ``transformers`` model (``AutoModelForCausalLM`` or ``AutoModelForMaskedLM``), in
        train mode, ``config.use_cache=False``.

    Raises:
        ModelError: ``name`` is not a built-in (a hub id or a local checkpoint is loaded with
            ``AutoModelForCausalLM.from_pretrained`` instead).

    Example:
        >>> from velora_cli import build_model
        >>> model = build_model("llama-tiny")
        >>> model.config.vocab_size
        1024
    """
    key = str(name).strip().lower()
    if key not in _builtin_table():
        raise ModelError(
            f"{name!r} is not a velora built-in ({', '.join(_builtin_table())}); load a hub id "
            "or a local checkpoint with AutoModelForCausalLM.from_pretrained"
        )
    model = _build(_builtin_spec(name, key), device=device, dtype=dtype)
    model.config._name_or_path = key  # a run record names the model, --compare rebuilds it
    return model


def is_builtin(name: str) -> bool:
    """Whether ``name`` names a velora built-in (no torch import)."""
    return str(name).strip().lower() in _builtin_table()
