"""The ``velora`` command line: parse, call the core, render. No torch import at module level.

Errors a user can fix (unknown model, bad sub-token size, nonsense budget, no CUDA, ...) end as one
line on stderr and exit code 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
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
Mode = Annotated[
    str,
    typer.Option(
        "--mode",
        help="full (all parameters), lora (peft) or qlora (4-bit NF4 frozen base + LoRA; "
        "cpu/cuda need bitsandbytes).",
    ),
]
LoraRank = Annotated[int, typer.Option("--lora-rank", help="LoRA rank (--mode lora, qlora).")]
LoraTargets = Annotated[
    str, typer.Option("--lora-targets", help="LoRA target modules, comma-separated, or all-linear.")
]
Optimizer = Annotated[
    str,
    typer.Option(
        "--optimizer",
        help="adamw|sgd|galore|adarankgrad (the last two: low-rank gradient projection of "
        "2-D weights, --mode full).",
    ),
]
Rank = Annotated[
    int | None,
    typer.Option(
        "--rank",
        help="galore: projection rank; adarankgrad: the most its adaptive rank may reach. "
        "Default: hidden size / 4 (GaLore's ratio).",
    ),
]
UpdateGap = Annotated[
    int,
    typer.Option("--update-gap", help="galore/adarankgrad: steps between subspace refreshes."),
]
Eta = Annotated[
    float,
    typer.Option(
        "--eta", help="adarankgrad: fraction of each gradient's energy the adaptive rank keeps."
    ),
]
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
    optimizer: Annotated[
        str,
        typer.Option(
            "--optimizer",
            help="adamw|sgd|galore|adarankgrad, or several comma-separated: every row is "
            "measured with each (galore/adarankgrad: low-rank gradient projection, --mode full).",
        ),
    ] = "adamw",
    rank: Rank = None,
    update_gap: UpdateGap = 200,
    eta: Eta = 0.9,
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
    optimizers = list(dict.fromkeys(o.strip() for o in optimizer.split(",") if o.strip()))
    if not optimizers:
        raise UserError("--optimizer: give at least one of adamw, sgd, galore, adarankgrad")

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
        optimizer=optimizers[0],
        rank=rank,
        update_gap=update_gap,
        eta=eta,
        weights=weights,
        trust_remote_code=trust_remote_code,
        init=init,
    )
    for name in optimizers[1:]:
        dataclasses.replace(spec, optimizer=name)  # validated before anything is measured
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
    if groups is None and sizes is None:
        # Default sub-token choices that do not fit this model's widths are left out (one
        # notice), rather than reported as failed rows the user never asked for.
        invalid = profiler.validate_strategies(spec, strategies)
        if invalid:
            dropped = sorted({s.num_groups for s in invalid}, reverse=True)
            strategies = [s for s in strategies if s not in invalid]
            notices.append(
                f"default --num-groups {', '.join(map(str, dropped))} left out: does not divide "
                f"every targeted layer of {spec.model} (e.g. {next(iter(invalid.values()))})"
            )
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

    with RowProgress(len(strategies) * len(optimizers)) as progress:
        document = profiler.run_profile(
            spec,
            strategies,
            backend_obj,
            breakdown=breakdown,
            save_path=save_path,
            before_row=progress.start,
            on_row=progress.done,
            notices=notices,
            optimizers=optimizers,
        )
    _render_profile(document, output_format, output, breakdown=breakdown)
    if save_path is not None:
        _err(f"saved: {save_path}")


def _wide_console():
    """A console for tables: the terminal's width, or 140 columns when piped (not 80)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=140)


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _render_profile(
    document, output_format: str, output: str | None, *, breakdown: bool = False
) -> None:
    from velora_cli import report

    if output_format == "json":
        text = report.to_json(document)
    elif output_format == "csv":
        text = report.to_csv(document["rows"])
    else:
        from rich.console import Console

        console = Console(file=io.StringIO(), width=140) if output else _wide_console()
        console.print(report.profile_table(document))
        for table in (
            report.category_table(document, always=breakdown),
            report.breakdown_table(document),
        ):
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


