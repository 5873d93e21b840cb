"""``velora profile``: measure every strategy's peak memory and step time on one backend."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from velora_cli.commands import checks
from velora_cli.commands.errors import UserError, guarded
from velora_cli.commands.options import (
    AllocConf,
    Amp,
    Attn,
    Backend,
    BatchSize,
    ComputeDtype,
    CpuOffload,
    DoubleQuant,
    Dtype,
    Eta,
    GcReentrant,
    Gpu,
    Init,
    KbitPrepare,
    LengthData,
    LengthsOption,
    LoraRank,
    LoraTargets,
    Mode,
    ModelArg,
    Offload,
    Packing,
    Padding,
    ParallelOption,
    PlotOut,
    ProfileBudget,
    QuantStorage,
    Rank,
    RepeatKv,
    Sac,
    SeqLen,
    Task,
    TrainerOption,
    TransformersVersion,
    TrustRemoteCode,
    UpdateGap,
    Weights,
    choice_list,
    int_list,
    recipe_of,
    word_list,
)
from velora_cli.commands.output import err, wide_console

if TYPE_CHECKING:
    from velora_cli.measure.train_step import StepSpec


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
            help="adamw|sgd|galore|adarankgrad or the HF Trainer's optim names (adamw_torch, "
            "adamw_torch_fused, adamw_torch_forloop, adamw_bnb_8bit, paged_adamw_8bit, "
            "paged_adamw_32bit, adafactor), or several comma-separated: every row is measured "
            "with each (galore/adarankgrad: low-rank gradient projection, --mode full).",
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
            "--num-groups",
            help="Sub-token choices as numbers of groups D/M. Default: per model, three that "
            "divide every targeted layer's width, around the paper's 32 (64,32,16 for Llama-2-7b).",
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
    gpu: Gpu = None,
    plot: PlotOut = None,
    memory_snapshot: Annotated[
        str | None,
        typer.Option(
            "--memory-snapshot",
            help="cuda backend: also record a CUDA memory snapshot of each row's step into "
            "this directory, for PyTorch's memory_viz (skipped on other backends).",
        ),
    ] = None,
    compare: Annotated[
        str | None,
        typer.Option(
            "--compare",
            help="A run record of velora_cli.VeloraCallback (or 'latest'): predict the step "
            "it ran on --backend and show its measured figures beside the prediction.",
        ),
    ] = None,
    ctx: typer.Context = None,
    alloc_conf: AllocConf = None,
    world_size: Annotated[
        int,
        typer.Option(
            "--world-size",
            help="Ranks (GPUs) of the job; --batch-size is per rank. 1: one process, no "
            "torch.distributed (unless --parallel is given).",
        ),
    ] = 1,
    parallel: ParallelOption = None,
    cpu_offload: CpuOffload = False,
    trainer: TrainerOption = "hf",
    gc_reentrant: GcReentrant = False,
    double_quant: DoubleQuant = True,
    compute_dtype: ComputeDtype = None,
    quant_storage: QuantStorage = "uint8",
    kbit_prepare: KbitPrepare = True,
    attn: Attn = "auto",
    task: Task = None,
    padding: Padding = False,
    repeat_kv: RepeatKv = False,
    transformers_version: TransformersVersion = None,
    lengths: LengthsOption = None,
    data: LengthData = None,
    packing: Packing = False,
    sac: Sac = "none",
    offload: Offload = "none",
    budget: ProfileBudget = None,
) -> None:
    """Measure peak memory and step time of VeLoRA placements vs baseline and checkpointing."""
    options = ProfileOptions(**{k: v for k, v in locals().items() if k != "ctx"})
    if compare is not None:
        from velora_cli.commands.compare import compare_run

        return compare_run(
            compare, ctx=ctx, model=model, backend=backend, gpu=gpu, warmup=warmup,
            steps=steps, output_format=output_format, output=output, save=save,
            weights=weights, trust_remote_code=trust_remote_code,
        )  # fmt: skip
    plan = profile_plan(options)
    document = run_plan(plan)
    render_profile(document, output_format, output, breakdown=breakdown)
    if plan.save_path is not None:
        err(f"saved: {plan.save_path}")
    if plot is not None:
        from velora_cli import plots

        err(f"wrote {plots.render(document, plot)}")
    code = document["verdict"]["exit_code"]
    if plan.budget_bytes is not None and code:  # for a CI gate: 1 nothing fits, 2 nothing estimated
        raise typer.Exit(code=code)


@dataclasses.dataclass(frozen=True)
class ProfileOptions:
    """``velora profile``'s options as typed (strings, before parsing); names as in `profile`."""

    model: str | None
    batch_size: int
    seq_len: int
    dtype: str
    amp: str | None
    mode: str
    lora_rank: int
    lora_targets: str
    optimizer: str
    rank: int | None
    update_gap: int
    eta: float
    placements: str
    num_groups: str | None
    sub_token_size: str | None
    gc_every: str
    velora_gc: bool
    backend: str
    init: str
    warmup: int | None
    steps: int | None
    breakdown: bool
    output_format: str
    output: str | None
    save: bool
    weights: bool
    trust_remote_code: bool
    gpu: str | None
    plot: str | None
    memory_snapshot: str | None
    compare: str | None
    alloc_conf: str | None
    world_size: int
    parallel: str | None
    cpu_offload: bool
    trainer: str
    gc_reentrant: bool
    double_quant: bool
    compute_dtype: str | None
    quant_storage: str
    kbit_prepare: bool
    attn: str
    task: str | None
    padding: bool
    repeat_kv: bool
    transformers_version: str | None
    lengths: str | None
    data: str | None
    packing: bool
    sac: str
    offload: str
    budget: str | None


