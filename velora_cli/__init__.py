"""velora: memory profiler and autotuner for training Hugging Face models with VeLoRA.

The public API is imported lazily so that ``velora --help`` never pays for importing torch.

    >>> from velora_cli import apply_velora, remove_velora
    >>> names = apply_velora(model, layers="paper", num_groups=32)
    >>> from velora_cli import apply_config, make_optimizer  # a config from velora export-config
    >>> from velora_cli import VeloraCallback  # Trainer(..., callbacks=[VeloraCallback(config)])
    >>> from velora_cli import build_model  # a built-in (llama-60m, ...): random weights
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "apply_config": "velora_cli.configs",
    "make_optimizer": "velora_cli.configs",
    "apply_velora": "velora_cli.methods.placement",
    "remove_velora": "velora_cli.methods.placement",
    "velora_layers": "velora_cli.methods.placement",
    "VeLoRALinear": "velora_cli.methods.velora",
    "VeLoRAConv1D": "velora_cli.methods.velora",
    "VeLoRAFunction": "velora_cli.methods.velora",
    "SavedTensorCounter": "velora_cli.measure.accounting",
    "saved_activation_bytes": "velora_cli.measure.accounting",
    "VeloraCallback": "velora_cli.runs.callback",
    "load_run": "velora_cli.runs.record",
    "build_model": "velora_cli.models.public",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'velora_cli' has no attribute {name!r}")