# Options of tune and export-config.
Budget = Annotated[
    str | None,
    typer.Option(
        "--budget",
        help="Memory budget: 10GB (10^9 bytes), 10GiB, 9.5G (= GB), 10240MB, 10240MiB, "
        "123456B. Default on a GPU: its free memory.",
    ),
]
Margin = Annotated[
    float, typer.Option("--margin", help="Headroom kept below the budget (0.05 = 5%).")
]
Objective = Annotated[
    str,
    typer.Option(
        "--objective",
        help="speed (highest tokens/s), memory (lowest peak) or accuracy (smallest loss "
        "change), among the configurations that fit.",
    ),
]
TuneBackend = Annotated[
    str,
    typer.Option(
        "--backend",
        help="auto|cuda|cpu|estimate. auto: cuda when available, else estimate (peaks on "
        "meta tensors, no step run: nothing is verified by a real run).",
    ),
]
TuneModes = Annotated[
    str,
    typer.Option(
        "--mode",
        help="Training modes to search, comma-separated: full, lora, qlora (modes whose "
        "packages are missing are left out with a notice).",
    ),
]
TuneOptimizers = Annotated[
    str,
    typer.Option(
        "--optimizer",
        help="Optimizers to search, comma-separated: adamw, sgd, galore, adarankgrad (the last "
        "two: low-rank gradient projection, tried in full mode only).",
    ),
]
TunePlacements = Annotated[
    str,
    typer.Option(
        "--placements",
        help="VeLoRA placements to try, comma-separated (presets as in profile); no "
        "VeLoRA is always tried.",
    ),
]
TuneNumGroups = Annotated[
    str, typer.Option("--num-groups", help="Sub-token choices as numbers of groups D/M.")
]
TuneGcEvery = Annotated[
    str,
    typer.Option(
        "--gc-every",
        help="Checkpointing every n-th layer to try (comma-separated); none and every "
        "layer are always tried.",
    ),
]
MicroBatches = Annotated[
    str | None,
    typer.Option(
        "--micro-batches",
        help="Micro-batch sizes (divisors of --batch-size; the rest is gradient "
        "accumulation). Default: every power of two that divides it.",
    ),
]
ProbeSteps = Annotated[
    int,
    typer.Option("--probe-steps", help="Optimizer steps of the accuracy probe (0: no probes)."),
]
MaxLossIncrease = Annotated[
    float,
    typer.Option(
        "--max-loss-increase",
        help="Tolerance on the probe's held-out loss vs the baseline (0.01 = +1%).",
    ),
]
ProbeData = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Probe text: a .txt or .jsonl (text field) file, or a Hugging Face dataset "
        "name. Default: English text bundled with Python.",
    ),
]
MaxMeasured = Annotated[
    int | None,
    typer.Option(
        "--max-measured",
        help="Measure at most N candidates (verification not counted). Default: 4 on "
        "the cpu backend, no limit otherwise.",
    ),
]
Resume = Annotated[
    bool,
    typer.Option("--resume", help="Continue the latest tune journal under profiles/."),
]
ResumeFrom = Annotated[
    str | None,
    typer.Option("--resume-from", help="Continue this tune journal (.jsonl); implies --resume."),
]


def _word_list(text: str, option: str, choices: tuple[str, ...] | None = None) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise UserError(f"{option} is empty")
    bad = [v for v in values if choices and v not in choices]
    if bad:
        raise UserError(f"{option} {','.join(bad)}: choose from {', '.join(choices)}")
    return values


