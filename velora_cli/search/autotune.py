"""``velora tune``: the glue between the search (tuner.py) and the backends, probes and journal.

The tuner decides; this module turns the user's settings into its three callables (`Estimator`
and `Measurer` in estimator.py, `Prober` in prober.py) and collects everything into the tune
document (``profiles/tune-<model>-<stamp>.json``), with the journal beside it (same name,
``.jsonl``) so that an interrupted tune resumes.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from velora_cli.budget import format_bytes
from velora_cli.files import profiles_dir, reserve, slug
from velora_cli.search.estimator import Estimator, Measurer
from velora_cli.search.prober import Prober, probe_device
from velora_cli.search.resume import open_journal as resume_journal
from velora_cli.search.settings import (
    CONTEXT_KEYS,
    DEFAULT_GC_EVERY,
    DEFAULT_MAX_MEASURED_CPU,
    DEFAULT_NUM_GROUPS,
    DEFAULT_OPTIMIZERS,
    DEFAULT_PLACEMENTS,
    DEFAULT_PROBE_STEPS,
    TuneError,
    TuneSettings,
    candidate_spec,
)
from velora_cli.search.tuner import Candidate, Journal, search_space, tune

__all__ = [
    "CONTEXT_KEYS",
    "DEFAULT_GC_EVERY",
    "DEFAULT_NUM_GROUPS",
    "DEFAULT_OPTIMIZERS",
    "DEFAULT_PLACEMENTS",
    "DEFAULT_PROBE_STEPS",
    "TuneError",
    "TuneSettings",
    "build_space",
    "candidate_spec",
    "latest",
    "new_paths",
    "profiles_dir",
    "resume_journal",
    "run",
]

LOWRANK_NOTICE = (
    "galore/adarankgrad (full mode only): their probe is compared with the AdamW probe of the "
    "same mode, each at its own learning rate; memory is measured at a subspace refresh (their "
    "costliest step), and adarankgrad's estimate is at its rank cap (an upper bound)"
)


def build_space(settings: TuneSettings) -> tuple[list[Candidate], list[str]]:
    """The candidates, with those whose sub-token choice does not fit every layer dropped.

    Returns:
        (candidates, notices): one notice per dropped placement × num_groups, and per mode left
        out (its packages are missing, or none of the optimizers applies to it).

    Raises:
        SpecError: the model cannot be built as asked, a placement matches nothing, a
            num_groups divides none of a placement's layers (profiler.validate_strategies), or
            no mode is left to try.
        ValueError: a micro-batch size that does not divide the batch size.
    """
    from velora_cli.measure.train_step import SpecError, Strategy
    from velora_cli.profiling.profiler import validate_strategies

    notices, dropped = [], set()
    missing = _missing_packages(settings)
    modes = [m for m in settings.modes if m not in missing]
    notices += [f"{m}: not tried, {missing[m]}" for m in settings.modes if m in missing]
    if not modes:
        raise SpecError("; ".join(f"--mode {m} {why}" for m, why in missing.items()))
    by_mode = dataclasses.replace(settings, modes=tuple(modes)).optimizers_by_mode()
    for mode in [m for m in modes if not by_mode[m]]:
        notices.append(
            f"{mode}: not tried, --optimizer {','.join(settings.optimizers)} needs --mode full"
        )
        modes.remove(mode)
    space = search_space(
        batch_size=settings.batch_size,
        modes=modes,
        placements=[None, *settings.placements],
        num_groups=settings.num_groups,
        gc_options=[False, True, *settings.gc_every],
        micro_batches=settings.micro_batches,
        optimizers=settings.optimizers,
        layouts=settings.layouts(),
        sac_options=settings.sac,
        offload_options=settings.offload,
    )
    from velora_cli.search.candidates import drop_unsupported_layouts

    space, why = drop_unsupported_layouts(space, settings)
    notices += why
    base = settings.base_spec()
    for mode in modes:
        strategies = [
            Strategy(placement=p, num_groups=g)
            for p in settings.placements
            for g in settings.num_groups
        ]
        spec = dataclasses.replace(base, mode=mode, optimizer=by_mode[mode][0])
        invalid = validate_strategies(spec, strategies)
        for strategy, why in invalid.items():
            dropped.add((mode, strategy.placement, strategy.num_groups))
            notices.append(f"{mode} {strategy.label}: not tried, {why}")
    kept = [c for c in space if (c.mode, c.placement, c.num_groups) not in dropped]
    return kept, notices


def _missing_packages(settings: TuneSettings) -> dict[str, str]:
    """Mode -> why it cannot run here: LoRA needs peft; real 4-bit steps need bitsandbytes (the
    estimate models them without it)."""
    from importlib.util import find_spec

    why = {}
    if find_spec("peft") is None:
        why.update(dict.fromkeys(("lora", "qlora"), "needs peft: pip install 'velora-cli[lora]'"))
    elif settings.backend != "estimate" and find_spec("bitsandbytes") is None:
        from velora_cli.methods.quant import INSTALL_HINT

        why["qlora"] = f"{INSTALL_HINT} (or --backend estimate)"
    return {m: w for m, w in why.items() if m in settings.modes}


# -- the run ------------------------------------------------------------------------------------


def new_paths(model: str, directory: Path | None = None) -> tuple[Path, Path]:
    """(tune document, journal) paths for a new tune, ``tune-<model>-<stamp>[-n].json/.jsonl``:
    the journal is created exclusively (`files.reserve`), so no other run shares it.

    Raises:
        OutputError: the directory is not writable (checked before anything is estimated).
    """
    journal = reserve(directory or profiles_dir(), f"tune-{slug(model)}", ".jsonl", also=(".json",))
    return journal.with_suffix(".json"), journal


def latest(pattern: str, directory: Path | None = None) -> Path | None:
    """The most recently modified file matching ``pattern`` under the profiles directory."""
    found = sorted((directory or profiles_dir()).glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def run(
    settings: TuneSettings,
    *,
    save_path: Path | None,
    journal: Journal | None,
    progress: Callable[[str, int, int], None] | None = None,
    echo: Callable[[str], None] | None = None,
    backend=None,
    notices: list[str] | None = None,
    ddp_rows=None,
) -> dict[str, Any]:
    """Run a tune and return its document (also written to ``save_path`` when given).

    Args:
        settings: the resolved settings.
        save_path: where the document is written (atomically); the journal lives beside it.
        journal: a new `Journal` or one from `resume_journal`.
        progress: the tuner's progress callback (e.g. `TuneProgress`).
        echo: one-line notes to the user (stderr).
        backend: a backend object replacing ``settings.backend``'s (tests count its calls).
        notices: lines for the document (e.g. how the budget was read).
        ddp_rows: DDP rank rows shared with the other rounds of a GPU-count tune
            (`parallel.estimate.DdpRows`); None: this tune's own.

    Returns:
        The tune document (see ``velora tune --format json``).
    """
    from velora_cli import __version__
    from velora_cli.measure.train_step import LOWRANK_OPTIMIZERS
    from velora_cli.methods.precision import describe_modes
    from velora_cli.models import resolve_model
    from velora_cli.profiling.profiler import environment, write_atomic

    echo = echo or (lambda line: None)
    notices = list(notices or [])
    resolved = resolve_model(
        settings.model, trust_remote_code=settings.trust_remote_code, task=settings.task
    )
    if resolved.notice:
        notices.append(resolved.notice)
    from velora_cli.measure.train_step import for_task

    step, seq_note = for_task(settings.base_spec(), resolved)  # an image's tokens: its patches
    if seq_note:
        settings = dataclasses.replace(settings, seq_len=step.seq_len)
        notices.append(seq_note)
    if settings.weights:  # checked before anything runs: a missing checkpoint is one error
        from velora_cli.models.weights import check_weights

        where = "the accuracy probes" if settings.backend == "estimate" else "every step run"
        notices.append(
            f"--weights: {check_weights(resolved)}, loaded for {where} (estimates take shapes "
            "from the config)"
        )
    if settings.transformers_version is not None:
        from velora_cli.measure.loss_path import unread

        model_type = getattr(resolved.config, "model_type", None)
        note = unread(model_type, settings.transformers_version, resolved.task)
        notices += [note] if note else []
    candidates, dropped = build_space(settings)
    notices += dropped
    if any(c.optimizer in LOWRANK_OPTIMIZERS for c in candidates):
        notices.append(LOWRANK_NOTICE)
    estimator = Estimator(settings, ddp_rows)
    measurer = Measurer(settings, estimator, backend)
    device, why = probe_device(settings, estimator, candidates[0]) if candidates else (None, None)
    prober = Prober(settings, journal, device) if device else None
    if why:
        notices.append(why)
    if settings.backend == "estimate":
        from velora_cli.gpus import get_gpu

        probes = (
            f"; the accuracy probes do train, {settings.probe_steps} steps each on {prober.device}"
            if prober is not None
            else ""
        )
        notices.append(
            "--backend estimate: every peak is estimated on meta tensors and no step is measured "
            f"(speed is ranked by the tokens/s predicted for {get_gpu(settings.gpu).name} by a "
            f"per-op roofline, not measured){probes}; check the recommendation with --backend "
            "cuda before relying on it"
        )
    for line in notices:
        echo(f"note: {line}")
    echo(f"estimating {len(candidates)} candidates on meta tensors")
    max_measured = settings.max_measured
    if max_measured is None and settings.backend == "cpu":
        max_measured = DEFAULT_MAX_MEASURED_CPU
    result = tune(
        candidates,
        estimate=estimator,
        measure=measurer,
        probe=prober,
        budget_bytes=settings.budget_bytes,
        margin=settings.margin,
        objective=settings.objective,
        max_loss_increase=settings.max_loss_increase,
        max_measured=max_measured,
        journal=journal,
        progress=progress,
    )
    recommendation = result.recommendation
    warnings = []
    if recommendation is not None:
        recommendation.update(_layers_of(settings, recommendation))
        if settings.backend == "estimate":
            recommendation["reason"] = _estimate_reason(recommendation, result, prober)
        noise = _timing_warnings(recommendation)
        # the export then states no throughput: neither run's can be trusted (issue 28)
        recommendation["timing_noise"] = bool(noise)
        warnings += noise
    tried = [m for m in settings.modes if any(c.mode == m for c in candidates)]
    document: dict[str, Any] = {
        "kind": "velora-tune",
        "model": settings.model,
        "task": resolved.task,  # the head trained (export-config's PEFT task_type)
        "mode": ",".join(settings.modes),
        "batch_size": settings.batch_size,
        "seq_len": settings.seq_len,
        "dtype": settings.dtype,
        "amp": settings.amp,
        "precision": describe_modes(
            tried or settings.modes,
            settings.dtype,
            settings.amp,
            **settings.base_spec().qlora_precision(),
        ),
        "optimizer": ",".join(settings.optimizers),
        "backend": settings.backend,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "velora_version": __version__,
        "settings": {
            **{k: v for k, v in dataclasses.asdict(settings).items() if k != "budget_bytes"},
            "max_measured": max_measured,
        },
        "environment": environment(),
        "budget_bytes": settings.budget_bytes,
        "budget_source": settings.budget_source,
        "limit_bytes": result.limit_bytes,
        "margin": settings.margin,
        "objective": settings.objective,
        "max_loss_increase": settings.max_loss_increase,
        "probe": _probe_section(prober, settings, why),
        "notices": notices,
        "warnings": warnings,
        "journal": str(journal.path) if journal is not None else None,
        "calls": {
            "estimate": estimator.calls,
            "measure": measurer.calls,
            "probe": prober.calls if prober else 0,
        },
        "candidates": [_with_probe(row, prober) for row in result.candidates],
        "recommendation": recommendation,
        "smallest": result.smallest,
        "reason": recommendation["reason"] if recommendation else result.reason,
    }
    if save_path is not None:
        write_atomic(save_path, document)
        document["path"] = str(save_path)
    return document


def _layers_of(settings: TuneSettings, rec: dict[str, Any]) -> dict[str, Any]:
    """The recommendation's wrapped layers and their sizes, built on meta (for export-config);
    for galore/adarankgrad also the rank cap and the linear modules whose weights they project
    (names for transformers' ``optim_target_modules``)."""
    from torch import nn

    from velora_cli.measure.train_step import prepare

    c = Candidate(
        rec["mode"],
        rec["placement"],
        rec["num_groups"],
        micro_batch_size=rec["micro_batch_size"],
        grad_accum_steps=rec["grad_accum_steps"],
        optimizer=rec["optimizer"],
    )  # gc left off: the wrapped layers are the same, and building is quicker without it
    prepared = prepare(candidate_spec(settings.base_spec(), c), "meta")
    model = prepared.model
    layers = {}
    for name in prepared.wrapped:
        module = model.get_submodule(name)
        layers[name] = {"in_features": module.in_features, "sub_token_size": module.sub_token_size}
    lora = sum(1 for m in model.modules() if hasattr(m, "lora_A") and hasattr(m.lora_A, "items"))
    found = {"velora_layers": layers, "lora_layers": lora if c.mode != "full" else None}
    projected = [g for g in prepared.optimizer.param_groups if g.get("lowrank")]
    if projected:
        weights = {id(p) for p in projected[0]["params"]}
        found["optimizer_rank_cap"] = projected[0]["rank"]
        found["optimizer_targets"] = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in model.named_modules()
                if id(getattr(module, "weight", None)) in weights and isinstance(module, nn.Linear)
            }
        )
    return found


