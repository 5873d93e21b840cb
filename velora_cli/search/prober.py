"""The tune's ``probe(c)``: a short training probe against the uncompressed baseline of the same
mode (run once; AdamW's for a low-rank optimizer, which approximates its step), plus gradient
fidelity with VeLoRA; shared by candidates that differ only in checkpointing or micro-batch
(neither changes the maths). Results are journaled, so a resumed tune neither re-runs nor loses
them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from velora_cli.search.candidates import Candidate, Probe
from velora_cli.search.journal import Journal
from velora_cli.search.settings import PROBE_CPU_PARAMS, TuneSettings, candidate_spec

if TYPE_CHECKING:
    from velora_cli.search.estimator import Estimator


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
        from velora_cli.search.probes import training_probe

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
        from velora_cli.search.probes import compare, gradient_fidelity

        key = self.key(c)
        if key not in self.details:
            baseline = self.baseline(c.mode, self.baseline_optimizer(c.optimizer))
            one_process = dataclasses.replace(c, gc=False, world_size=1, parallel=None)
            spec = candidate_spec(self.base, one_process)  # the maths, not the layout

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


def probe_device(
    settings: TuneSettings, estimator: Estimator, first: Candidate
) -> tuple[str | None, str | None]:
    """Where probes run: (device, None), or (None, why they are skipped)."""
    if settings.probe_steps == 0:
        return None, (
            "accuracy probes off (--probe-steps 0): VeLoRA and galore/adarankgrad candidates are "
            "not probed"
        )
    from velora_cli.profiling.profiler import task_of

    task = task_of(settings.base_spec())
    if task not in ("causal-lm", "masked-lm"):
        return None, (
            f"accuracy probes skipped: they train on text with a language-model loss, and "
            f"{settings.model} trains the {task} head"
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