@app.command()
@guarded
def tune(
    model: ModelArg = None,
    budget: Budget = None,
    margin: Margin = 0.05,
    objective: Objective = "speed",
    backend: TuneBackend = "auto",
    batch_size: BatchSize = 4,
    seq_len: SeqLen = 256,
    dtype: Dtype = "fp32",
    amp: Amp = None,
    modes: TuneModes = "full,lora,qlora",
    placements: TunePlacements = "paper,all-linear",
    num_groups: TuneNumGroups = "32",
    gc_every: TuneGcEvery = "2",
    micro_batches: MicroBatches = None,
    probe_steps: ProbeSteps = 24,  # = probes.DEFAULT_STEPS (not imported: keeps --help light)
    max_loss_increase: MaxLossIncrease = 0.01,
    data: ProbeData = None,
    max_measured: MaxMeasured = None,
    output_format: Annotated[
        str, typer.Option("--format", help="table (with the recommendation) or json.")
    ] = "table",
    resume: Resume = False,
    resume_from: ResumeFrom = None,
    lora_rank: LoraRank = 8,
    lora_targets: LoraTargets = "all-linear",
    optimizer: TuneOptimizers = "adamw,galore,adarankgrad",  # = autotune.DEFAULT_OPTIMIZERS
    rank: Rank = None,
    update_gap: UpdateGap = 200,  # = lowrank.DEFAULT_UPDATE_GAP (not imported: torch)
    eta: Eta = 0.9,  # = lowrank.DEFAULT_ETA
    init: Init = "batch_average_once",
    weights: Weights = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Find the fastest configuration that fits a memory budget, verified by a real run."""
    from velora_cli.tuner import OBJECTIVES

    if output_format not in ("table", "json"):
        raise UserError(f"--format {output_format!r}: choose table or json")
    if backend not in ("auto", "cuda", "cpu", "estimate"):
        raise UserError(f"--backend {backend!r}: choose auto, cuda, cpu or estimate")
    if objective not in OBJECTIVES:
        raise UserError(f"--objective {objective!r}: choose {', '.join(OBJECTIVES)}")
    if not 0 <= margin < 1:
        raise UserError(f"--margin {margin}: give a fraction in [0, 1), e.g. 0.05 for 5%")
    if not max_loss_increase >= 0:
        raise UserError(f"--max-loss-increase {max_loss_increase}: give a fraction >= 0")
    if probe_steps < 0:
        raise UserError("--probe-steps must be >= 0 (0 turns the probes off)")
    if max_measured is not None and max_measured < 1:
        raise UserError("--max-measured must be >= 1")
    from velora_cli.measure.train_step import MODES, OPTIMIZERS

    mode_list = _word_list(modes, "--mode", MODES)
    optimizer_list = _word_list(optimizer, "--optimizer", OPTIMIZERS)
    placement_list = [p for p in _word_list(placements, "--placements") if p != "none"]
    groups = _int_list(num_groups, "--num-groups")
    gc_list = _int_list(gc_every, "--gc-every")
    if any(n < 1 for n in [*groups, *gc_list]):
        raise UserError("--num-groups and --gc-every take integers >= 1")
    micros = _int_list(micro_batches, "--micro-batches") if micro_batches else None

    from velora_cli import autotune, models
    from velora_cli.budget import describe_budget, format_bytes, parse_budget
    from velora_cli.placement import parse_placement

    for placement in placement_list:
        parse_placement(placement)
    notices = []
    budget_bytes = parse_budget(budget) if budget is not None else None
    from velora_cli.measure.cuda import cuda_available

    gpu = cuda_available()
    if backend == "auto":
        backend = "cuda" if gpu else "estimate"
        if not gpu:
            notices.append(
                "auto backend without a GPU: memory estimated on meta tensors, nothing run; "
                "--backend cpu measures real steps on this CPU"
            )
    journal_path = None
    if resume or resume_from:
        from pathlib import Path

        journal_path = Path(resume_from) if resume_from else autotune.latest("tune-*.jsonl")
        if journal_path is None:
            raise UserError(
                f"no tune journal under {autotune.profiles_dir()}/ to resume; run velora tune "
                "without --resume, or pass --resume-from PATH"
            )
    budget_source = f"--budget {budget}" if budget is not None else None
    if budget_bytes is None and gpu:
        import torch

        budget_bytes = torch.cuda.mem_get_info()[0]
        budget_source = "free GPU memory"
    if budget_bytes is None and journal_path is not None and journal_path.is_file():
        from velora_cli.tuner import Journal

        budget_bytes = (Journal.load(journal_path).context or {}).get("budget_bytes")
        budget_source = f"the budget of {journal_path}"
    if budget_bytes is None:
        raise UserError(
            "no --budget given and no GPU to read the free memory from: pass --budget, "
            "e.g. --budget 10GB"
        )
    echo = f"{describe_budget(budget_bytes, budget)}" if budget else describe_budget(budget_bytes)
    _err(
        f"budget: {echo} ({budget_source}); configurations must peak at or below "
        f"{format_bytes(int(budget_bytes * (1 - margin)))} ({margin:.0%} margin)"
    )
    settings = autotune.TuneSettings(
        model=model or models.DEFAULT_MODEL,
        budget_bytes=budget_bytes,
        backend=backend,
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=dtype,
        amp=amp,
        optimizers=tuple(dict.fromkeys(optimizer_list)),
        rank=rank,
        update_gap=update_gap,
        eta=eta,
        lora_rank=lora_rank,
        lora_targets=lora_targets,
        init=init,
        weights=weights,
        trust_remote_code=trust_remote_code,
        modes=tuple(mode_list),
        placements=tuple(placement_list),
        num_groups=tuple(groups),
        gc_every=tuple(n for n in gc_list if n > 1),
        micro_batches=tuple(micros) if micros else None,
        margin=margin,
        objective=objective,
        max_loss_increase=max_loss_increase,
        max_measured=max_measured,
        probe_steps=probe_steps,
        data=data,
        budget_source=budget_source,
    )
    settings.base_spec()  # validates batch, precision, modes × optimizers, ranks (one line)
    if model is None:
        notices.append(f"no MODEL given: tuning the built-in default {settings.model}")
    if journal_path is not None:
        journal = autotune.resume_journal(journal_path, settings)
        save_path = journal_path.with_suffix(".json")
        _err(f"resuming {journal_path} ({len(journal)} finished results)")
    else:
        from velora_cli.tuner import Journal

        save_path, journal_path = autotune.new_paths(settings.model)
        journal = Journal(journal_path, context=settings.context())
    try:
        document = autotune.run(
            settings,
            save_path=save_path,
            journal=journal,
            progress=autotune.TuneProgress(_err),
            echo=_err,
            notices=notices,
        )
    except KeyboardInterrupt:
        _err(f"journal: {journal_path}; continue with the same command and --resume")
        raise
    _render_tune(document, output_format)
    _err(f"saved: {save_path}")
    if document["recommendation"] is None:
        _fail(document["reason"])


def _render_tune(document: dict, output_format: str) -> None:
    from velora_cli import report

    if output_format == "json":
        import json

        typer.echo(json.dumps(document, indent=2, default=str))
        return
    console = _wide_console()
    console.print(report.tune_table(document))
    lines = report.summary_lines(document)
    if document["recommendation"] is None:
        lines += report.nothing_fits_lines(document)
    for line in lines:
        console.print(line, highlight=False, markup=False)


@app.command("export-config")
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
            help="velora (for velora_cli.apply_config), peft (peft.LoraConfig kwargs) or "
            "trainer (TrainingArguments kwargs + snippet).",
        ),
    ] = "velora",
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Write here (default: stdout).")
    ] = None,
) -> None:
    """Write the tuned configuration for training code (velora, peft or trainer format)."""
    if output_format not in ("velora", "peft", "trainer"):
        raise UserError(f"--format {output_format!r}: choose velora, peft or trainer")
    import json
    from pathlib import Path

    from velora_cli import autotune, configs

    path = Path(source) if source else autotune.latest("tune-*.json")
    if path is None:
        raise UserError(
            f"no tune document under {autotune.profiles_dir()}/: run velora tune first, or "
            "pass --from FILE"
        )
    config = configs.load_config(path)
    if output_format == "peft" and (why := configs.peft_blockers(config)):
        _err(f"note: PEFT cannot express this: {'; '.join(why)}; writing the velora format")
        output_format = "velora"
    if output_format == "velora":
        data = config.to_dict()
    elif output_format == "peft":
        data = configs.to_peft(config)
    else:
        notes = configs.trainer_notes(config)
        for note in notes:
            _err(f"note: {note}")
        data = {
            "format": "trainer",
            "training_arguments": configs.to_trainer(config),
            "notes": notes,
            "snippet": configs.trainer_snippet(config),
        }
    text = json.dumps(data, indent=2) + "\n"
    if output:
        Path(output).write_text(text)
        _err(f"wrote {output} ({output_format} format, from {path})")
    else:
        typer.echo(text, nl=False)


def main() -> None:
    """Console-script entry point."""
    import logging
    import warnings

    # bitsandbytes (when installed) warns at import, on CPUs with AVX512-BF16, that an optional
    # hub kernel package is missing; peft/transformers import it even for full training.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # peft asks transformers 5 a deprecated question on LoRA + checkpointing rows; the warning is
    # about their code, not the user's, and interleaves with our progress lines.
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    app()
