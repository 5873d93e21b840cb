"""The ``velora`` command line: parse, call the core, render. No torch import at module level.

Errors a user can fix (unknown model, bad sub-token size, nonsense budget, no CUDA, ...) end as one
line on stderr and exit code 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import io
import sys
from typing import Annotated

import typer

from velora_cli import __version__

app = typer.Typer(
    name="velora",
    help="Measure and tune the training memory of Hugging Face models with VeLoRA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"debug": False}


class UserError(Exception):
    """An error whose message tells the user what to do; shown as one line, exit code 1."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that carry a one-line, actionable message (imported only when raised)."""
    types: list[type[BaseException]] = [UserError, ValueError, FileNotFoundError, PermissionError]
    for module, name in (
        ("velora_cli.models", "ModelError"),
        ("velora_cli.budget", "BudgetError"),
    ):
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, name):
            types.append(getattr(mod, name))
    return tuple(types)


def _fail(message: str) -> None:
    first_line = " ".join(str(message).split()) or "unknown error"
    typer.echo(f"error: {first_line}", err=True)
    raise typer.Exit(code=1)


def guarded(command):
    """Turn exceptions into one line + exit 1 (a traceback only with --debug)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted: results measured so far were saved as they arrived", err=True)
            raise typer.Exit(code=130) from None
        except Exception as exc:  # noqa: BLE001 - the boundary: everything becomes one line
            if _state["debug"]:
                raise
            if _is_oom(exc):
                _fail(
                    "out of memory: lower --batch-size/--seq-len, use checkpointing or VeLoRA, "
                    "or run with --backend estimate"
                )
            if isinstance(exc, _user_error_types()):
                _fail(str(exc))
            _fail(f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)")

    return wrapper


def _is_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch else None
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"velora {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Show the version."
        ),
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """velora: will VeLoRA, checkpointing or both make your training run fit, and how fast?"""
    _state["debug"] = debug


def _not_yet(command: str) -> None:
    _fail(f"`velora {command}` is not available yet in this version ({__version__})")


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(
            f"{option} takes comma-separated integers, e.g. 64,32,16; got {text!r}"
        ) from None
    if not values:
        raise UserError(f"{option} is empty")
    return values


# Options shared by profile and tune, defined once.
ModelArg = Annotated[
    str | None,
    typer.Argument(
        help="Hub id, local directory with config.json, or built-in name (velora "
        "models). Default: a small built-in."
    ),
]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Sequences per step.")]
SeqLen = Annotated[int, typer.Option("--seq-len", "-s", help="Tokens per sequence.")]
Dtype = Annotated[str, typer.Option("--dtype", help="Weights/optimizer dtype: fp32|bf16|fp16.")]
Amp = Annotated[
    str | None,
    typer.Option("--amp", help="Mixed precision (fp32 master weights + autocast): bf16|fp16."),
]
Mode = Annotated[str, typer.Option("--mode", help="full (all parameters) or lora (peft).")]
LoraRank = Annotated[int, typer.Option("--lora-rank", help="LoRA rank (--mode lora).")]
LoraTargets = Annotated[
    str, typer.Option("--lora-targets", help="LoRA target modules, comma-separated, or all-linear.")
]
Optimizer = Annotated[str, typer.Option("--optimizer", help="adamw|sgd.")]
Backend = Annotated[
    str,
    typer.Option(
        "--backend",
        help="auto|cuda|cpu|estimate. auto: cuda when available, "
        "else estimate (+ cpu step times for small models).",
    ),
]
Weights = Annotated[
    bool,
    typer.Option(
        "--weights",
        help="Load the checkpoint's weights (default: random "
        "weights from the config; memory and time do not depend on values).",
    ),
]
TrustRemoteCode = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow model code from the hub repo.")
]
Init = Annotated[
    str, typer.Option("--init", help="VeLoRA v init: batch_average_once|batch_average|random.")
]


@app.command()
@guarded
def profile(
    model: ModelArg = None,
    batch_size: BatchSize = 4,
    seq_len: SeqLen = 256,
    dtype: Dtype = "fp32",
    amp: Amp = None,
    mode: Mode = "full",
    lora_rank: LoraRank = 8,
    lora_targets: LoraTargets = "all-linear",
    optimizer: Optimizer = "adamw",
    placements: Annotated[
        str,
        typer.Option(
            "--placements",
            help="VeLoRA placements, comma-separated; presets "
            "paper, qkv, attn, mlp, down, all-linear, combinable with '+'.",
        ),
    ] = "paper,qkv+down,mlp,all-linear",
    num_groups: Annotated[
        str | None,
        typer.Option(
            "--num-groups", help="Sub-token choices as numbers of groups D/M (default 64,32,16)."
        ),
    ] = None,
    sub_token_size: Annotated[
        str | None,
        typer.Option(
            "--sub-token-size", help="Sub-token choices as absolute M (instead of --num-groups)."
        ),
    ] = None,
    gc_every: Annotated[
        str,
        typer.Option(
            "--gc-every",
            help="Extra checkpointing rows: every n-th layer "
            "(comma-separated; full checkpointing is always a row).",
        ),
    ] = "2",
    velora_gc: Annotated[
        bool,
        typer.Option("--velora-gc/--no-velora-gc", help="Rows with VeLoRA + full checkpointing."),
    ] = True,
    backend: Backend = "auto",
    init: Init = "batch_average_once",
    warmup: Annotated[int | None, typer.Option("--warmup", help="Warm-up steps per row.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Timed steps per row.")] = None,
    breakdown: Annotated[
        bool, typer.Option("--breakdown", help="Saved activations per module type.")
    ] = False,
    output_format: Annotated[
        str, typer.Option("--format", help="table|json|csv (to stdout or --output).")
    ] = "table",
    output: Annotated[str | None, typer.Option("--output", "-o", help="Write here.")] = None,
    save: Annotated[
        bool,
        typer.Option(
            "--save/--no-save",
            help="Save the profile document under profiles/ (or $VELORA_PROFILES_DIR).",
        ),
    ] = True,
    weights: Weights = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Measure peak memory and step time of VeLoRA placements vs baseline and checkpointing."""
    if output_format not in ("table", "json", "csv"):
        raise UserError(f"--format {output_format!r}: choose table, json or csv")
    if backend not in ("auto", "cuda", "cpu", "estimate"):
        raise UserError(f"--backend {backend!r}: choose auto, cuda, cpu or estimate")
    for name, value in (("--warmup", warmup), ("--steps", steps)):
        if value is not None and value < (0 if name == "--warmup" else 1):
            raise UserError(f"{name} must be {'>= 0' if name == '--warmup' else '>= 1'}")
    groups = _int_list(num_groups, "--num-groups") if num_groups else None
    sizes = _int_list(sub_token_size, "--sub-token-size") if sub_token_size else None
    gc_list = _int_list(gc_every, "--gc-every")
    if any(n < 1 for n in gc_list):
        raise UserError("--gc-every takes layer intervals >= 1")
    placement_list = [p.strip() for p in placements.split(",") if p.strip()]

    from velora_cli import models, profiler
    from velora_cli.measure.train_step import StepSpec

    spec = StepSpec(
        model=model or models.DEFAULT_MODEL,
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=dtype,
        amp=amp,
        mode=mode,
        lora_rank=lora_rank,
        lora_targets=lora_targets,
        optimizer=optimizer,
        weights=weights,
        trust_remote_code=trust_remote_code,
        init=init,
    )
    from velora_cli.placement import parse_placement

    for placement in placement_list:
        parse_placement(placement)
    strategies = profiler.plan_strategies(
        placement_list,
        num_groups=groups,
        sub_token_sizes=sizes,
        gc_every=gc_list,
        velora_gc=velora_gc,
    )
    resolved = models.resolve_model(spec.model, trust_remote_code=trust_remote_code)
    notices = [resolved.notice] if resolved.notice else []
    if model is None:
        notices.append(f"no MODEL given: profiling the built-in default {spec.model}")
    backend_obj = profiler.make_backend(backend, spec, warmup=warmup, steps=steps)
    if backend == "auto" and backend_obj.name == "estimate":
        notices.append(
            "auto backend without a GPU: memory estimated on meta tensors; step "
            "times measured on this CPU where the model is small enough"
        )
    save_path = profiler.default_save_path(spec, backend_obj.name) if save else None
    for notice in notices:
        _err(f"note: {notice}")

    from velora_cli.progress import RowProgress

    with RowProgress(len(strategies)) as progress:
        document = profiler.run_profile(
            spec,
            strategies,
            backend_obj,
            breakdown=breakdown,
            save_path=save_path,
            before_row=progress.start,
            on_row=progress.done,
            notices=notices,
        )
    _render_profile(document, output_format, output)
    if save_path is not None:
        _err(f"saved: {save_path}")


