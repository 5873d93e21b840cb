"""``velora tune``: the best configuration under a memory budget, verified by a real run."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from velora_cli.commands import checks
from velora_cli.commands.errors import UserError, fail, guarded
from velora_cli.commands.options import (
    AllocConf,
    Amp,
    Attn,
    BatchSize,
    Budget,
    ComputeDtype,
    DoubleQuant,
    Dtype,
    Eta,
    GcReentrant,
    Gpu,
    Init,
    KbitPrepare,
    LengthsOption,
    LoraRank,
    LoraTargets,
    Margin,
    MaxLossIncrease,
    MaxMeasured,
    MicroBatches,
    ModelArg,
    Objective,
    Offload,
    Packing,
    Padding,
    PlotOut,
    ProbeData,
    ProbeSteps,
    QuantStorage,
    Rank,
    RepeatKv,
    Resume,
    ResumeFrom,
    Sac,
    SeqLen,
    Task,
    TrainerOption,
    TransformersVersion,
    TrustRemoteCode,
    TuneBackend,
    TuneGcEvery,
    TuneModes,
    TuneNumGroups,
    TuneOptimizers,
    TunePlacements,
    UpdateGap,
    Weights,
    choice_list,
    int_list,
    recipe_of,
    word_list,
)
from velora_cli.commands.output import err, wide_console

if TYPE_CHECKING:
    from velora_cli.search.settings import TuneSettings
    from velora_cli.search.tuner import Journal


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
    # = autotune.DEFAULT_OPTIMIZERS
    optimizer: TuneOptimizers = "adamw_torch_fused,adamw,galore,adarankgrad",
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
    packing: Packing = False,
    lengths: LengthsOption = None,
    sac: Sac = "none",
    offload: Offload = "none",
) -> None:
    """Find the fastest configuration that fits a memory budget, verified by a real run."""
    options = TuneOptions(**locals())  # the options as typed; parsed and checked below
    settings, notices = tune_settings(options)
    settings, journal, save_path = open_journal(options, settings)
    new_journal = not (options.resume or options.resume_from)
    document = run_tune(settings, journal, save_path, notices, new_journal=new_journal)
    render_tune(document, options.output_format)
    err(f"saved: {save_path}")
    if options.plot is not None:  # also when nothing fits: the picture says why
        from velora_cli import plots

        err(f"wrote {plots.render(document, options.plot)}")
    if document["recommendation"] is None:
        fail(document["reason"])


@dataclasses.dataclass(frozen=True)
class TuneOptions:
    """``velora tune``'s options as typed (strings, before parsing); names as in `tune`."""

    model: str | None
    budget: str | None
    margin: float
    objective: str
    backend: str
    batch_size: int
    seq_len: int
    dtype: str
    amp: str | None
    modes: str
    placements: str
    num_groups: str
    gc_every: str
    micro_batches: str | None
    probe_steps: int
    max_loss_increase: float
    data: str | None
    max_measured: int | None
    output_format: str
    resume: bool
    resume_from: str | None
    lora_rank: int
    lora_targets: str
    optimizer: str
    rank: int | None
    update_gap: int
    eta: float
    init: str
    weights: bool
    trust_remote_code: bool
    gpu: str | None
    plot: str | None
    alloc_conf: str | None
    world_size: str
    parallel: str
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
    packing: bool
    lengths: str | None
    sac: str
    offload: str


