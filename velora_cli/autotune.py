"""``velora tune``: the glue between the search (tuner.py) and the backends, probes and journal.

The tuner decides; this module turns the user's settings into its three callables:

    estimate(c)  the estimate backend (meta tensors), cached per candidate
    measure(c)   the chosen backend: cuda (budget against the device-level peak), cpu, or the
                 cached estimate itself with ``--backend estimate`` (then nothing is a real run,
                 and the recommendation says so)
    probe(c)     a short training probe against the uncompressed baseline of the same mode
                 (run once; AdamW's for a low-rank optimizer, which approximates its step), plus
                 gradient fidelity with VeLoRA; shared by candidates that differ only in
                 checkpointing or micro-batch (neither changes the maths)

and collects everything into the tune document (``profiles/tune-<model>-<stamp>.json``), with the
journal beside it (same name, ``.jsonl``) so that an interrupted tune resumes.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from velora_cli import probes
from velora_cli.budget import format_bytes
from velora_cli.tuner import (
    Candidate,
    Journal,
    Measurement,
    Probe,
    optimizers_for,
    search_space,
    tune,
)

DEFAULT_PLACEMENTS = ("paper", "all-linear")
# `velora tune`'s optimizers: AdamW, and the two that shrink its state by projecting 2-D weight
# gradients (full mode only: lora/qlora candidates are tried with AdamW alone).
DEFAULT_OPTIMIZERS = ("adamw", "galore", "adarankgrad")
DEFAULT_NUM_GROUPS = (32,)  # paper Table 5b: M = D/32
DEFAULT_GC_EVERY = (2,)  # besides none and every layer
DEFAULT_PROBE_STEPS = (
    probes.DEFAULT_STEPS
)  # K=16 is unstable from scratch (loss still falling steeply)
# cpu measurements are real steps (llama-60m, 8×256: ≈ 20 s each on 2 cores), so a tune on the cpu
# backend measures at most this many candidates by default; the fastest estimated come first.
DEFAULT_MAX_MEASURED_CPU = 4
# Without a GPU, probes run on the CPU; above this many parameters that takes too long (a probe is
# 16 steps + evaluation, and AdamW holds 16 bytes per parameter), so they are skipped and said so.
PROBE_CPU_PARAMS = 200e6
# What must match for a journal's results to be reused (what a measurement or probe depends on).
CONTEXT_KEYS = (
    "model", "batch_size", "seq_len", "dtype", "amp", "optimizers", "rank", "update_gap", "eta",
    "lora_rank", "lora_targets", "init", "weights", "backend", "budget_bytes", "probe_steps",
    "data",
)  # fmt: skip
LOWRANK_NOTICE = (
    "galore/adarankgrad (full mode only): their probe is compared with the AdamW probe of the "
    "same mode, each at its own learning rate; memory is measured at a subspace refresh (their "
    "costliest step), and adarankgrad's estimate is at its rank cap (an upper bound)"
)


class TuneError(ValueError):
    """A tune that cannot start as asked (resume mismatch, no budget...); says what to do."""


@dataclass(frozen=True)
class TuneSettings:
    """Everything a tune depends on, resolved from the command line."""

    model: str
    budget_bytes: int
    backend: str  # cuda | cpu | estimate (auto already resolved)
    batch_size: int = 8
    seq_len: int = 256
    dtype: str = "fp32"
    amp: str | None = None
    optimizers: tuple[str, ...] = ("adamw",)  # the CLI searches DEFAULT_OPTIMIZERS
    rank: int | None = None  # galore/adarankgrad (max) rank; None: hidden size / 4
    update_gap: int = 200  # = lowrank.DEFAULT_UPDATE_GAP (not imported: it imports torch)
    eta: float = 0.9  # = lowrank.DEFAULT_ETA
    lora_rank: int = 8
    lora_targets: str = "all-linear"
    init: str = "batch_average_once"
    weights: bool = False
    trust_remote_code: bool = False
    modes: tuple[str, ...] = ("full",)
    placements: tuple[str, ...] = DEFAULT_PLACEMENTS
    num_groups: tuple[int, ...] = DEFAULT_NUM_GROUPS
    gc_every: tuple[int, ...] = DEFAULT_GC_EVERY
    micro_batches: tuple[int, ...] | None = None
    margin: float = 0.05
    objective: str = "speed"
    max_loss_increase: float = 0.01
    max_measured: int | None = None
    probe_steps: int = DEFAULT_PROBE_STEPS  # 0: no probes
    data: str | None = None
    budget_source: str = "--budget"  # or "free GPU memory"

    def context(self) -> dict[str, Any]:
        """The journal header: the settings a journal's results depend on (as JSON has them)."""
        return {k: json_value(getattr(self, k)) for k in CONTEXT_KEYS}

    def optimizers_by_mode(self) -> dict[str, list[str]]:
        """Mode -> the optimizers tried in it (galore and adarankgrad in full mode only).

        Raises:
            SpecError: no mode has an optimizer to try (e.g. ``--mode lora --optimizer galore``).
        """
        from velora_cli.measure.train_step import SpecError

        found = {mode: optimizers_for(mode, self.optimizers) for mode in self.modes}
        if not any(found.values()):
            raise SpecError(
                f"--optimizer {','.join(self.optimizers)} projects full weight gradients, and "
                f"--mode {','.join(self.modes)} trains low-rank adapters already: add full to "
                "--mode, or adamw to --optimizer"
            )
        return found

    def base_spec(self):
        """The step of the first mode and its first optimizer; candidates replace both.

        Raises:
            SpecError: an invalid setting (batch, precision, rank...) or no valid mode/optimizer.
        """
        from velora_cli.measure.train_step import StepSpec

        mode, optimizers = next((m, o) for m, o in self.optimizers_by_mode().items() if o)
        return StepSpec(
            model=self.model,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            dtype=self.dtype,
            amp=self.amp,
            mode=mode,
            lora_rank=self.lora_rank,
            lora_targets=self.lora_targets,
            optimizer=optimizers[0],
            rank=self.rank,
            update_gap=self.update_gap,
            eta=self.eta,
            weights=self.weights,
            trust_remote_code=self.trust_remote_code,
            init=self.init,
        )


