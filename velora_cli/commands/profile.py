"""``velora profile``: measure every strategy's peak memory and step time on one backend."""

from __future__ import annotations

import dataclasses
import io
from typing import Annotated

import typer

from velora_cli.commands.errors import UserError, guarded
from velora_cli.commands.options import (
    AllocConf,
    Amp,
    Backend,
    BatchSize,
    CpuOffload,
    Dtype,
    Eta,
    Gpu,
    Init,
    LoraRank,
    LoraTargets,
    Mode,
    ModelArg,
    Offload,
    ParallelOption,
    PlotOut,
    ProfileBudget,
    Rank,
    Sac,
    SeqLen,
    TrustRemoteCode,
    UpdateGap,
    Weights,
    choice_list,
    int_list,
    word_list,
)
from velora_cli.commands.output import err, wide_console
from velora_cli.gpus import get_gpu


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
    sac: Sac = "none",  # opt-in rows: the default profile stays as it was
    offload: Offload = "none",
    budget: ProfileBudget = None,
) -> None:
    """Measure peak memory and step time of VeLoRA placements vs baseline and checkpointing."""
    if compare is not None:
        from velora_cli.commands.compare import compare_run

        return compare_run(
            compare, ctx=ctx, model=model, backend=backend, gpu=gpu, warmup=warmup,
            steps=steps, output_format=output_format, output=output, save=save,
            weights=weights, trust_remote_code=trust_remote_code,
        )  # fmt: skip
    if output_format not in ("table", "json", "csv"):
        raise UserError(f"--format {output_format!r}: choose table, json or csv")
    if backend not in ("auto", "cuda", "cpu", "estimate"):
        raise UserError(f"--backend {backend!r}: choose auto, cuda, cpu or estimate")
    for name, value in (("--warmup", warmup), ("--steps", steps)):
        if value is not None and value < (0 if name == "--warmup" else 1):
            raise UserError(f"{name} must be {'>= 0' if name == '--warmup' else '>= 1'}")
    get_gpu(gpu)  # an unknown --gpu fails before anything is built
    if plot is not None:  # before the run, not after it
        from velora_cli import plots

        plots.check_output(plot)
        plots.require_matplotlib()
    if alloc_conf is not None:
        from velora_cli.allocator.config import parse_alloc_conf

        parse_alloc_conf(alloc_conf)  # a bad string fails before anything is built
    groups = int_list(num_groups, "--num-groups") if num_groups else None
    sizes = int_list(sub_token_size, "--sub-token-size") if sub_token_size else None
    gc_list = int_list(gc_every, "--gc-every")
    if any(n < 1 for n in gc_list):
        raise UserError("--gc-every takes layer intervals >= 1")
    placement_list = [p.strip() for p in placements.split(",") if p.strip()]
    from velora_cli.measure.train_step import OFFLOAD_KINDS, SAC_POLICIES

    sac_list = choice_list(sac, "--sac", SAC_POLICIES)
    offload_list = choice_list(offload, "--offload", OFFLOAD_KINDS)
    budget_bytes = None
    if budget is not None:
        from velora_cli.budget import parse_budget

        budget_bytes = parse_budget(budget)
    optimizers = list(dict.fromkeys(o.strip() for o in optimizer.split(",") if o.strip()))
    if not optimizers:
        raise UserError("--optimizer: give at least one of adamw, sgd, galore, adarankgrad")

    from velora_cli import models
    from velora_cli.measure.train_step import StepSpec
    from velora_cli.parallel import PARALLEL
    from velora_cli.profiling import profiler

    parallels = word_list(parallel, "--parallel", PARALLEL) if parallel else None
    if parallels is None and world_size > 1:
        parallels = ["fsdp"]

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
        world_size=world_size,
        parallel=parallels[0] if parallels else None,
        cpu_offload=cpu_offload,
    )
    for name in optimizers[1:]:
        dataclasses.replace(spec, optimizer=name)  # validated before anything is measured
    for name in (parallels or [])[1:]:
        dataclasses.replace(spec, parallel=name)
    from velora_cli.methods.placement import parse_placement

    for placement in placement_list:
        parse_placement(placement)
    if output:
        from velora_cli.files import check_output_file

        check_output_file(output, "--output")  # before anything is measured
    # the backend first: --backend cuda without a GPU fails before any hub lookup
    backend_obj = profiler.make_backend(
        backend, spec, warmup=warmup, steps=steps, gpu=gpu, alloc_conf=alloc_conf
    )
    resolved = models.resolve_model(spec.model, trust_remote_code=trust_remote_code)
    notices = [resolved.notice] if resolved.notice else []
    if model is None:
        notices.append(f"no MODEL given: profiling the built-in default {spec.model}")
    if weights:
        from velora_cli.models.weights import check_weights

        source = check_weights(resolved)
        notices.append(
            f"--weights: {source}, loaded for every row that runs a step"
            if backend_obj.name != "estimate"
            else f"--weights: {source} is not loaded: the estimate holds shapes only, from the "
            "config (memory does not depend on weight values); cpu or cuda rows load it"
        )
    quiet = []  # recorded in the document, not echoed: how the defaults were chosen
    if groups is None and sizes is None and placement_list:
        from velora_cli.profiling.num_groups import default_num_groups

        groups, line = default_num_groups(spec, placement_list)
        quiet.append(line)
    strategies = profiler.plan_strategies(
        placement_list,
        num_groups=groups,
        sub_token_sizes=sizes,
        gc_every=gc_list,
        velora_gc=velora_gc,
        sac=sac_list,
        offload=offload_list,
    )
    if backend == "auto" and backend_obj.name == "estimate":
        notices.append(
            "auto backend without a GPU: memory estimated on meta tensors and step time "
            f"predicted for {get_gpu(gpu).name} (--gpu); --backend cpu times real CPU steps"
        )
    if memory_snapshot:
        from velora_cli.measure.snapshot import snapshot_notice

        notices.append(snapshot_notice(backend_obj, memory_snapshot))
    save_path = profiler.default_save_path(spec, backend_obj.name) if save else None
    for notice in notices:
        err(f"note: {notice}")

    from velora_cli.report.progress import RowProgress

    try:
        with RowProgress(len(strategies) * len(optimizers) * len(parallels or [None])) as progress:
            document = profiler.run_profile(
                spec,
                strategies,
                backend_obj,
                breakdown=breakdown,
                save_path=save_path,
                before_row=progress.start,
                on_row=progress.done,
                notices=notices + quiet,
                optimizers=optimizers,
                parallels=parallels,
                budget=budget_bytes,
            )
    except BaseException:
        if save_path is not None and save_path.is_file() and save_path.stat().st_size == 0:
            save_path.unlink()  # reserved, never written: nothing was measured
        raise
    render_profile(document, output_format, output, breakdown=breakdown)
    if save_path is not None:
        err(f"saved: {save_path}")
    if plot is not None:
        from velora_cli import plots

        err(f"wrote {plots.render(document, plot)}")
    code = document["verdict"]["exit_code"]
    if budget_bytes is not None and code:  # for a CI gate: 1 nothing fits, 2 nothing estimated
        raise typer.Exit(code=code)


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
