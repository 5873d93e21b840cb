"""Predict every case of the corpus with the estimate backend and compare: `validate`.

Each expressible case becomes a `StepSpec` (its model built from the ``model_config`` the corpus
carries, written once per run as a local config directory, so nothing is fetched) and an
`EstimateBackend` for the case's GPU, CUDA version (the context figure) and training loop (the
warm-up and measured steps the allocator replay follows). Backends are kept per setting, so
cases of one source share built meta models.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from velora_cli.validation.compare import (
    gemm_efficiency_in_use,
    implied_efficiency,
    out_of_bounds,
    predicted_tiers,
    repeat_spread,
    signed_errors,
    summarize,
)
from velora_cli.validation.corpus import Case, repeat_groups
from velora_cli.validation.mapping import Mapped, map_setup

Progress = Callable[[int, int, Mapping[str, Any], float], None]


class ModelDirs:
    """Local config directories for the corpus's model configs, one per distinct config."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._dirs: dict[str, str] = {}

    def path(self, setup: Mapping[str, Any]) -> str:
        # keys starting with "_" are the corpus's comments, not config fields
        config = {
            k: v for k, v in (setup.get("model_config") or {}).items() if not k.startswith("_")
        }
        text = json.dumps(config, sort_keys=True)
        key = hashlib.sha256(text.encode()).hexdigest()[:12]
        if key not in self._dirs:
            name = str(setup.get("model") or "model").replace("/", "--")
            folder = self.root / f"{name}-{key}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text(text)
            self._dirs[key] = str(folder)
        return self._dirs[key]


def mapped_case(case: Case) -> Mapped:
    """The case's setup mapped to velora's terms, with the corpus's own reasons (a record the
    corpus marks not expressible) and an unknown GPU among the missing."""
    from velora_cli.gpus import GpuError, get_gpu

    if case.record.get("expressible") is False:
        # the corpus's own reasons: its figure is not one step velora could rebuild, whatever
        # the mapping of the setup says
        return Mapped(missing=list(case.record.get("missing") or ["marked not expressible"]))
    mapped = map_setup(case.setup, versions=case.record.get("versions"))
    if not (case.setup.get("model_config") or {}):
        mapped.missing.append("model config not in the corpus")
    try:
        get_gpu(case.gpu)
    except GpuError:
        mapped.missing.append(f"gpu {case.gpu}")
    return mapped


def step_spec(case: Case, mapped: Mapped, model_dir: str):
    """The `StepSpec` of an expressible case (the corpus's batch is the micro-batch)."""
    from velora_cli.measure.train_step import StepSpec, Strategy

    accum = int(case.setup.get("grad_accum") or 1)
    return StepSpec(
        model=model_dir,
        batch_size=int(case.setup["batch_size"]) * accum,
        seq_len=int(case.setup["seq_len"]),
        grad_accum_steps=accum,
        strategy=Strategy(**mapped.strategy),
        **mapped.spec,
    )


def case_json(case: Case, mapped: Mapped) -> dict[str, Any]:
    return {
        "id": case.id,
        "source": case.source,
        "gpu": case.gpu,
        "setup": dict(case.setup),
        "expressible": mapped.expressible,
        "measured": dict(case.measured),
        "predicted": {},
        "error": {},
        "missing": list(mapped.missing),
        "notes": list(mapped.notes),
        "derived": list(case.derived),
        "cuda_version": case.cuda_version,
        "outcome": case.outcome,
        "status": "not expressible" if not mapped.expressible else "pending",
        "out_of_bounds": [],
    }