def tune_settings(o: TuneOptions) -> tuple[TuneSettings, list[str]]:
    """Parse and check every option, before any model is built: the tune's settings (its
    budget still 0 when ``--budget`` was not given: `open_journal` resolves it) and notices."""
    from velora_cli.gpus import get_gpu
    from velora_cli.measure.recipe import check_cuda_precision, check_precision
    from velora_cli.measure.train_step import (
        MODES,
        OFFLOAD_KINDS,
        OPTIMIZERS,
        SAC_POLICIES,
        check_device,
    )
    from velora_cli.parallel import PARALLEL
    from velora_cli.search.tuner import OBJECTIVES

    checks.choice("--format", o.output_format, ("table", "json"))
    backend = checks.backend(o.backend)
    if o.objective not in OBJECTIVES:
        raise UserError(f"--objective {o.objective!r}: choose {', '.join(OBJECTIVES)}")
    if not 0 <= o.margin < 1:
        raise UserError(f"--margin {o.margin}: give a fraction in [0, 1), e.g. 0.05 for 5%")
    if not o.max_loss_increase >= 0:
        raise UserError(f"--max-loss-increase {o.max_loss_increase}: give a fraction >= 0")
    if o.probe_steps < 0:
        raise UserError("--probe-steps must be >= 0 (0 turns the probes off)")
    if o.max_measured is not None and o.max_measured < 1:
        raise UserError("--max-measured must be >= 1")
    checks.plot_target(o.plot)
    checks.gpu(o.gpu)
    alloc_conf = checks.alloc_conf(o.alloc_conf, inherit=True)
    modes = word_list(o.modes, "--mode", MODES)
    optimizers = word_list(o.optimizer, "--optimizer", OPTIMIZERS)
    placements = [p for p in word_list(o.placements, "--placements") if p != "none"]
    groups = checks.intervals(o.num_groups, "--num-groups", "integers")
    gc_list = checks.intervals(o.gc_every, "--gc-every", "integers")
    micros = int_list(o.micro_batches, "--micro-batches") if o.micro_batches else None
    world_sizes = tuple(sorted(set(int_list(o.world_size, "--world-size"))))
    if world_sizes[0] < 1:
        raise UserError("--world-size takes GPU counts >= 1, e.g. 1,2,4,8")
    parallels = tuple(dict.fromkeys(word_list(o.parallel, "--parallel", PARALLEL)))
    checks.placements(placements)
    budget_bytes = checks.budget(o.budget)
    has_cuda = checks.cuda_backend(backend, world_sizes[-1])
    notices = []
    if backend == "auto":
        backend = "cuda" if has_cuda else "estimate"
        if not has_cuda:
            notices.append(
                "auto backend without a GPU: peaks estimated on meta tensors (--backend "
                "estimate); --backend cpu measures real steps on this CPU"
            )
    from velora_cli import models
    from velora_cli.measure.lengths import tune_lengths
    from velora_cli.search.settings import TuneSettings

    # --lengths: every candidate planned at the distribution's longest length (measure/lengths.py)
    seq_len, padding, length_note = tune_lengths(o.lengths, o.seq_len, o.padding, o.packing)
    notices += [length_note] if length_note else []
    settings = TuneSettings(
        model=o.model or models.DEFAULT_MODEL,
        budget_bytes=budget_bytes or 0,  # resolved by open_journal when --budget is not given
        backend=backend,
        batch_size=o.batch_size,
        seq_len=seq_len,
        dtype=o.dtype,
        amp=o.amp,
        optimizers=tuple(dict.fromkeys(optimizers)),
        rank=o.rank,
        update_gap=o.update_gap,
        eta=o.eta,
        lora_rank=o.lora_rank,
        lora_targets=o.lora_targets,
        init=o.init,
        weights=o.weights,
        trust_remote_code=o.trust_remote_code,
        modes=tuple(modes),
        placements=tuple(placements),
        num_groups=tuple(groups),
        gc_every=tuple(n for n in gc_list if n > 1),
        micro_batches=tuple(micros) if micros else None,
        margin=o.margin,
        objective=o.objective,
        max_loss_increase=o.max_loss_increase,
        max_measured=o.max_measured,
        probe_steps=o.probe_steps,
        data=o.data,
        gpu=o.gpu,
        alloc_conf=alloc_conf,
        world_sizes=world_sizes,
        parallels=parallels,
        trainer=o.trainer,
        attn=o.attn,
        task=o.task,
        padding=padding,
        packing=o.packing,
        repeat_kv=o.repeat_kv,
        transformers_version=o.transformers_version,
        sac=tuple(choice_list(o.sac, "--sac", SAC_POLICIES)),
        offload=tuple(choice_list(o.offload, "--offload", OFFLOAD_KINDS)),
        **recipe_of(o, modes),
    )
    base = settings.base_spec()  # validates batch, precision, modes × optimizers, ranks (one line)
    if o.gpu:  # bf16 on a T4 or V100: one line
        check_precision(get_gpu(o.gpu), base, modes)
    elif backend == "cuda":
        check_cuda_precision(base)
    for name in settings.optimizers:  # a paged optimizer on the cpu, no bitsandbytes: one line
        check_device(dataclasses.replace(base, mode="full", optimizer=name), backend)
    if o.model is None:
        notices.append(f"no MODEL given: tuning the built-in default {settings.model}")
    return settings, notices


