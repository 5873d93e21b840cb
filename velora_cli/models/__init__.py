"""The models velora profiles: which model a spec names, and building it.

    spec.py     resolve a spec (built-in name, local directory, hub id) into a `ModelSpec`: its
                config, its task, whether weights exist; the built-ins are ``builtin_configs/``
    build.py    build the model from the config (seeded random weights), or with its weights
    weights.py  the checkpoint ``--weights`` loads: which file, checked before anything runs

A leaf of the layer contract (pyproject's ``[tool.importlinter]``): it imports nothing else of
velora, and torch and transformers only inside functions.
"""

from velora_cli.models.build import build_model, list_builtins
from velora_cli.models.spec import (
    DEFAULT_MODEL,
    TASKS,
    ModelError,
    ModelSpec,
    max_sequence_length,
    resolve_model,
)

__all__ = [
    "DEFAULT_MODEL",
    "TASKS",
    "ModelError",
    "ModelSpec",
    "build_model",
    "list_builtins",
    "max_sequence_length",
    "resolve_model",
]
