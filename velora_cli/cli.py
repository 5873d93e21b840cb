"""The ``velora`` command line: the typer app, its root options, and one command per module under
``velora_cli/commands/`` (parse, call the core, render). No torch import at module level.

Errors a user can fix (unknown model, bad sub-token size, nonsense budget, no CUDA, ...) end as one
line on stderr and exit code 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

from typing import Annotated

import typer

from velora_cli import __version__
from velora_cli.commands import export, models, plot, profile, tune, validate
from velora_cli.commands.errors import state

app = typer.Typer(
    name="velora",
    help="Measure and tune the training memory of Hugging Face models with VeLoRA.",
    invoke_without_command=True,  # `velora` alone prints the help and exits 0 (see root)
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"velora {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Show the version."
        ),
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """velora: will VeLoRA, checkpointing or both make your training run fit, and how fast?"""
    state["debug"] = debug
    _debug_log(debug)  # with --debug, a row that failed shows its traceback (`measure.failed_row`)
    if ctx.invoked_subcommand is None:  # no command: help is what was asked for, not an error
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


def _debug_log(debug: bool) -> None:
    """velora's debug log on stderr with --debug (stderr as it is at each record), else off."""
    import logging
    import sys

    if not debug:
        logging.getLogger("velora_cli").setLevel(logging.NOTSET)  # the root's: warnings only
        return

    class Stderr(logging.StreamHandler):
        stream = property(lambda self: sys.stderr, lambda self, value: None)

    logger = logging.getLogger("velora_cli")
    if not any(isinstance(h, Stderr) for h in logger.handlers):
        handler = Stderr()
        handler.setFormatter(logging.Formatter("velora debug: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


app.command()(profile.profile)
app.command()(models.models)
app.command()(tune.tune)
app.command("export-config")(export.export_config)
app.command()(plot.plot)
app.command()(validate.validate)


def main() -> None:
    """Console-script entry point."""
    import logging
    import warnings

    from velora_cli import gcpause

    gcpause.pause()  # until the first model is built (measure.train_step.prepare)

    # bitsandbytes (when installed) warns at import, on CPUs with AVX512-BF16, that an optional
    # hub kernel package is missing; peft/transformers import it even for full training.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # peft asks transformers 5 a deprecated question on LoRA + checkpointing rows; the warning is
    # about their code, not the user's, and interleaves with our progress lines.
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    app()
