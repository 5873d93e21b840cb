"""Search for the best training configuration under a memory budget; decision only, no torch.

The tuner is handed three callables and a budget. It never measures anything itself:

    estimate(c) -> Measurement   cheap, may be off by a few percent (meta device, analytic, ...)
    measure(c)  -> Measurement   a real training step on the chosen backend
    probe(c)    -> Probe         accuracy proxy, loss change relative to the uncompressed baseline

Strategy (issue 4, §2):
1. estimate every candidate; drop those whose estimated peak exceeds the budget itself (the real gate
   is the measured peak against budget·(1 − margin), estimates only prune the obviously hopeless);
2. keep the Pareto front on (estimated peak ↓, estimated speed ↑), plus the next fronts until at
   least `MIN_FIRST_ROUND` candidates are planned. "Speed" is the estimated tokens/s when the estimate
   gives one for every candidate, otherwise `cost_rank`;
3. measure the planned candidates; feasible = status "ok" and measured peak ≤ budget·(1 − margin);
4. probe feasible candidates that change the maths (VeLoRA, a low-rank optimizer) and reject those
   above `max_loss_increase`; the others have loss_increase 0.0 exactly (checkpointing and
   micro-batching do not change the maths) and are never probed. Candidates that differ only in
   checkpointing share one probe;
5. repeat 2-4 on what is left, with the accepted candidates kept in the front: candidates that an
   accepted one dominates cannot win and are never measured, those only dominated by a rejected
   one now surface. Candidates whose estimated peak is at least that of a measured over-budget
   candidate of the same mode are presumed over budget and skipped;
6. order the accepted candidates by the objective and re-measure the first (a fresh verification
   run); it must again be "ok" and within budget·(1 − margin), else the next one is tried.

Nothing unmeasured is ever recommended: the recommendation carries its verification run's numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from velora_cli.budget import format_bytes
from velora_cli.search.candidates import (
    Candidate,
    Measurement,
    Probe,
    cost_rank,
    optimizers_for,
    search_space,
)
from velora_cli.search.journal import Journal

__all__ = [
    "Candidate",
    "Journal",
    "Measurement",
    "Probe",
    "TuneResult",
    "cost_rank",
    "optimizers_for",
    "search_space",
    "tune",
]

OBJECTIVES = ("speed", "memory", "accuracy")
# First round measures at least this many candidates, so a front of one or two estimated points
# (estimates can be off) still leaves something measurable.
MIN_FIRST_ROUND = 3


@dataclass
class TuneResult:
    """The outcome of `tune`: every candidate's row, the verified choice, and why.

    `recommendation` is None when nothing fits. `smallest` is the smallest-memory configuration seen
    (filled whether or not something fits; ``peak_source`` says whether its ``smallest_peak_bytes``
    was measured or only estimated). Each candidate row has a ``status``:

    - never measured: "infeasible-estimate" (estimated peak > budget), "not-measured-dominated"
      (an accepted candidate is estimated smaller and faster), "not-measured-presumed-over" (a
      same-mode candidate with a smaller or equal estimate measured over budget),
      "not-measured-limit" (max_measured reached);
    - measured: "oom", "error", "over-budget" (peak > budget·(1 − margin)), "rejected-accuracy",
      "feasible", "verification-failed", "chosen".

    Example:
        >>> result = tune(space, estimate=est, measure=run, probe=probe, budget_bytes=10**10)
        >>> result.recommendation["key"] if result.recommendation else result.reason
        'full|paper|g32|gc=off|mb4x2|adamw'
    """

    candidates: list[dict]
    recommendation: dict | None
    smallest: dict | None
    reason: str
    budget_bytes: int = 0
    limit_bytes: int = 0
    objective: str = "speed"


def _from_dict(cls: type, data: dict) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------------------------------
# the search


@dataclass(eq=False)
class _Entry:
    """Mutable state of one candidate during a tune (rows are built from it at the end)."""

    candidate: Candidate
    estimate: Measurement
    cost: tuple = ()
    measurement: Measurement | None = None
    probe: Probe | None = None
    verification: Measurement | None = None
    status: str = "pending"
    note: str = ""
    round: int | None = None
    on_front: bool = False

    @property
    def est_peak(self) -> float:
        peak = self.estimate.peak_bytes
        return math.inf if peak is None else peak  # unknown sorts as "biggest", never dropped

    @property
    def loss_increase(self) -> float | None:
        if self.candidate.exact:
            return 0.0  # checkpointing and micro-batching do not change the maths
        return None if self.probe is None else self.probe.loss_increase

    @property
    def accuracy(self) -> float | None:
        """Loss increase clipped at 0 (beating the exact baseline is noise), None if unknown."""
        li = self.loss_increase
        return None if li is None or not math.isfinite(li) else max(li, 0.0)


def _static_bytes(detail: dict) -> int | None:
    """Parameters + gradients + optimizer state of a step (what no activation saving shrinks),
    or None when the row does not say them."""
    parts = [detail.get(k) for k in ("param_bytes", "grad_bytes", "optimizer_bytes")]
    return None if any(p is None for p in parts) else sum(parts)


def _probe_key(c: Candidate) -> str:
    # gc (selective or not, offloaded or not) and the parallel layout do not change the maths:
    # candidates that differ only there share one probe
    return replace(c, gc=False, world_size=1, parallel=None, sac=None, offload=None).key


class _Search:
    """The state of one tune; `tune` below reads as the strategy, this class holds the steps."""

    def __init__(self, estimate, measure, probe, budget, margin, objective, max_loss, max_measured,
                 journal, progress) -> None:  # fmt: skip
        self.estimate_fn, self.measure_fn, self.probe_fn = estimate, measure, probe
        self.budget, self.margin, self.objective = budget, margin, objective
        self.limit = int(budget * (1 - margin))
        self.max_loss, self.max_measured = max_loss, max_measured
        self.journal, self.progress = journal, progress
        self.entries: list[_Entry] = []
        self.accepted: list[_Entry] = []  # measured, within limit, accuracy ok, not yet failed
        self.over: list[_Entry] = []  # measured over budget or OOM: prune by estimated peak
        self.probes: dict[str, tuple[Probe, str]] = {}
        self.measured = 0
        self.rounds = 0
        self.speed_known = False

    # -- calls, through the journal -----------------------------------------------------------
    def _call(self, stage: str, key: str, fn: Callable, c: Candidate, cls: type) -> tuple[Any, str]:
        """(result, error text); a finished result comes from the journal when it has one."""
        if self.journal is not None and (done := self.journal.get(stage, key)) is not None:
            return _from_dict(cls, done), ""
        try:
            result = fn(c)
        except Exception as exc:  # one broken candidate must not end the tune (REFERENCE §3)
            return None, f"{type(exc).__name__}: {exc}"  # not journaled: retried on resume
        if not isinstance(result, cls):
            return None, f"{stage} returned {type(result).__name__}, expected {cls.__name__}"
        if self.journal is not None:
            self.journal.record(stage, key, asdict(result))
        return result, ""

    def _cached(self, stage: str, key: str) -> bool:
        return self.journal is not None and self.journal.get(stage, key) is not None

    def _report(self, message: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(message, done, total)

    def _measure(self, stage: str, c: Candidate) -> Measurement:
        m, error = self._call(stage, c.key, self.measure_fn, c, Measurement)
        if m is None:
            m = Measurement(None, None, None, "error", detail={"error": error})
        return m

    # -- 1. estimates -------------------------------------------------------------------------
    def estimate_all(self, candidates: Iterable[Candidate]) -> None:
        todo: dict[str, Candidate] = {}
        for c in candidates:
            todo.setdefault(c.key, c)  # duplicates by key: the first one counts
        todo = list(todo.values())
        plan = getattr(self.estimate_fn, "plan", None)  # Estimator: a helper process may share
        if plan is not None:
            plan([c for c in todo if not self._cached("estimate", c.key)])
        try:
            self._estimate_each(todo)
        finally:
            finish = getattr(self.estimate_fn, "finish", None)
            if finish is not None:
                finish()
        alive = self.pending()
        self.speed_known = bool(alive) and all(
            e.estimate.tokens_per_second is not None for e in alive
        )

    def _estimate_each(self, todo: list[Candidate]) -> None:
        for i, c in enumerate(todo):
            verb = "resume estimate" if self._cached("estimate", c.key) else "estimate"
            self._report(f"{verb} {c.key}", i, len(todo))
            est, error = self._call("estimate", c.key, self.estimate_fn, c, Measurement)
            if est is None:  # unknown estimate: kept, sorted as the biggest
                est = Measurement(None, None, None, "error", detail={"error": error})
            e = _Entry(c, est, cost=cost_rank(c, est.detail.get("velora_layers")))
            note = self._over_budget(est)
            if note is not None:
                e.status, e.note = "infeasible-estimate", note
            self.entries.append(e)
        self._report("estimate done", len(todo), len(todo))

    def _over_budget(self, est: Measurement) -> str | None:
        """Why an estimate rules its candidate out (None when it does not)."""
        if est.status == "oom":
            return "the estimate ran out of memory"
        if est.peak_bytes is None or est.peak_bytes <= self.budget:
            return None
        floor = est.detail.get("lower_bound")  # params + grads + optimizer state only
        what = "params+grads+optimizer state" if floor else "estimated peak"
        return f"{what} {format_bytes(est.peak_bytes)} > budget {format_bytes(self.budget)}"

    def pending(self) -> list[_Entry]:
        return [e for e in self.entries if e.status == "pending"]

    # -- 2. Pareto front on estimates ---------------------------------------------------------
    def _speed_bad(self, e: _Entry) -> Any:
        """Smaller is faster: minus estimated tokens/s when every estimate has one, else cost_rank."""
        return -e.estimate.tokens_per_second if self.speed_known else e.cost

    def dominates(self, a: _Entry, b: _Entry) -> bool:
        pa, pb, sa, sb = a.est_peak, b.est_peak, self._speed_bad(a), self._speed_bad(b)
        if not (pa <= pb and sa <= sb and (pa < pb or sa < sb)):
            return False
        if self.objective != "accuracy" or _probe_key(a.candidate) == _probe_key(b.candidate):
            return True
        # accuracy is an objective here: a must be known to be at least as accurate as b can be
        return a.accuracy is not None and a.accuracy <= (b.accuracy or 0.0)

    def _front(self, entries: list[_Entry]) -> list[_Entry]:
        return [e for e in entries if not any(self.dominates(o, e) for o in entries if o is not e)]

    def _plan_key(self, e: _Entry) -> tuple:
        speed, key = self._speed_bad(e), e.candidate.key
        if self.objective == "memory":
            return (e.est_peak, speed, key)
        if self.objective == "accuracy":
            return (int(not e.candidate.exact), speed, e.est_peak, key)
        return (speed, e.est_peak, key)

    def _skip_presumed_over(self) -> None:
        for e in self.pending():
            for f in self.over:
                known = e.estimate.peak_bytes is not None and f.estimate.peak_bytes is not None
                if known and f.candidate.mode == e.candidate.mode and f.est_peak <= e.est_peak:
                    e.status = "not-measured-presumed-over"
                    e.note = (
                        f"estimated peak ≥ that of {f.candidate.key}, which measured over budget"
                    )
                    break

    def plan(self) -> list[_Entry]:
        """The next candidates to measure: unmeasured ones on the front of (pending ∪ accepted)."""
        self._skip_presumed_over()
        pending = self.pending()
        if not pending:
            return []
        if self.rounds == 0:  # the front, then the next fronts until a few are planned
            planned: list[_Entry] = []
            rest = pending
            while rest and len(planned) < MIN_FIRST_ROUND:
                front = self._front(rest)
                for e in front:
                    e.on_front = not planned
                planned += sorted(front, key=self._plan_key)
                rest = [e for e in rest if e not in front]
            return planned
        front = self._front(pending + self.accepted)
        return sorted((e for e in front if e.status == "pending"), key=self._plan_key)

    # -- 3.-4. measure and probe --------------------------------------------------------------
    def limit_reached(self) -> bool:
        return self.max_measured is not None and self.measured >= self.max_measured

    def measure_round(self, planned: list[_Entry]) -> None:
        self.rounds += 1
        fits: list[_Entry] = []
        for i, e in enumerate(planned):
            if self.limit_reached():
                break
            total = self.measured + len(planned) - i
            if self.max_measured is not None:
                total = min(total, self.max_measured)
            c = e.candidate
            verb = "resume measure" if self._cached("measure", c.key) else "measure"
            self._report(f"{verb} {c.key}", self.measured, total)
            m = e.measurement = self._measure("measure", c)
            self.measured += 1
            e.round = self.rounds
            if self._classify(e, m):
                fits.append(e)
        for e in fits:
            self._judge_accuracy(e)

    def _classify(self, e: _Entry, m: Measurement) -> bool:
        """Set e's status from a measurement; True when it fits budget·(1 − margin)."""
        if m.status == "oom":
            e.status, e.note = "oom", "out of memory"
            self.over.append(e)
        elif m.status != "ok" or m.peak_bytes is None:
            e.status = "error"
            e.note = str(m.detail.get("error") or f"status {m.status!r} without a peak")
        elif m.peak_bytes > self.limit:
            e.status = "over-budget"
            e.note = (
                f"peak {format_bytes(m.peak_bytes)} > {format_bytes(self.limit)} "
                f"(budget {format_bytes(self.budget)} − {self.margin:.0%})"
            )
            self.over.append(e)
        else:
            return True
        return False

    def _judge_accuracy(self, e: _Entry) -> None:
        c = e.candidate
        if not c.exact and self.probe_fn is not None:
            pkey = _probe_key(c)
            if pkey not in self.probes:
                verb = "resume probe" if self._cached("probe", pkey) else "probe"
                self._report(f"{verb} {c.key}", self.measured, self.measured)
                p, error = self._call("probe", pkey, self.probe_fn, c, Probe)
                self.probes[pkey] = (p if p is not None else Probe(None, None)), error
            e.probe, error = self.probes[pkey]
            li = e.probe.loss_increase
            if li is None or not math.isfinite(li):
                e.status, e.note = "rejected-accuracy", f"probe gave no loss change {error}".strip()
                return
            if li > self.max_loss:
                e.status = "rejected-accuracy"
                e.note = f"loss {li:+.2%} vs baseline > tolerance {self.max_loss:+.2%}"
                return
        elif not c.exact:
            e.note = "accuracy not probed"
        e.status = "feasible"
        self.accepted.append(e)

    # -- 5.-6. choose and verify --------------------------------------------------------------
    def choice_key(self, e: _Entry) -> tuple:
        m = e.measurement
        tps = -m.tokens_per_second if m.tokens_per_second is not None else math.inf
        acc = math.inf if e.accuracy is None else e.accuracy
        if self.objective == "memory":
            return (m.peak_bytes, tps, acc, e.candidate.key)
        if self.objective == "accuracy":
            return (acc, tps, m.peak_bytes, e.candidate.key)
        # no measured time (an estimate-only backend): the planning's speed proxy decides
        proxy = e.cost if m.tokens_per_second is None else ()
        return (tps, proxy, m.peak_bytes, acc, e.candidate.key)

    def verify(self, e: _Entry) -> bool:
        """Re-measure `e` in a fresh run; on failure drop it from the accepted and say why."""
        c = e.candidate
        verb = "resume verify" if self._cached("verify", c.key) else "verify"
        self._report(f"{verb} {c.key}", self.measured, self.measured)
        v = e.verification = self._measure("verify", c)
        if v.status == "ok" and v.peak_bytes is not None and v.peak_bytes <= self.limit:
            e.status = "chosen"
            return True
        self.accepted.remove(e)
        probe_note = e.note
        self._classify(e, v)
        e.status, e.note = (
            "verification-failed",
            f"verification run: {e.note}" + (f"; {probe_note}" if probe_note else ""),
        )
        return False

    # -- results ------------------------------------------------------------------------------
    def refine_floors(self) -> None:
        """Nothing fits: the candidates the estimate answered with a lower bound (their mode's
        params + gradients + optimizer state) and can estimate for real (the estimate's
        ``refinable``/``refine``: the leanest ones, `search.estimator.Estimator`) get their real
        estimate, so that the answer names the smallest configuration. They stay over the
        budget either way (a peak is at least its floor); a failed estimate leaves the floor."""
        refine = getattr(self.estimate_fn, "refine", None)
        refinable = getattr(self.estimate_fn, "refinable", None)
        if refine is None or refinable is None:
            return
        todo = [e for e in self.entries
                if e.estimate.detail.get("lower_bound") and refinable(e.candidate)]  # fmt: skip
        for i, e in enumerate(todo):
            self._report(f"estimate {e.candidate.key}", i, len(todo))
            try:
                est = refine(e.candidate)
            except Exception as exc:  # the floor stands; one broken estimate ends nothing
                est = Measurement(None, None, None, "error",
                                  detail={"error": f"{type(exc).__name__}: {exc}"})  # fmt: skip
            if est.status not in ("ok", "oom"):
                e.note += f"; its real estimate failed ({est.detail.get('error', est.status)})"
                continue
            if self.journal is not None:
                self.journal.record("estimate", e.candidate.key, asdict(est))
            e.estimate = est
            e.cost = cost_rank(e.candidate, est.detail.get("velora_layers"))
            e.note = self._over_budget(est) or e.note
        if todo:
            self._report("estimate done", len(todo), len(todo))

    def row(self, e: _Entry, detail: dict | None = None) -> dict:
        """One candidate as plain data; the measurement's detail fields join it (ours win)."""
        c, est, m, p, v = e.candidate, e.estimate, e.measurement, e.probe, e.verification
        row: dict[str, Any] = {**asdict(c), "key": c.key, "status": e.status, "note": e.note}
        row.update(
            estimate_peak_bytes=est.peak_bytes,
            estimate_step_seconds=est.step_seconds,
            estimate_tokens_per_second=est.tokens_per_second,
            estimate_status=est.status,
            estimate_lower_bound=bool(est.detail.get("lower_bound")),
            cost_rank=list(e.cost),
            on_estimate_front=e.on_front,
            round=e.round,
            peak_bytes=m and m.peak_bytes,
            step_seconds=m and m.step_seconds,
            tokens_per_second=m and m.tokens_per_second,
            measure_status=m and m.status,
            backend=m.backend if m else est.backend,
            loss=p and p.loss,
            loss_increase=e.loss_increase,
            grad_cosine_min=p and p.grad_cosine_min,
            grad_cosine_mean=p and p.grad_cosine_mean,
            verify_peak_bytes=v and v.peak_bytes,
            verify_step_seconds=v and v.step_seconds,
            verify_tokens_per_second=v and v.tokens_per_second,
            verify_status=v and v.status,
        )
        if detail is None:
            detail = m.detail if m else {}
        for k, value in detail.items():
            row.setdefault(k, value)  # backend row fields (activation_bytes, …)
        return row

    def recommendation(self, e: _Entry, fallbacks: list[_Entry]) -> dict:
        v = e.verification
        rec = self.row(e, detail={**e.measurement.detail, **v.detail})  # the fresh run's fields win
        rec.update(
            search_peak_bytes=e.measurement.peak_bytes,
            search_tokens_per_second=e.measurement.tokens_per_second,
            peak_bytes=v.peak_bytes,
            step_seconds=v.step_seconds,
            tokens_per_second=v.tokens_per_second,
            backend=v.backend or rec["backend"],
            budget_bytes=self.budget,
            limit_bytes=self.limit,
            margin=self.margin,
            objective=self.objective,
            status="ok",
        )
        won = {
            "speed": "the highest measured throughput",
            "memory": "the lowest measured peak",
            "accuracy": "the smallest loss change vs the uncompressed baseline",
        }[self.objective]
        n = sum(x.status in ("feasible", "chosen") for x in self.entries)
        tps = "" if v.tokens_per_second is None else f", {v.tokens_per_second:,.0f} tokens/s"
        reason = (
            f"{e.candidate.key} has {won} of the {n} measured configurations within "
            f"{format_bytes(self.limit)} (budget {format_bytes(self.budget)} − {self.margin:.0%})"
            f"{' and the loss tolerance' if self.probe_fn is not None else ''}; "
            f"its verification run peaked at {format_bytes(v.peak_bytes)}{tps}"
        )
        if fallbacks:
            reason += f" ({', '.join(f.candidate.key for f in fallbacks)} failed verification)"
        if e.note:
            reason += f"; {e.note}"
        rec["reason"] = reason
        return rec

    def smallest(self) -> dict | None:
        measured = [
            e for e in self.entries if e.measurement and e.measurement.peak_bytes is not None
        ]
        measured = [e for e in measured if e.measurement.status == "ok"]
        if measured:
            e = min(measured, key=lambda x: (x.measurement.peak_bytes, x.candidate.key))
            return {
                **self.row(e),
                "peak_source": "measured",
                "smallest_peak_bytes": e.measurement.peak_bytes,
                "static_bytes": _static_bytes(e.measurement.detail),
            }
        estimated = [
            e
            for e in self.entries
            if e.estimate.peak_bytes is not None and not e.estimate.detail.get("lower_bound")
        ]
        if estimated:
            e = min(estimated, key=lambda x: (x.est_peak, x.candidate.key))
            return {
                **self.row(e),
                "peak_source": "estimate",
                "smallest_peak_bytes": e.estimate.peak_bytes,
                "static_bytes": _static_bytes(e.estimate.detail),
            }
        return None

    def nothing_fits(self, smallest: dict | None) -> str:
        if not self.entries:
            return "no candidates to try"
        reason = (
            f"no configuration fits {format_bytes(self.limit)} "
            f"(budget {format_bytes(self.budget)} − {self.margin:.0%})"
        )
        if smallest is None:
            reason += "; no candidate could be estimated or measured"
        else:
            what = {"measured": "the smallest measured peak is",
                    "estimate": "nothing was measured, the smallest estimate is"}  # fmt: skip
            peak = format_bytes(smallest["smallest_peak_bytes"])
            reason += f"; {what[smallest['peak_source']]} {peak} ({smallest['key']})"
        counts: dict[str, int] = {}
        for e in self.entries:
            counts[e.status] = counts.get(e.status, 0) + 1
        for status, text in (
            ("rejected-accuracy", f"fit but exceeded the loss tolerance of {self.max_loss:+.1%}"),
            ("verification-failed", "failed their verification run"),
            ("error", "failed to run"),
            ("not-measured-limit", f"were not measured (max_measured={self.max_measured})"),
        ):
            if counts.get(status):
                reason += f"; {counts[status]} {text}"
        return reason


