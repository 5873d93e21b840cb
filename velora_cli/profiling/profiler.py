"""``velora profile``: plan the rows, validate them, measure each on a backend, save as we go.

Rows are strategies (baseline, gradient checkpointing, VeLoRA placements × sub-token sizes,
VeLoRA + checkpointing) of one training step (``StepSpec``). Every row is measured by the same
backend; the document is rewritten atomically after each row, so an interrupted profile keeps
every row it finished.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

from velora_cli.files import profiles_dir, reserve, slug, write_atomic
from velora_cli.measure.train_step import LOWRANK_OPTIMIZERS, SpecError, StepSpec, Strategy
from velora_cli.profiling.num_groups import PAPER_GROUPS

LOWRANK_NOTICE = (
    "galore/adarankgrad: 2-D weights (not embeddings or the output layer) take their Adam step "
    "in a rank-r subspace of the gradient; the measured step refreshes every subspace (their "
    "costliest step, so the peak holds for all steps). Optimizer state is measured after that "
    "step; adarankgrad's rank adapts during training, so its worst case at the rank cap is "
    "listed too (the estimate backend, without values, runs every weight at that cap)"
)
DEFAULT_PLACEMENTS = ("paper", "qkv+down", "mlp", "all-linear")
DEFAULT_NUM_GROUPS = (64, 32, 16)  # where no model is known; the CLI chooses per model (num_groups)
DEFAULT_GC_EVERY = (2,)


def plan_strategies(
    placements: list[str],
    *,
    num_groups: list[int] | None = None,
    sub_token_sizes: list[int] | None = None,
    gc_every: tuple[int, ...] | list[int] = DEFAULT_GC_EVERY,
    velora_gc: bool = True,
    sac: tuple[str, ...] | list[str] = (),
    offload: tuple[str, ...] | list[str] = (),
) -> list[Strategy]:
    """The rows of a profile, in display order.

    baseline; gc (every layer); gc every n for each n > 1 in ``gc_every``; selective
    checkpointing of every layer for each policy in ``sac``; activation offload for each kind in
    ``offload`` (``inputs`` with checkpointing of every layer, ``all`` alone); VeLoRA for each
    placement × sub-token choice; and, when ``velora_gc``, VeLoRA + full checkpointing for each
    placement at the paper's choice (``num_groups`` 32, M = D/32) when it is one of the choices,
    else at the middle one.
    """
    if num_groups and sub_token_sizes:
        raise SpecError("give --num-groups or --sub-token-size, not both")
    sizes: list[dict[str, int]]
    if sub_token_sizes:
        sizes = [{"sub_token_size": m} for m in sub_token_sizes]
    else:
        sizes = [{"num_groups": g} for g in (num_groups or DEFAULT_NUM_GROUPS)]
    for choice in sizes:
        value = next(iter(choice.values()))
        if value < 1:
            raise SpecError(f"sub-token sizes and group counts must be >= 1, got {value}")
    rows = [Strategy(), Strategy(gc=True)]
    rows += [Strategy(gc=n) for n in dict.fromkeys(gc_every) if n > 1]
    rows += [Strategy(gc=True, sac=kind) for kind in dict.fromkeys(sac)]
    rows += [Strategy(gc=kind == "inputs", offload=kind) for kind in dict.fromkeys(offload)]
    rows += [Strategy(placement=p, **s) for p in placements for s in sizes]
    if velora_gc and placements:
        paper = {"num_groups": PAPER_GROUPS}  # paper Table 5b: M = D/32
        middle = paper if paper in sizes else sizes[len(sizes) // 2]
        rows += [Strategy(placement=p, gc=True, **middle) for p in placements]
    return rows


def validate_strategies(
    spec: StepSpec, strategies: list[Strategy], notes: dict[str, str | None] | None = None
) -> dict[Strategy, str]:
    """Check every VeLoRA row against the model's layer widths before measuring anything.

    Builds the model once on meta (instant, no memory). Raises when a sub-token choice fits no
    targeted layer of any placement (a user error); returns the rows where it fits only some
    layers, with the reason, so they can be reported as ``error`` rows.

    Args:
        notes: filled with placement -> ``shared_input_note`` (which compressed inputs stay
            saved by siblings), when given.

    Raises:
        SpecError: a placement matches nothing, or a sub-token choice divides no targeted layer.
    """
    from velora_cli.measure.train_step import prepare
    from velora_cli.methods.placement import (
        FrozenPlacementError,
        PlacementError,
        _in_features,
        select_layers,
        shared_input_note,
    )
    from velora_cli.methods.velora import SubTokenSizeError, resolve_sub_token_size

    probe = prepare(dataclasses.replace(spec, strategy=Strategy()), "meta")
    model = probe.model
    invalid: dict[Strategy, str] = {}
    fits_somewhere: dict[tuple, bool] = {}
    for strategy in strategies:
        if not strategy.placement:
            continue
        try:
            layers = select_layers(model, strategy.placement)
        except FrozenPlacementError as exc:  # a row that cannot apply here, not a typo
            invalid[strategy] = str(exc)
            continue
        except PlacementError as exc:
            raise SpecError(str(exc)) from None
        if notes is not None and strategy.placement not in notes:
            notes[strategy.placement] = shared_input_note(model, layers)
        choice = (strategy.num_groups, strategy.sub_token_size)
        bad = []
        for name, module in layers.items():
            width = (
                module.lora_A[next(iter(module.lora_A))].in_features
                if hasattr(module, "lora_A")
                else _in_features(module)
            )
            try:
                resolve_sub_token_size(
                    width,
                    sub_token_size=strategy.sub_token_size,
                    num_groups=strategy.num_groups,
                    layer=name,
                )
                fits_somewhere[choice] = True
            except SubTokenSizeError as exc:
                bad.append(str(exc))
        fits_somewhere.setdefault(choice, False)
        if bad:
            invalid[strategy] = f"{bad[0]}" + (
                f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
            )
    for (groups, size), ok in fits_somewhere.items():
        if not ok:
            what = f"--num-groups {groups}" if groups else f"--sub-token-size {size}"
            raise SpecError(
                f"{what} divides no targeted layer's width; e.g. {next(iter(invalid.values()))}"
            )
    return invalid


def _installed_version(name: str) -> str | None:
    """A package's version without importing it (importing peft takes seconds: it imports
    bitsandbytes, which imports torch._inductor); its ``__version__`` if already imported."""
    import importlib.metadata
    import sys

    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__version__", None)
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Versions and the device a profile was measured on."""
    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
    env["peft"] = _installed_version("peft")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            cuda=torch.version.cuda, gpu_name=props.name, gpu_memory_bytes=props.total_memory
        )
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - NVML missing or failing: no driver version
            env["driver"] = None
    else:
        env.update(cuda=None, gpu_name=None, gpu_memory_bytes=None, driver=None)
    return env


