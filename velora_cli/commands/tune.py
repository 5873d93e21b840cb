"""``velora tune``: the best configuration under a memory budget, verified by a real run."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from velora_cli.commands.errors import UserError, fail, guarded
from velora_cli.commands.options import (
    AllocConf,
    Amp,
    BatchSize,
    Budget,
    Dtype,
    Eta,
    Gpu,
    Init,
    LoraRank,
    LoraTargets,
    Margin,
    MaxLossIncrease,
    MaxMeasured,
    MicroBatches,
    ModelArg,
    Objective,
    PlotOut,
    ProbeData,
    ProbeSteps,
    Rank,
    Resume,
    ResumeFrom,
    SeqLen,
    TrainerOption,
    TrustRemoteCode,
    TuneBackend,
    TuneGcEvery,
    TuneModes,
    TuneNumGroups,
    TuneOptimizers,
    TunePlacements,
    UpdateGap,
    Weights,
    int_list,
    word_list,
)
from velora_cli.commands.output import err, wide_console
from velora_cli.gpus import get_gpu

# Below this a budget holds no model's training step (the smallest built-in needs more): a
# budget of "1e-9GB" is a slip of the unit, not a plan.
MIN_BUDGET_BYTES = 10**6


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
    gpu: Gpu = None,
    plot: PlotOut = None,
    alloc_conf: AllocConf = None,
    world_size: Annotated[
        str,
        typer.Option(
            "--world-size",
            help="GPU counts to try, comma-separated (e.g. 1,2,4,8: how many GPUs do I need?); "
            "the budget is per GPU, --batch-size per rank.",
        ),
    ] = "1",
    parallel: Annotated[
        str,
        typer.Option(
            "--parallel",
            help="Parallel strategies tried with more than one GPU: ddp, fsdp, fsdp-no-reshard.",
        ),
    ] = "ddp,fsdp,fsdp-no-reshard",
    trainer: TrainerOption = "hf",
) -> None:
    """Find the fastest configuration that fits a memory budget, verified by a real run."""
    from velora_cli.search.tuner import OBJECTIVES

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
    if plot is not None:  # before the run, not after it
        from velora_cli import plots

        plots.check_output(plot)
        plots.require_matplotlib()
    from velora_cli.measure.train_step import MODES, OPTIMIZERS

    get_gpu(gpu)  # an unknown --gpu fails before anything is built
    from velora_cli.allocator.config import alloc_conf_from_env, parse_alloc_conf

    alloc_conf = alloc_conf if alloc_conf is not None else alloc_conf_from_env()
    parse_alloc_conf(alloc_conf)  # a bad string fails before anything is built
    mode_list = word_list(modes, "--mode", MODES)
    optimizer_list = word_list(optimizer, "--optimizer", OPTIMIZERS)
    placement_list = [p for p in word_list(placements, "--placements") if p != "none"]
    groups = int_list(num_groups, "--num-groups")
    gc_list = int_list(gc_every, "--gc-every")
    if any(n < 1 for n in [*groups, *gc_list]):
        raise UserError("--num-groups and --gc-every take integers >= 1")
    micros = int_list(micro_batches, "--micro-batches") if micro_batches else None
    from velora_cli.parallel import PARALLEL

    world_sizes = tuple(sorted(set(int_list(world_size, "--world-size"))))
    if world_sizes[0] < 1:
        raise UserError("--world-size takes GPU counts >= 1, e.g. 1,2,4,8")
    parallel_list = tuple(dict.fromkeys(word_list(parallel, "--parallel", PARALLEL)))

    from velora_cli import models
    from velora_cli.budget import describe_budget, format_bytes, parse_budget
    from velora_cli.methods.placement import parse_placement
    from velora_cli.report.progress import TuneProgress
    from velora_cli.search import autotune

    for placement in placement_list:
        parse_placement(placement)
    notices = []
    budget_bytes = parse_budget(budget) if budget is not None else None
    if budget_bytes is not None and budget_bytes < MIN_BUDGET_BYTES:
        raise UserError(
            f"--budget {budget} = {format_bytes(budget_bytes)}: under 1 MB, less than any model's "
            "training step; give it in MB or GB, e.g. --budget 10GB"
        )
    from velora_cli.measure.cuda import cuda_available

    has_cuda = cuda_available()
    if backend == "cuda" and not has_cuda:  # before the model is resolved (hub lookups)
        raise UserError(
            "--backend cuda: no CUDA device is visible (torch.cuda.is_available() is False); "
            "use --backend estimate or cpu"
        )
    if backend == "cuda" or (backend == "auto" and has_cuda):
        import torch

        if torch.cuda.device_count() < world_sizes[-1]:
            raise UserError(
                f"--world-size {world_sizes[-1]} on --backend cuda needs one GPU per rank and "
                f"{torch.cuda.device_count()} are visible: use --backend estimate, or smaller "
                "world sizes"
            )
    if backend == "auto":
        backend = "cuda" if has_cuda else "estimate"
        if not has_cuda:
            notices.append(
                "auto backend without a GPU: peaks estimated on meta tensors (--backend "
                "estimate); --backend cpu measures real steps on this CPU"
            )
    settings = autotune.TuneSettings(
        model=model or models.DEFAULT_MODEL,
        budget_bytes=budget_bytes or 0,  # resolved below when --budget is not given
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
        gpu=gpu,
        alloc_conf=alloc_conf,
        world_sizes=world_sizes,
        parallels=parallel_list,
        trainer=trainer,
    )
    settings.base_spec()  # validates batch, precision, modes × optimizers, ranks (one line)
    from pathlib import Path

    from velora_cli.files import profiles_dir
    from velora_cli.search import resume as resuming
    from velora_cli.search.tuner import Journal

    journal_path = None
    same_budget = () if budget_bytes is not None else ("budget_bytes",)
    if resume_from:
        journal_path = Path(resume_from)
    elif resume:
        journal_path, passed = resuming.find_journal(
            profiles_dir(), settings.context(), ignore=same_budget
        )
        for line in passed:
            err(f"note: {line}")
    budget_source = f"--budget {budget}" if budget is not None else None
    if budget_bytes is None and journal_path is not None and journal_path.is_file():
        budget_bytes = (Journal.read_context(journal_path) or {}).get("budget_bytes")
        budget_source = f"the budget of {journal_path}"
    if budget_bytes is None and has_cuda:
        import torch

        budget_bytes = torch.cuda.mem_get_info()[0]
        budget_source = "free GPU memory"
    if budget_bytes is None:
        raise UserError(
            "no --budget given and no GPU to read the free memory from: pass --budget, "
            "e.g. --budget 10GB"
        )
    settings = dataclasses.replace(settings, budget_bytes=budget_bytes, budget_source=budget_source)
    echo = f"{describe_budget(budget_bytes, budget)}" if budget else describe_budget(budget_bytes)
    err(
        f"budget: {echo} ({budget_source}); configurations must peak at or below "
        f"{format_bytes(int(budget_bytes * (1 - margin)))} ({margin:.0%} margin)"
    )
    if model is None:
        notices.append(f"no MODEL given: tuning the built-in default {settings.model}")
    if journal_path is not None:
        journal = resuming.open_journal(journal_path, settings)
        save_path = journal_path.with_suffix(".json")
        err(f"resuming {journal_path} ({len(journal)} finished results)")
        for number in journal.skipped:
            err(f"note: {journal_path}:{number} is not a journal record: skipped, the rest kept")
    else:
        save_path, journal_path = autotune.new_paths(settings.model)
        journal = Journal(journal_path, context=settings.context())
    if not journal.claim():
        raise UserError(
            f"{journal_path} is being written by another velora tune; run without --resume"
        )
    from velora_cli.search.world_sizes import run_world_sizes

    runner = autotune.run if world_sizes == (1,) else run_world_sizes
    try:
        # --backend estimate: a "measurement" looks the estimate up, nothing runs to report
        silent = ("measure", "verify") if backend == "estimate" else ()
        with TuneProgress(err, silent=silent) as progress:
            document = runner(
                settings,
                save_path=save_path,
                journal=journal,
                progress=progress,
                echo=err,
                notices=notices,
            )
    except KeyboardInterrupt:
        err(f"journal: {journal_path}; continue with the same command and --resume")
        raise
    except Exception:
        resuming.discard_if_empty(journal, new=not (resume or resume_from))
        raise
    finally:
        journal.release()
    render_tune(document, output_format)
    err(f"saved: {save_path}")
    if plot is not None:  # also when nothing fits: the picture says why
        from velora_cli import plots

        err(f"wrote {plots.render(document, plot)}")
    if document["recommendation"] is None:
        fail(document["reason"])


def render_tune(document: dict, output_format: str) -> None:
    from velora_cli import report

    if output_format == "json":
        import json

        typer.echo(json.dumps(document, indent=2, default=str))
        return
    console = wide_console()
    console.print(report.tune_table(document))
    if document.get("by_world_size"):
        from velora_cli.report.ranks import gpu_count_table

        console.print(gpu_count_table(document))
    lines = report.summary_lines(document)
    if document["recommendation"] is None:
        lines += report.nothing_fits_lines(document)
    for line in lines:
        console.print(line, highlight=False, markup=False)
