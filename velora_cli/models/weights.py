"""The weights ``--weights`` loads: which checkpoint, checked before anything runs, loaded safely.

Memory and time do not depend on weight values, so shapes always come from the config (the
estimate's meta builds never load weights); the checkpoint is loaded where a step runs on real
tensors, which is what makes the tune's accuracy probe start from the user's model.

- safetensors first: a directory holding ``model.safetensors`` (or its sharded index) and a
  ``pytorch_model.bin`` loads the safetensors.
- a pickle (``pytorch_model.bin``) loads only through ``torch.load(weights_only=True)``, which
  unpickles tensors and plain containers and nothing else: a pickle that needs more (arbitrary
  code on load) is refused, never run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from velora_cli.models.spec import ModelSpec

# (kind, file names) in the order they are preferred; each name is a single file or the index of
# a sharded checkpoint (transformers' SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME,
# WEIGHTS_INDEX_NAME).
FILES = (
    ("safetensors", ("model.safetensors", "model.safetensors.index.json")),
    ("pickle", ("pytorch_model.bin", "pytorch_model.bin.index.json")),
)


def weight_file(directory: str | Path) -> tuple[str, Path] | None:
    """The checkpoint file a local directory's weights load from: ``("safetensors", path)``,
    ``("pickle", path)`` or None when it holds neither."""
    for kind, names in FILES:
        for name in names:
            path = Path(directory) / name
            if path.is_file():
                return kind, path
    return None


def check_weights(spec: ModelSpec) -> str:
    """Check that ``spec`` has weights to load, before any model is built.

    Returns:
        Where they come from, in words: ``/ckpt/model.safetensors (safetensors)`` or ``hub id
        owner/name``.

    Raises:
        ModelError: a built-in (no weights), a hub id that fell back to a built-in, or a local
            directory without a checkpoint file.
    """
    from velora_cli.models.spec import ModelError, _builtin_table

    if spec.weights_path is None:
        if spec.builtin is not None and spec.name.lower() != spec.builtin:  # a hub fallback
            raise ModelError(
                f"cannot load weights for {spec.name}: the hub was not usable, so it resolved to "
                f"the built-in architecture {spec.builtin}, which has no weights; fix hub access "
                "(network, HF_HUB_OFFLINE, `huggingface-cli login`) or pass a local directory"
            )
        hub_ids = _builtin_table().get(spec.builtin or "", {}).get("hub_ids", [])
        example = f" (e.g. {hub_ids[0]})" if hub_ids else ""
        raise ModelError(
            f"built-in architectures have no weights ({spec.name}); pass a hub id{example} "
            "or local directory, or leave out --weights (random weights)"
        )
    if spec.source != "local":
        return f"hub id {spec.weights_path} (safetensors preferred)"
    found = weight_file(spec.weights_path)
    if found is None:
        names = ", ".join(name for _, names in FILES for name in names)
        raise ModelError(
            f"cannot load weights for {spec.name}: {spec.weights_path} holds no checkpoint "
            f"({names}); save one with "
            "save_pretrained, or leave out --weights (random weights)"
        )
    kind, path = found
    return f"{path} ({kind})"


def load_kwargs(spec: ModelSpec) -> dict:
    """``from_pretrained`` keyword arguments that load the preferred file, pickles safely only."""
    kwargs: dict = {"weights_only": True}
    found = weight_file(spec.weights_path) if spec.source == "local" else None
    if found is not None and found[0] == "safetensors":
        kwargs["use_safetensors"] = True
    return kwargs


def unsafe_pickle(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps) is torch.load(weights_only=True) refusing a pickle."""
    import pickle

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, pickle.UnpicklingError) or "Weights only load failed" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' "Loading weights" bar off (it would interleave with velora's progress)."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()
