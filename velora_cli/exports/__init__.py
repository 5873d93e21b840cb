"""One module per export format of a tuned configuration, behind one small interface.

Each format module has ``export(config: VeloraConfig) -> Export``: the document written (JSON)
and the notes said beside it (stderr). A format that cannot state the measured configuration
exactly raises `NotExpressible`, with the reason, the nearest configuration it can state and
the velora command that measures that one. ``velora export-config --format NAME`` looks NAME
up in `FORMATS`; a new format is a module and one entry there.

No torch import here: ``velora --help`` reads `FORMATS` for its help text.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from velora_cli.configs import ConfigError, VeloraConfig

# format name -> (module with export(config), what it writes: for --help)
FORMATS: dict[str, tuple[str, str]] = {
    "velora": ("velora_cli.exports.velora", "velora's own, for velora_cli.apply_config"),
    "peft": ("velora_cli.exports.peft", "peft.LoraConfig keyword arguments"),
    "trainer": ("velora_cli.exports.trainer", "TrainingArguments keyword arguments + snippet"),
    "trl": ("velora_cli.exports.trl", "TRL SFTConfig keyword arguments, peft_config + snippet"),
}


@dataclass(frozen=True)
class Export:
    """What a format writes (``data``, as JSON) and what it says beside it (``notes``)."""

    data: dict[str, Any]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Nearest:
    """The configuration closest to a measured one that a format can state exactly.

    ``config`` is it as a `VeloraConfig` (its ``layers`` left to the measurement that
    ``command`` makes); ``description`` says what changed, in words.
    """

    description: str
    config: VeloraConfig
    command: str


class NotExpressible(ConfigError):
    """A format cannot state the measured configuration: why, and what it can state instead."""

    def __init__(self, fmt: str, reasons: list[str], nearest: Nearest | None, also: str = ""):
        self.fmt, self.reasons, self.nearest = fmt, list(reasons), nearest
        message = f"not expressible as {fmt}: " + "; ".join(reasons)
        if nearest is not None:
            message += (
                f". Nearest that is: {nearest.description}; measure it with: {nearest.command}"
            )
        if also:
            message += f". {also}"
        super().__init__(message)


class FormatUnavailable(ConfigError):
    """A format whose library is not installed here (the message says what to install)."""


def export(fmt: str, config: VeloraConfig) -> Export:
    """The ``fmt`` export of ``config``.

    Raises:
        ConfigError: an unknown format; `NotExpressible` when the format cannot state the
            measured configuration; `FormatUnavailable` when its library is missing.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose {', '.join(FORMATS)}")
    module = importlib.import_module(FORMATS[fmt][0])
    return module.export(config)
