"""The two launcher formats of ``velora export-config`` (multi-GPU configurations): an accelerate
config file (`exports.accelerate`) and a torchrun script (`exports.torchrun`). Text, not JSON."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from velora_cli.configs import ConfigError, VeloraConfig
from velora_cli.exports import LAUNCHERS

LAUNCH_FORMATS = tuple(LAUNCHERS)


def launch_text(config: VeloraConfig, output_format: str, output: str | None) -> tuple[str, list]:
    """The file's text and the notes for stderr.

    Raises:
        ConfigError: the configuration has nothing to launch (one process) or the format cannot
            express it; the message says what to do.
    """
    if output_format == "accelerate":
        from velora_cli.exports import accelerate

        if why := accelerate.accelerate_blockers(config):
            raise ConfigError(f"no accelerate config: {'; '.join(why)}")
        return accelerate.to_yaml(config), accelerate.accelerate_notes(config)
    from velora_cli.exports import torchrun

    if why := torchrun.torchrun_blockers(config):
        raise ConfigError(f"no torchrun script: {'; '.join(why)}")
    script = Path(output).name if output else "train_velora.py"
    return torchrun.to_script(config, script), [f"launch: {torchrun.launch_line(config, script)}"]


def write_launch_export(
    config: VeloraConfig,
    output_format: str,
    output: str | None,
    *,
    echo: Callable[[str], None],
    err: Callable[[str], None],
    source: Path,
) -> None:
    """Write the export to ``output`` (or ``echo`` it) with its notes on ``err``."""
    text, notes = launch_text(config, output_format, output)
    for note in notes:
        err(f"note: {note}")
    if output:
        from velora_cli.files import write_text_atomic

        write_text_atomic(output, text)
        err(f"wrote {output} ({output_format} format, from {source})")
    else:
        echo(text)