def open_journal(o: TuneOptions, settings: TuneSettings) -> tuple[TuneSettings, Journal, Path]:
    """The settings with their budget resolved when ``--budget`` is absent (the resumed
    journal's, else the GPU's free memory), the journal the tune writes (a new one, or the one
    ``--resume`` continues) claimed for this process, and where the document goes. Says the
    budget and the journal on stderr."""
    from velora_cli.budget import describe_budget, format_bytes
    from velora_cli.files import profiles_dir
    from velora_cli.measure.cuda import cuda_available
    from velora_cli.search import autotune
    from velora_cli.search import resume as resuming
    from velora_cli.search.tuner import Journal

    budget_bytes = settings.budget_bytes or None
    journal_path = None
    if o.resume_from:
        journal_path = Path(o.resume_from)
    elif o.resume:
        same_budget = () if budget_bytes is not None else ("budget_bytes",)
        journal_path, passed = resuming.find_journal(
            profiles_dir(), settings.context(), ignore=same_budget
        )
        for line in passed:
            err(f"note: {line}")
    budget_source = f"--budget {o.budget}" if budget_bytes is not None else None
    if budget_bytes is None and journal_path is not None and journal_path.is_file():
        budget_bytes = (Journal.read_context(journal_path) or {}).get("budget_bytes")
        budget_source = f"the budget of {journal_path}"
    if budget_bytes is None and cuda_available():
        import torch

        budget_bytes = torch.cuda.mem_get_info()[0]
        budget_source = "free GPU memory"
    if budget_bytes is None:
        raise UserError(
            "no --budget given and no GPU to read the free memory from: pass --budget, "
            "e.g. --budget 10GB"
        )
    settings = dataclasses.replace(settings, budget_bytes=budget_bytes, budget_source=budget_source)
    said = describe_budget(budget_bytes, o.budget) if o.budget else describe_budget(budget_bytes)
    err(
        f"budget: {said} ({budget_source}); configurations must peak at or below "
        f"{format_bytes(int(budget_bytes * (1 - o.margin)))} ({o.margin:.0%} margin)"
    )
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
    return settings, journal, save_path


def run_tune(settings, journal, save_path: Path, notices: list[str], *, new_journal: bool) -> dict:
    """The tune (one GPU count, or each of ``--world-size``), with progress on stderr; a new
    journal that a failure left without a result is removed (nothing to resume)."""
    from velora_cli.report.progress import TuneProgress
    from velora_cli.search import autotune
    from velora_cli.search import resume as resuming
    from velora_cli.search.world_sizes import run_world_sizes

    runner = autotune.run if settings.world_sizes == (1,) else run_world_sizes
    try:
        # --backend estimate: a "measurement" looks the estimate up, nothing runs to report
        silent = ("measure", "verify") if settings.backend == "estimate" else ()
        with TuneProgress(err, silent=silent) as progress:
            return runner(
                settings,
                save_path=save_path,
                journal=journal,
                progress=progress,
                echo=err,
                notices=notices,
            )
    except KeyboardInterrupt:
        err(f"journal: {journal.path}; continue with the same command and --resume")
        raise
    except Exception:
        resuming.discard_if_empty(journal, new=new_journal)
        raise
    finally:
        journal.release()


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