def _check_tune_args(budget_bytes, margin, objective, max_loss_increase, max_measured) -> None:
    errors = []
    if not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes < 1:
        errors.append(f"budget_bytes must be a positive int, got {budget_bytes!r}")
    if not (isinstance(margin, (int, float)) and 0 <= margin < 1):
        errors.append(f"margin must be in [0, 1), got {margin!r}")
    if objective not in OBJECTIVES:
        errors.append(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if not (isinstance(max_loss_increase, (int, float)) and 0 <= max_loss_increase < math.inf):
        errors.append(f"max_loss_increase must be a finite number ≥ 0, got {max_loss_increase!r}")
    if max_measured is not None and (not isinstance(max_measured, int) or max_measured < 1):
        errors.append(f"max_measured must be a positive int or None, got {max_measured!r}")
    if errors:
        raise ValueError("; ".join(errors))


def tune(
    candidates: Iterable[Candidate],
    *,
    estimate: Callable[[Candidate], Measurement],
    measure: Callable[[Candidate], Measurement],
    probe: Callable[[Candidate], Probe] | None,
    budget_bytes: int,
    margin: float = 0.05,
    objective: str = "speed",
    max_loss_increase: float = 0.01,
    max_measured: int | None = None,
    journal: Journal | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> TuneResult:
    """Find the best candidate whose measured peak fits the budget, and verify it (module docstring).

    Args:
        candidates: configurations to consider (duplicates by key are dropped).
        estimate: cheap prediction; its ``detail["velora_layers"]`` feeds `cost_rank`.
        measure: a real measurement on the chosen backend; also used for the verification run.
        probe: accuracy probe (loss_increase relative to the baseline) for candidates that are
            not `Candidate.exact` (VeLoRA, a low-rank optimizer); None turns the accuracy gate
            off (rows say "accuracy not probed").
        budget_bytes: the memory budget, compared with the measured peak.
        margin: headroom kept below the budget: feasible iff peak ≤ budget·(1 − margin).
        objective: "speed" (highest tokens/s), "memory" (lowest peak) or "accuracy" (smallest loss
            increase, clipped at 0, then speed).
        max_loss_increase: tolerance on the probe's relative loss increase (0.01 = +1%).
        max_measured: cap on candidates measured during the search (verification not counted).
        journal: where finished calls are recorded; one from `Journal.load` makes this a resume
            that reuses its estimates, measurements, probes and verifications.
        progress: called as ``progress(message, done, total)`` before each estimate ("estimate
            KEY", done/total counting estimates), once after the last ("estimate done", total,
            total), and before each measurement, probe and verification ("measure KEY", "probe
            KEY", "verify KEY"; done/total count measured candidates); "resume " prefixes a
            message whose result comes from the journal (`velora_cli.report.progress.TuneProgress`).

    Returns:
        TuneResult with one row per candidate, the verified recommendation (None if nothing fits),
        the smallest-memory configuration seen, and the reason.

    Raises:
        ValueError: invalid budget, margin, objective, tolerance or max_measured.
        KeyboardInterrupt: passed through; the journal keeps what finished. Exceptions from
            estimate/measure/probe are caught and recorded on the candidate instead.
    """
    _check_tune_args(budget_bytes, margin, objective, max_loss_increase, max_measured)
    s = _Search(estimate, measure, probe, budget_bytes, margin, objective, max_loss_increase,
                max_measured, journal, progress)  # fmt: skip
    s.estimate_all(candidates)
    chosen, fallbacks = None, []
    while True:
        while not s.limit_reached() and (planned := s.plan()):
            s.measure_round(planned)
        if not s.accepted:
            break
        best = min(s.accepted, key=s.choice_key)
        if s.verify(best):
            chosen = best
            break
        fallbacks.append(best)  # what it dominated may surface: search again before falling back

    for e in s.pending():
        dominated = any(s.dominates(a, e) for a in s.entries if a.status in ("feasible", "chosen"))
        limited = s.limit_reached() and not dominated
        e.status = "not-measured-limit" if limited else "not-measured-dominated"
    if chosen is None:
        s.refine_floors()
    smallest = s.smallest()
    recommendation = s.recommendation(chosen, fallbacks) if chosen is not None else None
    reason = recommendation["reason"] if recommendation else s.nothing_fits(smallest)
    return TuneResult(
        candidates=[s.row(e) for e in s.entries],
        recommendation=recommendation,
        smallest=smallest,
        reason=reason,
        budget_bytes=budget_bytes,
        limit_bytes=s.limit,
        objective=objective,
    )
