"""velora: memory profiler and autotuner for training Hugging Face models with VeLoRA.

The public API is imported lazily so that ``velora --help`` never pays for importing torch.

    >>> from velora_cli import apply_velora, remove_velora
    >>> names = apply_velora(model, layers="paper", num_groups=32)
    >>> from velora_cli import apply_config, make_optimizer  # a config from velora export-config
    >>> from velora_cli import VeloraCallback  # Trainer(..., callbacks=[VeloraCallback(config)])
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "apply_config": "velora_cli.configs",
    "make_optimizer": "velora_cli.configs",
    "apply_velora": "velora_cli.placement",
    "remove_velora": "velora_cli.placement",
    "velora_layers": "velora_cli.placement",
    "VeLoRALinear": "velora_cli.velora",
    "VeLoRAConv1D": "velora_cli.velora",
    "VeLoRAFunction": "velora_cli.velora",
    "SavedTensorCounter": "velora_cli.accounting",
    "saved_activation_bytes": "velora_cli.accounting",
    "VeloraCallback": "velora_cli.callback",
    "load_run": "velora_cli.runs",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'velora_cli' has no attribute {name!r}")