@dataclasses.dataclass(frozen=True)
class ProfilePlan:
    """What a profile runs: the step, its rows, the backend, where the document goes."""

    spec: StepSpec
    strategies: list
    backend: object  # a measure.Backend, or the per-rank one of velora_cli.parallel
    optimizers: list[str]
    parallels: list[str] | None
    breakdown: bool
    save_path: Path | None
    notices: list[str]  # echoed, and recorded in the document
    quiet: list[str]  # recorded only: how the defaults were chosen
    budget_bytes: int | None  # --budget: which rows fit (the verdict and the exit code)


def profile_plan(o: ProfileOptions) -> ProfilePlan:
    """Parse and check every option, then resolve the model and the rows; nothing is measured.

    The checks come first, cheapest first: a mistyped option fails before the backend is made,
    and ``--backend cuda`` without a GPU fails before any hub lookup.
    """
    checks.choice("--format", o.output_format, ("table", "json", "csv"))
    checks.backend(o.backend)
    for name, value in (("--warmup", o.warmup), ("--steps", o.steps)):
        if value is not None and value < (0 if name == "--warmup" else 1):
            raise UserError(f"{name} must be {'>= 0' if name == '--warmup' else '>= 1'}")
    checks.gpu(o.gpu)
    checks.plot_target(o.plot)
    checks.alloc_conf(o.alloc_conf, inherit=False)
    groups = int_list(o.num_groups, "--num-groups") if o.num_groups else None
    sizes = int_list(o.sub_token_size, "--sub-token-size") if o.sub_token_size else None
    gc_list = checks.intervals(o.gc_every, "--gc-every")
    from velora_cli.measure.train_step import OFFLOAD_KINDS, SAC_POLICIES

    sac_list = choice_list(o.sac, "--sac", SAC_POLICIES)  # opt-in rows: the default stays
    offload_list = choice_list(o.offload, "--offload", OFFLOAD_KINDS)
    budget_bytes = checks.budget(o.budget)  # rows that fit, and the exit code, say it
    placement_list = [p.strip() for p in o.placements.split(",") if p.strip()]
    optimizers = list(dict.fromkeys(x.strip() for x in o.optimizer.split(",") if x.strip()))
    if not optimizers:
        raise UserError("--optimizer: give at least one optimizer (adamw, adamw_torch_fused, ...)")

    from velora_cli import models
    from velora_cli.gpus import get_gpu
    from velora_cli.measure.lengths import for_lengths
    from velora_cli.measure.recipe import check_precision
    from velora_cli.measure.train_step import StepSpec, check_device, for_task
    from velora_cli.parallel import PARALLEL
    from velora_cli.profiling import profiler

    parallels = word_list(o.parallel, "--parallel", PARALLEL) if o.parallel else None
    if parallels is None and o.world_size > 1:
        parallels = ["fsdp"]
    spec = StepSpec(
        model=o.model or models.DEFAULT_MODEL,
        batch_size=o.batch_size,
        seq_len=o.seq_len,
        dtype=o.dtype,
        amp=o.amp,
        mode=o.mode,
        lora_rank=o.lora_rank,
        lora_targets=o.lora_targets,
        optimizer=optimizers[0],
        rank=o.rank,
        update_gap=o.update_gap,
        eta=o.eta,
        weights=o.weights,
        trust_remote_code=o.trust_remote_code,
        init=o.init,
        world_size=o.world_size,
        parallel=parallels[0] if parallels else None,
        cpu_offload=o.cpu_offload,
        trainer=o.trainer,
        attn=o.attn,
        task=o.task,
        padding=o.padding or bool(o.lengths or o.data) and not o.packing,
        packing=o.packing,
        repeat_kv=o.repeat_kv,
        transformers_version=o.transformers_version,
        **recipe_of(o, [o.mode]),
    )
    if o.gpu:  # bf16 on a T4 or V100 fails here, in one line (the cuda backend: make_backend)
        check_precision(get_gpu(o.gpu), spec)
    for name in optimizers[1:]:
        dataclasses.replace(spec, optimizer=name)  # validated before anything is measured
    for name in (parallels or [])[1:]:
        dataclasses.replace(spec, parallel=name)
    checks.placements(placement_list)
    checks.output_file(o.output)  # before anything is measured
    # the backend first: --backend cuda without a GPU fails before any hub lookup
    backend = profiler.make_backend(
        o.backend, spec, warmup=o.warmup, steps=o.steps, gpu=o.gpu, alloc_conf=o.alloc_conf
    )
    for name in optimizers:  # a paged optimizer on the cpu, bitsandbytes missing: one line
        check_device(dataclasses.replace(spec, optimizer=name), backend.name)
    resolved = models.resolve_model(spec.model, trust_remote_code=o.trust_remote_code, task=o.task)
    spec, seq_note = for_task(spec, resolved)  # an image's tokens are its patches
    # --lengths/--data: planned for the longest batch (measure/lengths.py)
    spec, length_note = for_lengths(
        spec, resolved, checks.lengths(o.lengths, o.data, resolved, o.seq_len)
    )
    notices = [resolved.notice] if resolved.notice else []
    notices += [note for note in (seq_note, length_note) if note]
    if o.model is None:
        notices.append(f"no MODEL given: profiling the built-in default {spec.model}")
    if spec.transformers_version is not None:
        from velora_cli.measure.loss_path import unread

        model_type = getattr(resolved.config, "model_type", None)
        note = unread(model_type, spec.transformers_version, resolved.task)
        notices += [note] if note else []
    if o.weights:
        notices.append(_weights_notice(resolved, backend.name))
    quiet = []
    if groups is None and sizes is None and placement_list:
        from velora_cli.profiling.num_groups import default_num_groups

        groups, line = default_num_groups(spec, placement_list)
        quiet.append(line)
    strategies = profiler.plan_strategies(
        placement_list,
        num_groups=groups,
        sub_token_sizes=sizes,
        gc_every=gc_list,
        velora_gc=o.velora_gc,
        sac=sac_list,
        offload=offload_list,
    )
    if o.backend == "auto" and backend.name == "estimate":
        notices.append(
            "auto backend without a GPU: memory estimated on meta tensors and step time "
            f"predicted for {get_gpu(o.gpu).name} (--gpu); --backend cpu times real CPU steps"
        )
    if o.memory_snapshot:
        from velora_cli.measure.snapshot import snapshot_notice

        notices.append(snapshot_notice(backend, o.memory_snapshot))
    return ProfilePlan(
        spec=spec,
        strategies=strategies,
        backend=backend,
        optimizers=optimizers,
        parallels=parallels,
        breakdown=o.breakdown,
        save_path=profiler.default_save_path(spec, backend.name) if o.save else None,
        notices=notices,
        quiet=quiet,
        budget_bytes=budget_bytes,
    )


