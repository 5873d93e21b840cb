"""The checks of command-line options that several commands share, in one place.

Each check runs before anything is built or measured, raises `UserError` with one line that
says what to give instead, and returns the parsed value. Nothing here imports torch at module
level (``velora --help`` imports every command).
"""

from __future__ import annotations

from collections.abc import Iterable

from velora_cli.commands.errors import UserError
from velora_cli.commands.options import int_list

BACKENDS = ("auto", "cuda", "cpu", "estimate")  # = velora_cli.measure.BACKENDS

# Below this a budget holds no model's training step (the smallest built-in needs more): a
# budget of "1e-9GB" is a slip of the unit, not a plan.
MIN_BUDGET_BYTES = 10**6


def choice(flag: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` when it is one of ``choices``, e.g. ``choice("--format", f, ("table", "json"))``."""
    if value not in choices:
        listed = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]
        raise UserError(f"{flag} {value!r}: choose {listed}")
    return value


def backend(value: str) -> str:
    return choice("--backend", value, BACKENDS)


def gpu(name: str | None) -> None:
    """An unknown ``--gpu`` fails before anything is built (the message lists the known ones)."""
    from velora_cli.gpus import get_gpu

    get_gpu(name)


def plot_target(path: str | None) -> None:
    """``--plot``: writable, and matplotlib installed, before the run rather than after it."""
    if path is None:
        return
    from velora_cli import plots

    plots.check_output(path)
    plots.require_matplotlib()


def alloc_conf(value: str | None, *, inherit: bool) -> str | None:
    """``--alloc-conf`` parsed as torch parses ``PYTORCH_CUDA_ALLOC_CONF``.

    Args:
        inherit: with no ``--alloc-conf``, take the environment's setting (the tune records
            it); otherwise None stays None (the profile's backends read the environment).
    """
    from velora_cli.allocator.config import alloc_conf_from_env, parse_alloc_conf

    if value is None and inherit:
        value = alloc_conf_from_env()
    if value is not None:
        parse_alloc_conf(value)  # a bad string fails before anything is built
    return value


def intervals(text: str, flag: str, what: str = "layer intervals") -> list[int]:
    """Comma-separated integers >= 1 (``--gc-every``, ``--num-groups``)."""
    values = int_list(text, flag)
    if any(n < 1 for n in values):
        raise UserError(f"{flag} takes {what} >= 1")
    return values


def placements(names: Iterable[str]) -> None:
    """Every VeLoRA placement parses (presets, globs, '+' combinations)."""
    from velora_cli.methods.placement import parse_placement

    for name in names:
        parse_placement(name)


def budget(text: str | None) -> int | None:
    """``--budget`` in bytes (None when not given); a budget under 1 MB is a slip of the unit."""
    if text is None:
        return None
    from velora_cli.budget import format_bytes, parse_budget

    value = parse_budget(text)
    if value < MIN_BUDGET_BYTES:
        raise UserError(
            f"--budget {text} = {format_bytes(value)}: under 1 MB, less than any model's "
            "training step; give it in MB or GB, e.g. --budget 10GB"
        )
    return value


def output_file(path: str | None, flag: str = "--output") -> None:
    """A file the command will write is writable, before anything is measured."""
    if path:
        from velora_cli.files import check_output_file

        check_output_file(path, flag)


def cuda_backend(name: str, ranks: int = 1) -> bool:
    """Whether CUDA is visible; ``--backend cuda`` without it (or with fewer GPUs than ranks)
    fails here, before any model is resolved (hub lookups)."""
    from velora_cli.measure.cuda import cuda_available

    has_cuda = cuda_available()
    if name == "cuda" and not has_cuda:
        raise UserError(
            "--backend cuda: no CUDA device is visible (torch.cuda.is_available() is False); "
            "use --backend estimate or cpu"
        )
    if ranks > 1 and (name == "cuda" or (name == "auto" and has_cuda)):
        import torch

        if torch.cuda.device_count() < ranks:
            raise UserError(
                f"--world-size {ranks} on --backend cuda needs one GPU per rank and "
                f"{torch.cuda.device_count()} are visible: use --backend estimate, or smaller "
                "world sizes"
            )
    return has_cuda


def lengths(text: str | None, data: str | None, model_spec, max_length: int):
    """``--lengths`` parsed, or the token lengths of ``--data`` (truncated at ``max_length``, the
    tokenizer's truncation), as `measure.lengths.Lengths`; None when neither is given.

    Raises:
        UserError: both given. `LengthsError`/`DataError` (one line): a bad spec, an unreadable
            file.
    """
    if text is None and data is None:
        return None
    if text is not None and data is not None:
        raise UserError("give --lengths or --data, not both (--data: the lengths of that text)")
    from velora_cli.measure.lengths import from_values, parse_lengths

    if text is not None:
        return parse_lengths(text)
    from pathlib import Path

    from velora_cli.search.data import _looks_like_path, load_texts, token_lengths

    if _looks_like_path(data) and not Path(data).expanduser().is_file():
        raise UserError(
            f"--data {data}: no such file; give a .txt or .jsonl file of training text or a "
            "dataset name (or --lengths with a distribution)"
        )
    texts, described = load_texts(data)
    values, tokenized = token_lengths(texts, model_spec, max_length)
    truncated = sum(v == max_length for v in values)
    return from_values(
        values,
        f"--data {data} ({len(values):,} sequences, {truncated:,} truncated at --seq-len "
        f"{max_length:,}; {tokenized})",
    )
