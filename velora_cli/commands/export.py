"""``velora export-config``: the tuned configuration for training code."""

from __future__ import annotations

import functools
from typing import Annotated

import typer

from velora_cli.commands.errors import UserError, guarded
from velora_cli.commands.output import err


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
            help="velora (for velora_cli.apply_config), peft (peft.LoraConfig kwargs), "
            "trainer (TrainingArguments kwargs + snippet), accelerate (an accelerate launch "
            "config: FSDP2/DDP) or torchrun (a launch line + a script that shards the model).",
        ),
    ] = "velora",
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Write here (default: stdout).")
    ] = None,
) -> None:
    """Write the tuned configuration for training code (velora, peft or trainer format)."""
    if output_format not in ("velora", "peft", "trainer", "accelerate", "torchrun"):
        raise UserError(
            f"--format {output_format!r}: choose velora, peft, trainer, accelerate or torchrun"
        )
    import json
    from pathlib import Path

    from velora_cli import autotune, configs
    from velora_cli.exports import peft, trainer

    path = Path(source) if source else autotune.latest("tune-*.json")
    if path is None:
        raise UserError(
            f"no tune document under {autotune.profiles_dir()}/: run velora tune first, or "
            "pass --from FILE"
        )
    config = configs.load_config(path)
    from velora_cli.exports.launch import LAUNCH_FORMATS, write_launch_export

    if output_format in LAUNCH_FORMATS:  # multi-GPU launchers: text files, not JSON
        echo = functools.partial(typer.echo, nl=False)
        write_launch_export(config, output_format, output, echo=echo, err=err, source=path)
        return
    if output_format == "peft" and (why := peft.peft_blockers(config)):
        err(f"note: PEFT cannot express this: {'; '.join(why)}; writing the velora format")
        output_format = "velora"
    if output_format == "velora":
        data = config.to_dict()
    elif output_format == "peft":
        data = peft.to_peft(config)
    else:
        notes = trainer.trainer_notes(config)
        for note in notes:
            err(f"note: {note}")
        data = {
            "format": "trainer",
            "training_arguments": trainer.to_trainer(config),
            "notes": notes,
            "snippet": trainer.trainer_snippet(config),
        }
    text = json.dumps(data, indent=2) + "\n"
    if output:
        Path(output).write_text(text)
        err(f"wrote {output} ({output_format} format, from {path})")
    else:
        typer.echo(text, nl=False)