def _weights_notice(resolved, backend: str) -> str:
    from velora_cli.models.weights import check_weights

    source = check_weights(resolved)
    if backend != "estimate":
        return f"--weights: {source}, loaded for every row that runs a step"
    return (
        f"--weights: {source} is not loaded: the estimate holds shapes only, from the "
        "config (memory does not depend on weight values); cpu or cuda rows load it"
    )


def run_plan(plan: ProfilePlan) -> dict:
    """Measure every row (saved as it arrives), with progress on stderr."""
    from velora_cli.profiling import profiler
    from velora_cli.report.progress import RowProgress

    for notice in plan.notices:
        err(f"note: {notice}")
    rows = len(plan.strategies) * len(plan.optimizers) * len(plan.parallels or [None])
    try:
        with RowProgress(rows) as progress:
            return profiler.run_profile(
                plan.spec,
                plan.strategies,
                plan.backend,
                breakdown=plan.breakdown,
                save_path=plan.save_path,
                before_row=progress.start,
                on_row=progress.done,
                notices=plan.notices + plan.quiet,
                optimizers=plan.optimizers,
                parallels=plan.parallels,
                budget=plan.budget_bytes,
            )
    except BaseException:
        path = plan.save_path
        if path is not None and path.is_file() and path.stat().st_size == 0:
            path.unlink()  # reserved, never written: nothing was measured
        raise


def render_profile(
    document, output_format: str, output: str | None, *, breakdown: bool = False
) -> None:
    from velora_cli import report

    if output_format == "json":
        text = report.to_json(document)
    elif output_format == "csv":
        text = report.to_csv(document["rows"])
    else:
        console = wide_console(io.StringIO()) if output else wide_console()
        console.print(report.profile_table(document))
        from velora_cli.report.ranks import rank_table

        ranks = rank_table(document)  # per rank: its categories replace the table below
        for table in (
            report.category_table(document, always=breakdown) if ranks is None else ranks,
            report.breakdown_table(document),
            report.device_table(document),
        ):
            if table is not None:
                console.print(table)
        for line in report.profile_footer(document):
            console.print(f"[dim]{line}[/dim]", highlight=False)
        from velora_cli.report.verdict import offload_lines, verdict_lines

        for line in offload_lines(document):
            console.print(f"[dim]{line}[/dim]", highlight=False)
        for line in verdict_lines(document["verdict"]):  # last: what to do, where the eye lands
            console.print(f"[bold]{line}[/bold]", highlight=False)
        if not output:
            return
        text = console.file.getvalue()
    if output:
        from velora_cli.files import write_text_atomic

        write_text_atomic(output, text if text.endswith("\n") else text + "\n")
        err(f"wrote {output}")
    else:
        typer.echo(text)