def _timing_warnings(rec: dict[str, Any]) -> list[str]:
    """A warning when the verification run's speed disagrees with the search's (noisy timings)."""
    search, verify = rec.get("search_tokens_per_second"), rec.get("tokens_per_second")
    if not search or not verify or 0.75 <= verify / search <= 1.33:
        return []
    return [
        f"timing noise: the verification run of {rec['key']} ran at {verify:,.0f} tokens/s, the "
        f"search measured {search:,.0f}; step times on this machine vary (other load?), so the "
        "speed ranking may not hold: rerun on an idle machine, or use --objective memory"
    ]


def _estimate_reason(rec: dict[str, Any], result, prober: Prober | None) -> str:
    n = sum(row["status"] in ("feasible", "chosen") for row in result.candidates)
    speed = (
        "the best estimated speed rank (least checkpointing recompute, then no 4-bit "
        "dequantization, then the largest micro-batch, then the fewest VeLoRA layers; no step "
        "was timed)"
    )
    if rec.get("tokens_per_second") is not None:
        speed = (
            f"the highest predicted throughput ({rec['tokens_per_second']:,.0f} tokens/s, "
            f"{rec.get('step_seconds_source', 'predicted')}; no step was timed)"
        )
    won = {
        "speed": speed,
        "memory": f"the smallest estimated peak ({format_bytes(rec['peak_bytes'])})",
        "accuracy": "the smallest loss change vs the uncompressed baseline",
    }[result.objective]
    figure = (
        "predicted device memory (the caching allocator's reserved memory + CUDA context)"
        if str(rec.get("peak_source", "")).startswith("predicted_device_bytes")
        else "the estimated allocated peak"
    )
    return (
        f"{rec['key']} has {won} of the {n} configurations estimated within "
        f"{format_bytes(result.limit_bytes)} (budget {format_bytes(result.budget_bytes)} − "
        f"{rec['margin']:.0%})"
        + (" and the loss tolerance" if rec.get("loss") is not None else "")
        + f"; the budget was compared with {figure}"
        + "; estimates only (--backend estimate): no step was measured"
        + ("" if prober is None else " (the accuracy probes trained on " + prober.device + ")")
    )