def with_deltas(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add differences against the baseline row to every measured row."""
    base = next((r for r in rows if r.get("strategy") == "baseline" and r["status"] == "ok"), None)
    out = []
    for row in rows:
        row = dict(row)
        if base is not None and row["status"] == "ok":
            for key in ("peak_bytes", "activation_bytes"):
                if row.get(key) is not None and base.get(key):
                    row[f"{key.removesuffix('_bytes')}_delta_bytes"] = row[key] - base[key]
                    row[f"{key.removesuffix('_bytes')}_delta_pct"] = (
                        100 * (row[key] - base[key]) / base[key]
                    )
            if row.get("step_seconds") and base.get("step_seconds"):
                row["step_time_ratio"] = row["step_seconds"] / base["step_seconds"]
            if row.get("predicted_step_seconds") and base.get("predicted_step_seconds"):
                row["predicted_time_ratio"] = (
                    row["predicted_step_seconds"] / base["predicted_step_seconds"]
                )
        out.append(row)
    return out


def strategy_fields(strategy: Strategy) -> dict[str, Any]:
    fields = {
        "strategy": strategy.kind,
        "label": strategy.label,
        "placement": strategy.placement,
        "num_groups": strategy.num_groups,
        "sub_token_size": strategy.sub_token_size,
        "gc": strategy.gc,
    }
    # only where set: rows of the strategies that existed before stay as they were
    fields.update({k: v for k, v in (("sac", strategy.sac), ("offload", strategy.offload)) if v})
    return fields


def host_memory_bytes() -> int | None:
    """This machine's physical memory (None where the OS does not say)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_host(row: dict[str, Any], backend: str) -> dict[str, Any]:
    """A row with pinned host memory (activation offload) checked against this machine's
    memory where the step ran here (cpu, cuda); an estimate predicts for another machine."""
    if row.get("host_bytes") is None or backend == "estimate":
        return row
    total = host_memory_bytes()
    if total is None:
        return row
    return {**row, "host_memory_bytes": total, "host_fits": row["host_bytes"] <= total}


def default_save_path(spec: StepSpec, backend: str, directory: Path | None = None) -> Path:
    """A new document name under the profiles directory, taken for this run alone
    (``profile-<model>-<backend>-<stamp>[-n].json``, created exclusively: `files.reserve`).

    Raises:
        OutputError: the directory is not writable (checked before anything is measured).
    """
    stem = f"profile-{slug(spec.model)}-{backend}"
    return reserve(directory or profiles_dir(), stem, ".json")


def make_backend(
    name: str,
    spec: StepSpec,
    *,
    warmup: int | None = None,
    steps: int | None = None,
    gpu: str | None = None,
    alloc_conf: str | None = None,
):
    """The backend object for ``--backend`` (``auto`` resolved here: ``cuda`` when a GPU is
    visible, else ``estimate``: memory and step time predicted for ``gpu``, nothing stepped on
    this CPU; ``--backend cpu`` times real CPU steps); ``gpu`` is the GPU the estimate predicts
    for (`velora_cli.gpus`), ``alloc_conf`` the caching-allocator settings (None: the
    environment's). Steps with ``parallel`` (DDP/FSDP2) go to its per-rank twin
    (`velora_cli.parallel.backends`)."""
    from velora_cli.parallel.backends import with_ranks

    single = _single_backend(name, spec, warmup=warmup, steps=steps, gpu=gpu, alloc_conf=alloc_conf)
    backend = with_ranks(single, warmup=warmup, steps=steps, gpu=gpu)
    if spec.parallel is not None and hasattr(backend.ranks, "check"):
        backend.ranks.check(spec)  # cuda: one visible GPU per rank; cpu: no offload
    return backend


def _single_backend(
    name: str,
    spec: StepSpec,
    *,
    warmup: int | None = None,
    steps: int | None = None,
    gpu: str | None = None,
    alloc_conf: str | None = None,
):
    """The single-process backend for ``--backend`` (``auto`` resolved here)."""
    from velora_cli.estimate.backend import EstimateBackend
    from velora_cli.measure.cpu import CpuBackend
    from velora_cli.measure.cuda import CudaBackend, cuda_available

    if name == "auto":
        name = "cuda" if cuda_available() else "estimate"
    if name == "cuda":
        if not cuda_available():
            raise SpecError(
                "--backend cuda: no CUDA device is visible (torch.cuda.is_available() "
                "is False); use --backend estimate or cpu"
            )
        from velora_cli.estimate.beside import estimate_beside
        from velora_cli.measure.recipe import check_cuda_precision

        check_cuda_precision(spec)  # bf16 on the T4 or V100 torch sees: one line, before any row
        return CudaBackend(**_opts(warmup, steps), alloc_conf=alloc_conf, beside=estimate_beside)
    if name == "cpu":
        return CpuBackend(**_opts(warmup, steps))
    if name == "estimate":
        return EstimateBackend(gpu=gpu, alloc_conf=alloc_conf)
    raise SpecError(f"unknown backend {name!r}; choose auto, cuda, cpu or estimate")


def task_of(spec: StepSpec) -> str:
    """The head ``spec`` trains: ``--task``, else the one its config's architectures name."""
    from velora_cli.models import resolve_model

    if spec.task is not None:
        return spec.task
    return resolve_model(spec.model, trust_remote_code=spec.trust_remote_code).task


def _opts(warmup, steps):
    return {k: v for k, v in (("warmup", warmup), ("steps", steps)) if v is not None}


def run_profile(
    spec: StepSpec,
    strategies: list[Strategy],
    backend,
    *,
    breakdown: bool = False,
    save_path: Path | None = None,
    on_row: Callable[[int, int, dict[str, Any]], None] | None = None,
    before_row: Callable[[int, int, Strategy], None] | None = None,
    notices: list[str] | None = None,
    optimizers: list[str] | None = None,
    parallels: list[str] | None = None,
    budget: int | None = None,
) -> dict[str, Any]:
    """Measure every strategy and return the profile document (saved after each row).

    Args:
        spec: the training step; its strategy is replaced by each row's.
        strategies: rows from ``plan_strategies``.
        optimizers: measure every strategy with each of these optimizers, in this order (rows
            labelled ``optimizer · strategy``; deltas are against the first one's baseline).
            None: ``spec.optimizer`` only.
        backend: an object with ``name`` and ``measure(spec, breakdown=...)``.
        save_path: where the document is written (atomically, after every row).
        on_row / before_row: progress callbacks (index, total, row or strategy).
        parallels: measure every row with each of these (``ddp``, ``fsdp``,
            ``fsdp-no-reshard``, at ``spec.world_size`` ranks; labels ``fsdp · strategy``).
            None: ``spec.parallel`` only.
        budget: device memory in bytes: the verdict (``document["verdict"]``,
            `profiling.verdict`) says which rows fit.
    """
    from velora_cli.estimate.pool import Helped
    from velora_cli.profiling.verdict import choose

    specs = [
        dataclasses.replace(spec, optimizer=o, parallel=p)
        for o in optimizers or [spec.optimizer]
        for p in parallels or [spec.parallel]
    ]
    placement_notes: dict[str, str | None] = {}
    invalid = validate_strategies(spec, strategies, notes=placement_notes)
    document: dict[str, Any] = {
        "kind": "velora-profile",
        "model": spec.model,
        "task": task_of(spec),
        "mode": spec.mode,
        "batch_size": spec.batch_size,
        "seq_len": spec.seq_len,
        "dtype": spec.dtype,
        "amp": spec.amp,
        "precision": spec.precision,
        "optimizer": ",".join(dict.fromkeys(s.optimizer for s in specs)),
        "optimizers": list(dict.fromkeys(s.optimizer_label for s in specs)),
        "backend": backend.name,
        "gpu": getattr(backend, "gpu", None),  # what an estimate predicts for (velora_cli.gpus)
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: v for k, v in spec.to_json().items() if k != "strategy"},
        "environment": environment(),
        "notices": list(notices or []),
        "rows": [],
    }
    if spec.parallel is not None:
        from velora_cli.parallel.job import layout_fields

        document.update(
            layout_fields(spec), parallel=",".join(dict.fromkeys(s.parallel for s in specs))
        )
    if spec.mode in ("lora", "qlora"):
        document["notices"].append(
            f"{spec.mode} mode: VeLoRA compresses the input of each adapter's A "
            "projection (the paper's fine-tuning placement)"
        )
    if spec.mode == "qlora":
        document["notices"].append(
            "qlora mode: frozen base linears (not lm_head) in 4-bit NF4, double quantization, "
            "blocksize 64, bf16 compute (bitsandbytes); quantized_bytes = packed weights + "
            "quantization constants"
        )
    if any(s.optimizer in LOWRANK_OPTIMIZERS for s in specs):
        document["notices"].append(LOWRANK_NOTICE)
    if save_path is not None:
        write_atomic(save_path, document)  # the settings are saved before the first row
    rows: list[dict[str, Any]] = []
    plan = [(s, strategy) for s in specs for strategy in strategies]
    # what each row measures (None: an invalid strategy, reported as an error, never measured)
    items = [None if t in invalid else s.with_strategy(t) for s, t in plan]
    worker = _Rows(backend, breakdown)
    # estimate rows only get a helper process (`estimate.pool`): rows that time real steps never
    # share the machine with one
    helped = Helped(worker, items) if backend.name == "estimate" else None
    try:
        for index, (row_spec, strategy) in enumerate(plan):
            if before_row:
                before_row(index, len(plan), strategy)
            if items[index] is None:
                row = {"status": "error", "backend": backend.name, "error": invalid[strategy]}
            else:
                row = helped.row(index) if helped else worker.row(items[index])
                row = check_host(row, backend.name)
            rows.append(_labelled(row, row_spec, strategy, len(specs), parallels, placement_notes))
            document["rows"] = with_deltas(rows)
            document["verdict"] = dataclasses.asdict(choose(document["rows"], budget))
            if save_path is not None:
                write_atomic(save_path, document)
            if on_row:
                on_row(index, len(plan), document["rows"][-1])
    finally:
        if helped is not None:
            helped.close()
    return document


def _labelled(row, row_spec, strategy, n_specs, parallels, placement_notes) -> dict[str, Any]:
    """A measured row with its strategy's fields, optimizer, label and placement note."""
    row = {**strategy_fields(strategy), "optimizer": row_spec.optimizer_label, **row}
    if n_specs > 1:
        varying = [row_spec.optimizer] * (n_specs > len(parallels or [None]))
        varying += [row_spec.parallel] * (len(parallels or []) > 1)
        row["label"] = " · ".join([*varying, row["label"]])
    if strategy.placement and placement_notes.get(strategy.placement):
        row.setdefault("note", placement_notes[strategy.placement])
    return row


class _Rows:
    """The profile's worker for `estimate.pool.Helped`: a row is the backend's row of its spec,
    whichever process ran it; invalid strategies (None) are never estimated."""

    def __init__(self, backend, breakdown: bool) -> None:
        self.backend = backend
        self.breakdown = breakdown

    def row(self, spec: StepSpec) -> dict[str, Any]:
        return self.backend.measure(spec, breakdown=self.breakdown)

    def floored(self, spec: StepSpec | None) -> bool:
        return spec is None

    def note_floor(self, spec: StepSpec, row: dict[str, Any]) -> None:
        pass