def validate(
    cases: Iterable[Case],
    *,
    progress: Progress | None = None,
    on_case: Callable[[dict[str, Any]], None] | None = None,
    predict: Callable[[Case, Mapped, Any], Mapping[str, Any]] | None = None,
    corpus: Iterable[Case] | None = None,
) -> dict[str, Any]:
    """Predict and compare every case.

    Args:
        cases: from `corpus.load_cases`.
        progress: called after each case with (index from 1, count, the case's JSON, seconds).
        on_case: called with the document so far after each case (to write it as it goes).
        predict: (case, mapped, StepSpec) -> estimate row; default: the estimate backend. Tests
            pass a fake one to check the arithmetic and the exit code.
        corpus: every case the repeats of a validated case are looked up in (default: ``cases``);
            a case whose setup the source ran more than once gets ``repeats``
            (`compare.repeat_spread`): information only, its bounds and verdict are unchanged.

    Returns:
        ``{"cases": [...], "summary": {...}, "passed": bool}``: every case's JSON (measured,
        predicted, signed error per tier), the summary per source and GPU, and whether every
        expressible case was predicted within its bounds.
    """
    cases = list(cases)
    everything = {c.id: c for c in (cases if corpus is None else corpus)}
    everything.update({c.id: c for c in cases})
    groups = repeat_groups(everything.values())
    document: dict[str, Any] = {"cases": [], "summary": {}, "passed": True}
    backends: dict[tuple, Any] = {}
    with tempfile.TemporaryDirectory(prefix="velora-validate-") as tmp:
        dirs = ModelDirs(tmp)
        for index, case in enumerate(cases, start=1):
            started = time.monotonic()
            mapped = mapped_case(case)
            out = case_json(case, mapped)
            if mapped.expressible:
                _predict_case(case, mapped, out, dirs, backends, predict)
            if case.id in groups:
                out["repeats"] = repeat_spread(
                    {i: everything[i].measured["tokens_per_second"] for i in groups[case.id]},
                    out["predicted"].get("tokens_per_second"),
                )
            document["cases"].append(out)
            document["summary"] = summarize(document["cases"])
            document["passed"] = all(
                c["status"] == "ok" and not c["out_of_bounds"]
                for c in document["cases"]
                if c["expressible"]
            )
            if on_case is not None:
                on_case(document)
            if progress is not None:
                progress(index, len(cases), out, time.monotonic() - started)
    return document


def _predict_case(case, mapped, out, dirs, backends, predict) -> None:
    from velora_cli.measure.train_step import SpecError

    try:
        spec = step_spec(case, mapped, dirs.path(case.setup))
    except SpecError as exc:
        out.update(status="failed", message=str(exc))
        return
    if predict is None:
        backend = _backend(case, mapped, backends)
        row = backend.measure(spec)
    else:
        row = predict(case, mapped, spec)
    if row.get("status") != "ok":
        out.update(status="failed", message=row.get("error") or "estimate failed")
        return
    tiers = list(case.measured)
    if case.outcome is not None and "device_bytes" not in tiers:
        tiers.append("device_bytes")  # a fit/OOM verdict: its device prediction is checked too
    out["predicted"] = predicted_tiers(row, tiers)
    out["error"] = signed_errors(case.measured, out["predicted"])
    out["out_of_bounds"] = out_of_bounds(out["error"])
    if case.outcome is not None and "device_bytes" in out["predicted"]:
        total = case.record.get("gpu_total_bytes")
        if total:
            # fits_device False: the replay ran out of the card's memory even after the
            # allocator freed its cache (its figures are then the replay without a limit)
            fits = out["predicted"]["device_bytes"] <= total and row.get("fits_device") is not False
            out["verdict"] = {
                "outcome": case.outcome,
                "predicted_fits": fits,
                "agrees": fits == (case.outcome == "completed"),
                # fits only after the allocator freed its cache in the replay: at the edge
                "at_the_edge": bool(fits and row.get("alloc_retries")),
                "gpu_total_bytes": total,
            }
    out["cuda_context_bytes"] = row.get("cuda_context_bytes")
    if row.get("cuda_context_bytes") is not None:
        from velora_cli.gpus import get_gpu

        # measured / extrapolated / conservative default, for this GPU and CUDA version
        out["cuda_context_basis"] = get_gpu(case.gpu).cuda_context(case.cuda_version).basis
    measured_seconds = (case.record.get("measured") or {}).get("step_seconds")
    if measured_seconds and row.get("predicted_step_seconds"):
        out["timing"] = {
            "measured_step_seconds": measured_seconds,
            "predicted_step_seconds": row["predicted_step_seconds"],
            "predicted_seconds_by_kind": row.get("predicted_seconds_by_kind") or {},
            "implied": implied_efficiency(
                measured_seconds,
                row["predicted_step_seconds"],
                row.get("predicted_seconds_by_kind") or {},
                gemm_efficiency_in_use(case.gpu, case.setup),
            ),
        }
    out["status"] = "ok"


def _backend(case: Case, mapped: Mapped, backends: dict[tuple, Any]):
    from velora_cli.estimate.backend import EstimateBackend

    settings = dict(mapped.backend)
    key = (case.gpu, case.cuda_version, tuple(sorted(settings.items())))
    if key not in backends:
        # the corpus's runs are single-step measurements: the allocator's own defaults
        backends[key] = EstimateBackend(
            gpu=case.gpu, cuda_version=case.cuda_version, alloc_conf="", **settings
        )
    return backends[key]