def _probe_section(prober: Prober | None, settings: TuneSettings, why: str | None) -> dict:
    section: dict[str, Any] = {"steps": settings.probe_steps, "data": settings.data, "skipped": why}
    if prober is not None:
        baselines = prober.all_baselines()
        base = next(iter(baselines.values()), None)
        section.update(
            device=prober.device,
            baselines={mode: _summary(b) for mode, b in baselines.items()},
            data_description=base and base["data"],
            tokenization=base and base["tokenization"],
            note=base and base["note"],
        )
    return section


def _summary(training: dict[str, Any]) -> dict[str, Any]:
    keep = ("loss", "initial_loss", "steps", "optimizer", "lr", "batch_size", "seq_len",
            "seconds", "threads")  # fmt: skip
    return {k: training.get(k) for k in keep}


def _with_probe(row: dict[str, Any], prober: Prober | None) -> dict[str, Any]:
    c = Candidate(row["mode"], row["placement"], row["num_groups"], optimizer=row["optimizer"])
    detail = None if prober is None or c.exact else prober.detail(c)
    if detail is None:
        return row
    return {
        **row,
        "probe_initial_loss": detail["training"].get("initial_loss"),
        "probe_seconds": detail["training"].get("seconds"),
        "grad_rel_error_max": (detail["fidelity"] or {}).get("rel_error_max"),
    }


# -- rendering ----------------------------------------------------------------------------------