def json_value(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so journal contexts compare."""
    return list(value) if isinstance(value, tuple) else value


def candidate_spec(base, c: Candidate):
    """The training step of candidate ``c``: the effective batch kept through accumulation."""
    from velora_cli.measure.train_step import Strategy

    return dataclasses.replace(
        base,
        batch_size=c.batch_size,
        grad_accum_steps=c.grad_accum_steps,
        mode=c.mode,
        optimizer=c.optimizer,
        strategy=Strategy(placement=c.placement, num_groups=c.num_groups, gc=c.gc),
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
    from velora_cli.profiler import validate_strategies

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
    )
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
        from velora_cli.quant import INSTALL_HINT

        why["qlora"] = f"{INSTALL_HINT} (or --backend estimate)"
    return {m: w for m, w in why.items() if m in settings.modes}


# -- the three callables ------------------------------------------------------------------------


def _measurement(row: dict[str, Any], spec, use_device_peak: bool) -> Measurement:
    """A backend row as the tuner's Measurement; the row's other fields travel in detail."""
    from velora_cli.profiler import strategy_fields

    status = row.get("status", "error")
    peak = row.get("peak_bytes")
    detail = {**strategy_fields(spec.strategy), **row}
    if use_device_peak and row.get("device_used_bytes") is not None:
        # cuda: the budget is the device's memory, so the device-level peak (context included)
        peak = row["device_used_bytes"]
        detail["allocator_peak_bytes"] = row.get("peak_bytes")
        detail["peak_source"] = "device_used_bytes (device-level, CUDA context included)"
    for key in ("peak_bytes", "step_seconds", "tokens_per_second", "status", "backend"):
        detail.pop(key, None)
    if row.get("wrapped_layers") is not None:
        detail["velora_layers"] = row["wrapped_layers"]  # feeds tuner.cost_rank
    return Measurement(
        peak_bytes=peak if status == "ok" else None,
        step_seconds=row.get("step_seconds"),
        tokens_per_second=row.get("tokens_per_second"),
        status=status if status in ("ok", "oom") else "error",
        backend=row.get("backend", ""),
        detail=detail,
    )


class Estimator:
    """``estimate(c)``: the estimate backend on meta tensors, cached per candidate.

    A mode that cannot fit is not stepped through candidate by candidate: params + gradients +
    optimizer state are the same for every candidate of one mode and optimizer, and all alive
    in the optimizer step, so the first estimate of a mode gives a floor under all its peaks.
    When the floor alone exceeds the budget, the mode's candidates get it as their estimate,
    marked ``lower_bound`` (7B in full and lora mode: 46 steps on meta saved), except the
    leanest ones (full checkpointing at the smallest micro-batch), which are still estimated so
    that "nothing fits" can name the smallest configuration and its real estimate.
    """

    def __init__(self, settings: TuneSettings):
        from velora_cli.measure.estimate import EstimateBackend

        self.base, self.backend = settings.base_spec(), EstimateBackend()
        self.budget = settings.budget_bytes
        self.min_micro = min(settings.micro_batches or (1,))
        self.cache: dict[str, Measurement] = {}
        self.floors: dict[tuple[str, str], int] = {}  # (mode, optimizer) -> bytes
        self.calls = 0

    def __call__(self, c: Candidate) -> Measurement:
        if c.key not in self.cache:
            spec = candidate_spec(self.base, c)
            floor = self.floors.get((c.mode, c.optimizer))
            leanest = c.gc is True and c.micro_batch_size == self.min_micro
            if floor is not None and floor > self.budget and not leanest:
                from velora_cli.profiler import strategy_fields

                self.cache[c.key] = Measurement(
                    floor, None, None, backend="estimate",
                    detail={**strategy_fields(spec.strategy), "lower_bound": True},
                )  # fmt: skip
                return self.cache[c.key]
            self.calls += 1
            row = self.backend.measure(spec)
            if row.get("status") == "ok":
                static = row["param_bytes"] + row["grad_bytes"] + row["optimizer_bytes"]
                self.floors.setdefault((c.mode, c.optimizer), static)
            self.cache[c.key] = _measurement(row, spec, False)
        return self.cache[c.key]


class Measurer:
    """``measure(c)``: one training step on the chosen backend (also the verification run)."""

    def __init__(self, settings: TuneSettings, estimator: Estimator, backend=None):
        from velora_cli.profiler import make_backend

        self.settings, self.estimator = settings, estimator
        self.base = settings.base_spec()
        if backend is None and settings.backend != "estimate":
            # cpu: 1 warm-up (optimizer state), the tracked step, 1 timed step; a real llama-60m
            # step takes ~20 s on 2 cores, and the verification run re-measures the choice anyway
            steps = 1 if settings.backend == "cpu" else None
            backend = make_backend(settings.backend, self.base, steps=steps)
        self.backend = backend
        self.calls = 0

    def __call__(self, c: Candidate) -> Measurement:
        self.calls += 1
        if self.backend is None:  # --backend estimate: the "measurement" is the estimate
            return self.estimator(c)
        spec = candidate_spec(self.base, c)
        return _measurement(self.backend.measure(spec), spec, self.settings.backend == "cuda")


class Prober:
    """``probe(c)``: training probe vs the baseline of c's mode, and gradient fidelity.

    The baseline is the mode's exact step (no VeLoRA) with c's optimizer, or with AdamW when c's
    optimizer is galore or adarankgrad: they approximate AdamW's step, so their loss change is
    measured against it (on the same steps and data, each optimizer at its own learning rate,
    ``probes.DEFAULT_LR``). Results are cached by what changes the maths (mode, placement,
    num_groups, optimizer) and journaled with their details, so a resumed tune neither re-runs
    nor loses them.
    """

    def __init__(self, settings: TuneSettings, journal: Journal | None, device: str = "cpu"):
        self.settings, self.journal, self.device = settings, journal, device
        self.base = settings.base_spec()
        self.details: dict[str, dict[str, Any]] = {}
        self.baselines: dict[str, dict[str, Any]] = {}
        self.calls = 0  # probes actually run (baselines included)

    @staticmethod
    def key(c: Candidate) -> str:
        return f"{c.mode}|{c.placement or 'none'}|g{c.num_groups or '-'}|{c.optimizer}"

    @staticmethod
    def baseline_optimizer(optimizer: str) -> str:
        """The optimizer of the baseline a candidate with ``optimizer`` is compared with."""
        from velora_cli.measure.train_step import LOWRANK_OPTIMIZERS

        return "adamw" if optimizer in LOWRANK_OPTIMIZERS else optimizer

    def _journaled(self, stage: str, key: str, run: Callable[[], dict]) -> dict[str, Any]:
        if self.journal is not None and (done := self.journal.get(stage, key)) is not None:
            return done
        result = run()
        if self.journal is not None:
            self.journal.record(stage, key, result)
        return result

    def _train(self, spec) -> dict[str, Any]:
        from velora_cli.probes import training_probe

        self.calls += 1
        return training_probe(
            spec, steps=self.settings.probe_steps, data=self.settings.data, device=self.device
        )

    def baseline(self, mode: str, optimizer: str) -> dict[str, Any]:
        """The probe of ``mode``'s exact step with ``optimizer`` (run once, journaled)."""
        from velora_cli.measure.train_step import Strategy

        key = f"{mode} {optimizer}"
        if key not in self.baselines:
            spec = dataclasses.replace(
                self.base, mode=mode, optimizer=optimizer, strategy=Strategy()
            )
            result = self._journaled("probe-baseline", key, lambda: self._train(spec))
            self.baselines[key] = result
        return self.baselines[key]

    def detail(self, c: Candidate) -> dict[str, Any] | None:
        """The probe details of c's configuration, from this run or the journal."""
        key = self.key(c)
        if key not in self.details and self.journal is not None:
            done = self.journal.get("probe-detail", key)
            if done is not None:
                self.details[key] = done
        return self.details.get(key)

    def all_baselines(self) -> dict[str, dict[str, Any]]:
        """Baseline probes ("<mode> <optimizer>" -> result) of this run and, for a resumed tune,
        of the journal."""
        if self.journal is None:
            return self.baselines
        for mode, optimizers in self.settings.optimizers_by_mode().items():
            for optimizer in dict.fromkeys(self.baseline_optimizer(o) for o in optimizers):
                key = f"{mode} {optimizer}"
                done = self.journal.get("probe-baseline", key)
                if key not in self.baselines and done is not None:
                    self.baselines[key] = done
        return self.baselines

    def __call__(self, c: Candidate) -> Probe:
        from velora_cli.probes import compare, gradient_fidelity

        key = self.key(c)
        if key not in self.details:
            baseline = self.baseline(c.mode, self.baseline_optimizer(c.optimizer))
            spec = candidate_spec(self.base, dataclasses.replace(c, gc=False))

            def run() -> dict[str, Any]:
                trained = self._train(spec)
                if not c.uses_velora:  # exact gradients: only the optimizer approximates
                    return {"training": trained, "fidelity": None}
                fidelity = gradient_fidelity(spec, data=self.settings.data, device=self.device)
                fidelity.pop("layers", None)  # per-layer cosines: summary only in the document
                return {"training": trained, "fidelity": fidelity}

            detail = self._journaled("probe-detail", key, run)
            detail["loss_increase"] = compare(detail["training"], baseline)
            self.details[key] = detail
        detail = self.details[key]
        fidelity = detail["fidelity"] or {}
        return Probe(
            loss=detail["training"]["loss"],
            loss_increase=detail["loss_increase"],
            grad_cosine_min=fidelity.get("cosine_min"),
            grad_cosine_mean=fidelity.get("cosine_mean"),
        )


# -- progress -----------------------------------------------------------------------------------


class TuneProgress:
    """Progress lines (stderr): what runs now, how many measured of how many, elapsed and ETA."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo = echo
        self.start = time.perf_counter()
        self.measure_times: list[float] = []
        self._measuring_since: float | None = None

    def __call__(self, message: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if self._measuring_since is not None:
            self.measure_times.append(now - self._measuring_since)
            self._measuring_since = None
        stage = message.split()[0]
        eta = ""
        if stage in ("measure", "verify"):
            self._measuring_since = now
            if self.measure_times and total > done:
                each = sum(self.measure_times) / len(self.measure_times)
                eta = f", eta ≥ {_duration(each * (total - done))}"
        self.echo(f"[{min(done + (stage == 'measure'), total)}/{total}] {message} "
                  f"({_duration(now - self.start)} elapsed{eta})")  # fmt: skip


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# -- the run ------------------------------------------------------------------------------------


def profiles_dir() -> Path:
    return Path(os.environ.get("VELORA_PROFILES_DIR", "profiles"))


def new_paths(model: str, directory: Path | None = None) -> tuple[Path, Path]:
    """(tune document, journal) paths for a new tune: ``tune-<model>-<stamp>.json/.jsonl``."""
    directory = directory or profiles_dir()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model).strip("_")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = directory / f"tune-{slug}-{stamp}.json"
    return path, path.with_suffix(".jsonl")


def latest(pattern: str, directory: Path | None = None) -> Path | None:
    """The most recently modified file matching ``pattern`` under the profiles directory."""
    found = sorted((directory or profiles_dir()).glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def resume_journal(path: Path, settings: TuneSettings) -> Journal:
    """Reopen a journal whose recorded settings match ``settings``.

    Raises:
        FileNotFoundError: no journal at ``path``.
        TuneError: it was recorded with other settings (the message lists them).
    """
    if not path.is_file():
        raise FileNotFoundError(f"no tune journal at {path}")
    journal = Journal.load(path)
    recorded = journal.context or {}
    context = settings.context()
    differ = [k for k in CONTEXT_KEYS if recorded.get(k) != context[k]]
    if differ:
        was = ", ".join(f"{k}={recorded.get(k)!r}" for k in differ)
        now = ", ".join(f"{k}={context[k]!r}" for k in differ)
        raise TuneError(
            f"cannot resume {path}: it was recorded with {was}, this run has {now}; rerun with "
            "the same settings, or without --resume to start a new tune"
        )
    return journal


def probe_device(
    settings: TuneSettings, estimator: Estimator, first: Candidate
) -> tuple[str | None, str | None]:
    """Where probes run: (device, None), or (None, why they are skipped)."""
    if settings.probe_steps == 0:
        return None, (
            "accuracy probes off (--probe-steps 0): VeLoRA and galore/adarankgrad candidates are "
            "not probed"
        )
    if settings.backend == "cuda":
        return "cuda", None
    row = estimator(first).detail
    # qlora: 4-bit weights (packed two per byte) count as their number of values
    unpacked = row.get("param_bytes", 0) - row.get("quantized_params", 0) // 2
    params = unpacked / {"fp32": 4, "bf16": 2, "fp16": 2}[settings.dtype]
    params += row.get("quantized_params", 0)
    if settings.backend == "estimate" and params > PROBE_CPU_PARAMS:
        return None, (
            f"accuracy probes skipped: {settings.model} ({params / 1e6:,.0f}M parameters) is too "
            "large to probe on this CPU; run with --backend cuda on a GPU to probe"
        )
    return "cpu", None


def run(
    settings: TuneSettings,
    *,
    save_path: Path | None,
    journal: Journal | None,
    progress: Callable[[str, int, int], None] | None = None,
    echo: Callable[[str], None] | None = None,
    backend=None,
    notices: list[str] | None = None,
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

    Returns:
        The tune document (see ``velora tune --format json``).
    """
    from velora_cli import __version__
    from velora_cli.measure.train_step import LOWRANK_OPTIMIZERS
    from velora_cli.models import resolve_model
    from velora_cli.profiler import environment, write_atomic

    echo = echo or (lambda line: None)
    notices = list(notices or [])
    resolved = resolve_model(settings.model, trust_remote_code=settings.trust_remote_code)
    if resolved.notice:
        notices.append(resolved.notice)
    candidates, dropped = build_space(settings)
    notices += dropped
    if any(c.optimizer in LOWRANK_OPTIMIZERS for c in candidates):
        notices.append(LOWRANK_NOTICE)
    estimator = Estimator(settings)
    measurer = Measurer(settings, estimator, backend)
    device, why = probe_device(settings, estimator, candidates[0]) if candidates else (None, None)
    prober = Prober(settings, journal, device) if device else None
    if why:
        notices.append(why)
    if settings.backend == "estimate":
        notices.append(
            "--backend estimate: every peak is estimated on meta tensors and no training step is "
            "run (no step times: speed is ranked by the estimate's proxy); check the "
            "recommendation with --backend cuda before relying on it"
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
            recommendation["reason"] = _estimate_reason(recommendation, result)
        warnings += _timing_warnings(recommendation)
    spec = settings.base_spec()
    document: dict[str, Any] = {
        "kind": "velora-tune",
        "model": settings.model,
        "mode": ",".join(settings.modes),
        "batch_size": settings.batch_size,
        "seq_len": settings.seq_len,
        "dtype": settings.dtype,
        "amp": settings.amp,
        "precision": spec.precision,
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


def _estimate_reason(rec: dict[str, Any], result) -> str:
    n = sum(row["status"] in ("feasible", "chosen") for row in result.candidates)
    won = {
        "speed": "the best estimated speed rank (least checkpointing recompute, then no 4-bit "
        "dequantization, then the largest micro-batch, then the fewest VeLoRA layers; no step "
        "was timed)",
        "memory": f"the smallest estimated peak ({format_bytes(rec['peak_bytes'])})",
        "accuracy": "the smallest loss change vs the uncompressed baseline",
    }[result.objective]
    return (
        f"{rec['key']} has {won} of the {n} configurations estimated within "
        f"{format_bytes(result.limit_bytes)} (budget {format_bytes(result.budget_bytes)} − "
        f"{rec['margin']:.0%})"
        + (" and the loss tolerance" if rec.get("loss") is not None else "")
        + "; estimates only (--backend estimate): no training step was run"
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