def _wide_console():
    """A console for tables: the terminal's width, or 140 columns when piped (not 80)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=140)


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _render_profile(document, output_format: str, output: str | None) -> None:
    from velora_cli import report

    if output_format == "json":
        text = report.to_json(document)
    elif output_format == "csv":
        text = report.to_csv(document["rows"])
    else:
        from rich.console import Console

        console = Console(file=io.StringIO(), width=140) if output else _wide_console()
        console.print(report.profile_table(document))
        table = report.breakdown_table(document)
        if table is not None:
            console.print(table)
        for line in report.profile_footer(document):
            console.print(f"[dim]{line}[/dim]", highlight=False)
        if not output:
            return
        text = console.file.getvalue()
    if output:
        from pathlib import Path

        Path(output).write_text(text if text.endswith("\n") else text + "\n")
        _err(f"wrote {output}")
    else:
        typer.echo(text)


@app.command()
@guarded
def models() -> None:
    """List the built-in architectures (usable offline, random weights)."""
    from rich.table import Table

    from velora_cli.budget import format_bytes
    from velora_cli.models import list_builtins

    table = Table(title="built-in architectures", title_justify="left")
    for column in ("name", "type", "params", "layers", "hidden", "fp32 weights", "hub ids"):
        table.add_column(
            column,
            justify="right" if column in ("params", "layers", "hidden", "fp32 weights") else "left",
        )
    for row in list_builtins():
        table.add_row(
            row["name"],
            row["model_type"],
            f"{row['params'] / 1e6:,.0f}M",
            str(row["layers"]),
            str(row["hidden"]),
            format_bytes(row["params"] * 4),
            ", ".join(row.get("hub_ids", [])),
        )
    _wide_console().print(table)


@app.command()
@guarded
def tune() -> None:
    """Find the fastest configuration that fits a memory budget, verified by a real run."""
    _not_yet("tune")


@app.command("export-config")
@guarded
def export_config() -> None:
    """Write the tuned configuration for training code (velora, peft or trainer format)."""
    _not_yet("export-config")


def main() -> None:
    """Console-script entry point."""
    app()
