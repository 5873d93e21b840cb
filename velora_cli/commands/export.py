"""``velora export-config``: the tuned configuration for training code, in one of the formats of
`velora_cli.exports.FORMATS` (one module each)."""

from __future__ import annotations

import functools
from typing import Annotated

import typer

from velora_cli.commands.errors import UserError, guarded
from velora_cli.commands.output import err
from velora_cli.exports import FORMATS, LAUNCHERS


@guarded
def export_config(
    source: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="A tune document or velora config (default: the latest tune document "
            "under profiles/).",
        ),
    ] = None,
    output_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="; ".join(f"{name}: {what}" for name, (_, what) in FORMATS.items())
            + "; "
            + "; ".join(f"{name}: {what}" for name, what in LAUNCHERS.items())
            + ". A format that cannot state the measured configuration refuses (exit 1) and "
            "names the nearest one it can, with the command that measures it.",
        ),
    ] = "velora",
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Write here (default: stdout).")
    ] = None,
) -> None:
    """Write the tuned configuration for training code (velora, peft, trainer, trl, accelerate
    or torchrun format)."""
    if output_format not in FORMATS and output_format not in LAUNCHERS:
        raise UserError(f"--format {output_format!r}: choose {', '.join([*FORMATS, *LAUNCHERS])}")
    import json
    from pathlib import Path

    from velora_cli import configs, exports
    from velora_cli.search import autotune

    if output:
        from velora_cli.files import check_output_file

        check_output_file(output, "--output")
    path = Path(source) if source else autotune.latest("tune-*.json")
    if path is None:
        raise UserError(
            f"no tune document under {autotune.profiles_dir()}/: run velora tune first, or "
            "pass --from FILE"
        )
    config = configs.load_config(path)
    if output_format in LAUNCHERS:  # multi-GPU launchers: text files, not JSON
        from velora_cli.exports.launch import write_launch_export

        echo = functools.partial(typer.echo, nl=False)
        write_launch_export(config, output_format, output, echo=echo, err=err, source=path)
        return
    result = exports.export(output_format, config)  # NotExpressible: one line, exit 1
    for note in result.notes:
        err(f"note: {note}")
    text = json.dumps(result.data, indent=2) + "\n"
    if output:
        from velora_cli.files import write_text_atomic

        write_text_atomic(output, text)
        err(f"wrote {output} ({output_format} format, from {path})")
    else:
        typer.echo(text, nl=False)
