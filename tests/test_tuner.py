"""The tuner's search, against fake estimate/measure/probe functions (milliseconds, no torch)."""

import json
import math
import subprocess
import sys
from dataclasses import asdict

import pytest

from velora_cli.search.tuner import (
    Candidate,
    Journal,
    Measurement,
    Probe,
    cost_rank,
    optimizers_for,
    search_space,
    tune,
)

# -- a small world: peak and speed follow from the candidate's settings ----------------------------

WEIGHTS = 1000  # bytes that never change (params, grads, optimizer state)
MICRO_SPEED = {1: 1.0, 2: 1.3, 4: 1.5, 8: 1.6}
LOSS = {"paper": {32: 0.004, 64: 0.001}, "qkv+down": {32: 0.02, 64: 0.008}}


def model_peak(c: Candidate) -> int:
    act = 400 * c.micro_batch_size
    if c.gc is True:
        act //= 4
    elif c.gc:
        act //= 2
    if c.uses_velora:
        act = act * 6 // 10
    return WEIGHTS + act


def model_tps(c: Candidate) -> float:
    tps = 1000 * MICRO_SPEED[c.micro_batch_size]
    tps *= 0.7 if c.gc is True else 0.85 if c.gc else 1.0
    return tps * (0.97 if c.uses_velora else 1.0)


def model_loss(c: Candidate) -> float:
    return LOSS[c.placement][c.num_groups]


class Fake:
    """estimate/measure/probe from functions of the candidate; records every call."""

    def __init__(
        self, peak=model_peak, tps=model_tps, loss=model_loss, *, est_tps=True, est_scale=1.0
    ):
        self.peak, self.tps, self.loss = peak, tps, loss
        self.est_tps, self.est_scale = est_tps, est_scale
        self.calls: list[tuple[str, str]] = []
        self.verify_override: dict[str, Measurement] = {}  # key -> what its 2nd measurement gives

    def count(self, stage: str) -> int:
        return sum(s == stage for s, _ in self.calls)

    def keys(self, stage: str) -> list[str]:
        return [k for s, k in self.calls if s == stage]

    def estimate(self, c: Candidate) -> Measurement:
        self.calls.append(("estimate", c.key))
        tps = self.tps(c) if self.est_tps else None
        return Measurement(int(self.peak(c) * self.est_scale), None, tps, backend="estimate")

    def measure(self, c: Candidate) -> Measurement:
        again = c.key in self.keys("measure")
        self.calls.append(("measure", c.key))
        if again and c.key in self.verify_override:
            return self.verify_override[c.key]
        return Measurement(
            self.peak(c), 0.1, self.tps(c), backend="fake", detail={"activation_bytes": 7}
        )

    def probe(self, c: Candidate) -> Probe:
        self.calls.append(("probe", c.key))
        li = self.loss(c)
        return Probe(
            loss=3.0 * (1 + li), loss_increase=li, grad_cosine_min=0.9, grad_cosine_mean=0.95
        )

    def tune(self, candidates, **kwargs):
        kwargs.setdefault("probe", self.probe)
        return tune(candidates, estimate=self.estimate, measure=self.measure, **kwargs)


def table(rows: dict[Candidate, tuple[int, float]]) -> Fake:
    """A Fake whose estimates and measurements come from {candidate: (peak, tokens/s)}."""
    return Fake(peak=lambda c: rows[c][0], tps=lambda c: rows[c][1], loss=lambda c: 0.0)


def by_key(result) -> dict[str, dict]:
    return {row["key"]: row for row in result.candidates}


def labelled(*names: str) -> list[Candidate]:
    # candidates without VeLoRA that differ only by a label (the optimizer name), never probed
    return [Candidate(optimizer=name) for name in names]


SPACE = dict(
    batch_size=8,
    modes=["full"],
    placements=[None, "paper", "qkv+down"],
    num_groups=[32, 64],
    gc_options=[False, 2, True],
)


# -- Candidate, search_space, cost_rank ----------------------------------------------------------


def test_candidate_key_is_stable_and_readable():
    c = Candidate("full", "paper", 32, gc=2, micro_batch_size=4, grad_accum_steps=2)
    assert c.key == "full|paper|g32|gc=2|mb4x2|adamw"
    assert Candidate().key == "full|none|g-|gc=off|mb1x1|adamw"
    assert Candidate(gc=True).key == Candidate(gc=1).key == "full|none|g-|gc=all|mb1x1|adamw"
    assert Candidate(gc=0) == Candidate(gc=False)
    assert c.batch_size == 8 and c.uses_velora and not Candidate().uses_velora
    assert json.loads(json.dumps(asdict(c)))["gc"] == 2


def test_candidate_reports_all_errors_together():
    with pytest.raises(ValueError) as info:
        Candidate(gc=-1, micro_batch_size=0, num_groups=4)
    message = str(info.value)
    assert (
        "gc must be" in message and "micro_batch_size" in message and "needs a placement" in message
    )


def test_search_space_size_and_no_duplicates():
    space = search_space(**SPACE)
    # (1 without VeLoRA + 2 placements × 2 group counts) × 3 gc × 4 micro-batches (8, 4, 2, 1)
    assert len(space) == (1 + 2 * 2) * 3 * 4
    assert len({c.key for c in space}) == len(space)
    assert all(c.num_groups is None for c in space if c.placement is None)
    assert all(c.num_groups is not None for c in space if c.placement is not None)


def test_search_space_micro_batch_arithmetic():
    space = search_space(
        batch_size=8, modes=["full"], placements=[None], num_groups=[], gc_options=[False]
    )
    assert [(c.micro_batch_size, c.grad_accum_steps) for c in space] == [
        (8, 1),
        (4, 2),
        (2, 4),
        (1, 8),
    ]
    assert all(c.batch_size == 8 for c in space)
    twelve = search_space(
        batch_size=12, modes=["full"], placements=[None], num_groups=[], gc_options=[False]
    )
    assert [c.micro_batch_size for c in twelve] == [
        12,
        4,
        2,
        1,
    ]  # powers of two dividing 12, plus 12
    assert [c.grad_accum_steps for c in twelve] == [1, 3, 6, 12]
    explicit = search_space(
        batch_size=6,
        modes=["full"],
        placements=[None],
        num_groups=[],
        gc_options=[False],
        micro_batches=[3, 3],
    )
    assert [(c.micro_batch_size, c.grad_accum_steps) for c in explicit] == [(3, 2)]


def test_search_space_merges_gc_spellings_and_crosses_modes_and_optimizers():
    space = search_space(
        batch_size=2,
        modes=["full", "lora"],
        placements=[None],
        num_groups=[32],
        gc_options=[True, 1, False, 0, 2],
        optimizers=("adamw", "sgd"),
    )
    assert {c.gc for c in space} == {True, False, 2}
    assert len(space) == 2 * 3 * 2 * 2  # modes × gc × micro (2, 1) × optimizers


def test_search_space_keeps_optimizers_fsdp2_cannot_step_off_fsdp_layouts():
    from velora_cli.measure.train_step import StepSpec

    space = search_space(
        batch_size=2,
        modes=["full"],
        placements=[None],
        num_groups=[32],
        gc_options=[False],
        micro_batches=[2],
        optimizers=("adamw", "adafactor", "galore"),
        layouts=((2, "ddp"), (2, "fsdp"), (2, "fsdp-no-reshard")),
    )
    pairs = {(c.optimizer, c.parallel) for c in space}
    assert pairs == {("adamw", "ddp"), ("adamw", "fsdp"), ("adamw", "fsdp-no-reshard"),
                     ("adafactor", "ddp"), ("galore", "ddp")}  # fmt: skip
    for c in space:  # every candidate left is one StepSpec accepts
        StepSpec(model="llama-tiny", optimizer=c.optimizer, world_size=2, parallel=c.parallel)


def test_search_space_crosses_low_rank_optimizers_with_full_mode_only():
    space = search_space(
        batch_size=2,
        modes=["full", "lora", "qlora"],
        placements=[None, "paper"],
        num_groups=[32],
        gc_options=[False],
        optimizers=("adamw", "galore", "adarankgrad"),
    )
    by_mode = {m: {c.optimizer for c in space if c.mode == m} for m in ("full", "lora", "qlora")}
    assert by_mode == {
        "full": {"adamw", "galore", "adarankgrad"},
        "lora": {"adamw"},
        "qlora": {"adamw"},
    }
    assert len(space) == (3 + 1 + 1) * 2 * 2  # (mode, optimizer) pairs × placements × micro
    assert len({c.key for c in space}) == len(space)
    assert optimizers_for("lora", ["galore", "sgd", "galore"]) == ["sgd"]
    only_lowrank = dict(SPACE, modes=["lora"], optimizers=("galore",))
    assert search_space(**only_lowrank) == []  # nothing valid: the caller says why
    assert [c.exact for c in labelled("adamw", "sgd", "galore", "adarankgrad")] == [
        True,
        True,
        False,
        False,
    ]


def test_low_rank_candidates_are_probed_even_without_velora():
    adamw = Candidate("full", None, None, False, 4, 1)  # est 2600: over the budget
    galore = Candidate("full", None, None, False, 4, 1, "galore")  # smaller state, +0.5%
    adarank = Candidate("full", None, None, False, 4, 1, "adarankgrad")  # +3%: rejected
    peaks = {adamw: 2600, galore: 1900, adarank: 1800}
    losses = {galore: 0.005, adarank: 0.03}
    fake = Fake(peak=lambda c: peaks[c], tps=lambda c: 1000.0, loss=lambda c: losses[c])
    result = fake.tune([adamw, galore, adarank], budget_bytes=2100, objective="memory")
    rows = by_key(result)
    assert sorted(fake.keys("probe")) == sorted([galore.key, adarank.key])
    assert rows[adarank.key]["status"] == "rejected-accuracy"
    assert rows[adarank.key]["loss_increase"] == 0.03
    assert result.recommendation["key"] == galore.key
    assert result.recommendation["loss_increase"] == 0.005
    # cost_rank: projecting costs a little, so AdamW goes first when nothing else differs
    assert cost_rank(adamw) < cost_rank(galore) == cost_rank(adarank)
    # no probe function: low-rank candidates are accepted but say so
    result = fake.tune([galore], budget_bytes=2100, probe=None)
    assert "accuracy not probed" in result.recommendation["reason"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(batch_size=6, micro_batches=[4]), r"do not divide batch size 6; use \[1, 2, 3, 6\]"),
        (dict(batch_size=0), "batch_size must be a positive int"),
        (dict(batch_size=4, modes=[]), "empty search axis: modes"),
    ],
)
def test_search_space_errors(kwargs, message):
    args = dict(modes=["full"], placements=[None], num_groups=[], gc_options=[False]) | kwargs
    with pytest.raises(ValueError, match=message):
        search_space(**args)


def test_cost_rank_prefers_no_gc_then_sparser_gc_then_bigger_micro_then_fewer_velora_layers():
    ranks = [
        cost_rank(Candidate(micro_batch_size=4)),
        cost_rank(Candidate(micro_batch_size=2)),
        cost_rank(Candidate("full", "paper", 32, micro_batch_size=2)),
        cost_rank(Candidate("full", "paper", 32, micro_batch_size=2), velora_layers=12),
        cost_rank(Candidate("qlora", micro_batch_size=4)),  # dequantizes: after full/lora
        cost_rank(Candidate(gc=4, micro_batch_size=8)),
        cost_rank(Candidate(gc=2, micro_batch_size=8)),
        cost_rank(Candidate(gc=True, micro_batch_size=8)),
    ]
    assert ranks == sorted(ranks)
    assert len(set(ranks)) == len(ranks)


def test_tuner_module_does_not_import_torch():
    code = (
        "import sys, velora_cli.search.tuner, velora_cli.budget; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- search -------------------------------------------------------------------------------------


def test_feasibility_filter_drops_estimates_over_budget_and_never_measures_them():
    fake = Fake()
    space = search_space(**SPACE)
    result = fake.tune(space, budget_bytes=2000)  # no-gc micro-batch 4 and 8 estimate above 2000
    rows = by_key(result)
    over = [c for c in space if model_peak(c) > 2000]
    assert over
    for c in over:
        assert rows[c.key]["status"] == "infeasible-estimate"
        assert "budget" in rows[c.key]["note"]
        assert c.key not in fake.keys("measure")
    assert fake.count("estimate") == len(space)
    assert result.recommendation["peak_bytes"] <= 2000 * 0.95


def test_pareto_front_is_measured_and_dominated_candidates_are_not():
    a, b, c, d, e = labelled("a", "b", "c", "d", "e")
    fake = table({a: (100, 10.0), b: (200, 20.0), c: (150, 5.0), d: (300, 15.0), e: (100, 10.0)})
    result = fake.tune([a, b, c, d, e], budget_bytes=10_000)
    rows = by_key(result)
    assert {k for k, r in rows.items() if r["on_estimate_front"]} == {a.key, b.key, e.key}
    assert set(fake.keys("measure")) == {a.key, b.key, e.key}  # equal points are both kept
    assert rows[c.key]["status"] == rows[d.key]["status"] == "not-measured-dominated"
    assert result.recommendation["key"] == b.key


def test_first_round_tops_up_a_small_front_with_the_next_fronts():
    a, b, c, d = labelled("a", "b", "c", "d")
    fake = table({a: (100, 30.0), b: (200, 20.0), c: (300, 10.0), d: (400, 5.0)})
    result = fake.tune([a, b, c, d], budget_bytes=10_000)
    rows = by_key(result)
    assert [k for k, r in rows.items() if r["on_estimate_front"]] == [a.key]
    assert fake.keys("measure")[:3] == [a.key, b.key, c.key]  # MIN_FIRST_ROUND, front first
    assert rows[d.key]["status"] == "not-measured-dominated"
    assert result.recommendation["key"] == a.key


def test_candidates_surface_when_what_dominated_them_fails():
    x1, x2, x3, y = labelled("x1", "x2", "x3", "y")
    fake = table({x1: (100, 30.0), x2: (100, 30.0), x3: (100, 30.0), y: (200, 20.0)})
    measure_ok = fake.measure

    def measure(c):
        if c.optimizer.startswith("x"):
            fake.calls.append(("measure", c.key))
            return Measurement(None, None, None, status="error", detail={"error": "kernel crashed"})
        return measure_ok(c)

    result = tune(
        [x1, x2, x3, y], estimate=fake.estimate, measure=measure, probe=None, budget_bytes=10_000
    )
    rows = by_key(result)
    assert rows[x1.key]["status"] == "error" and rows[x1.key]["note"] == "kernel crashed"
    assert rows[y.key]["round"] == 2
    assert result.recommendation["key"] == y.key


def test_pareto_without_estimated_times_uses_cost_rank():
    a = Candidate(micro_batch_size=1)  # cost (0, 0, -1, 0, 0)
    b = Candidate(gc=True, micro_batch_size=1)  # cost (1, 0, -1, 0, 0): slower, smaller
    c = Candidate(
        gc=2, micro_batch_size=1
    )  # cost (0.5, 0, -1, 0, 0): slower than a and bigger: dominated
    d = Candidate(micro_batch_size=2, grad_accum_steps=1)  # cost (0, 0, -2, 0, 0): fastest, biggest
    peaks = {a: 300, b: 200, c: 350, d: 500}
    fake = Fake(peak=lambda x: peaks[x], tps=lambda x: 100.0 / cost_rank(x)[2] ** 2, est_tps=False)
    result = fake.tune([a, b, c, d], budget_bytes=10_000)
    rows = by_key(result)
    assert {k for k, r in rows.items() if r["on_estimate_front"]} == {a.key, b.key, d.key}
    assert c.key not in fake.keys("measure")
    assert rows[c.key]["status"] == "not-measured-dominated"
    assert rows[a.key]["estimate_tokens_per_second"] is None
    assert rows[b.key]["cost_rank"] == [1.0, 0, -1, 0, 0]


FAST = Candidate("full", None, None, False, 4, 1)  # est 2600, 1500 tok/s
VELORA_FAST = Candidate("full", "paper", 32, False, 4, 1)  # 1960, 1455, loss +0.4%
VELORA_ACC = Candidate("full", "paper", 64, False, 4, 1)  # 1960, 1455, loss +0.1%
SMALL = Candidate("full", None, None, True, 4, 1)  # 1400, 1050
SLOW_VELORA = Candidate("full", "paper", 64, 2, 4, 1)  # 1480, 1236.75, loss +0.1%


@pytest.mark.parametrize(
    ("objective", "budget", "candidates", "expected"),
    [
        ("speed", 3000, [FAST, VELORA_FAST, SMALL], FAST),
        ("memory", 3000, [FAST, VELORA_FAST, SMALL], SMALL),
        ("accuracy", 3000, [FAST, VELORA_FAST, SMALL], FAST),  # loss 0, then the faster
        ("speed", 2100, [FAST, VELORA_FAST, SMALL], VELORA_FAST),  # budget forces VeLoRA or gc
        ("accuracy", 2100, [FAST, VELORA_FAST, SMALL], SMALL),  # the only exact one that fits
        ("accuracy", 2100, [VELORA_FAST, VELORA_ACC], VELORA_ACC),  # lower loss increase wins
        (
            "speed",
            2100,
            [VELORA_FAST, VELORA_ACC],
            VELORA_ACC,
        ),  # equal speed and peak: accuracy decides
        ("memory", 2100, [VELORA_FAST, VELORA_ACC, SLOW_VELORA], SLOW_VELORA),
    ],
)
def test_objectives(objective, budget, candidates, expected):
    fake = Fake()
    result = fake.tune(candidates, budget_bytes=budget, objective=objective)
    assert result.recommendation["key"] == expected.key, result.reason
    assert result.recommendation["objective"] == objective
    assert by_key(result)[expected.key]["status"] == "chosen"


def test_accuracy_objective_treats_an_improvement_over_baseline_as_noise():
    velora = Candidate("full", "paper", 32, micro_batch_size=2)  # faster than SMALL, loss -0.3%
    fake = Fake(loss=lambda c: -0.003)
    result = fake.tune([velora, SMALL], budget_bytes=1800, objective="accuracy")
    assert result.recommendation["key"] == velora.key  # both count as 0, the faster wins
    assert result.recommendation["loss_increase"] == -0.003


@pytest.mark.parametrize("objective", ["speed", "memory", "accuracy"])
@pytest.mark.parametrize("budget", [1150, 1300, 1500, 1800, 2200, 3000, 5000])
def test_choice_matches_brute_force_when_estimates_are_exact(objective, budget):
    space = search_space(**SPACE)
    fake = Fake()
    result = fake.tune(space, budget_bytes=budget, objective=objective)
    limit = budget * 0.95
    ok = [
        c for c in space if model_peak(c) <= limit and (not c.uses_velora or model_loss(c) <= 0.01)
    ]

    def key(c):
        acc = max(model_loss(c), 0.0) if c.uses_velora else 0.0
        return {
            "speed": (-model_tps(c), model_peak(c), acc, c.key),
            "memory": (model_peak(c), -model_tps(c), acc, c.key),
            "accuracy": (acc, -model_tps(c), model_peak(c), c.key),
        }[objective]

    if not ok:
        assert result.recommendation is None
        return
    assert result.recommendation["key"] == min(ok, key=key).key
    assert len(set(fake.keys("measure"))) < len(space)  # the front saved work


def test_margin_rejects_a_peak_at_97_percent_of_the_budget():
    only = Candidate()
    fake = Fake(peak=lambda c: 970, tps=lambda c: 1.0)
    result = fake.tune([only], budget_bytes=1000, margin=0.05)
    assert result.recommendation is None
    row = by_key(result)[only.key]
    assert row["status"] == "over-budget" and "950 B" in row["note"] and "5%" in row["note"]
    assert result.limit_bytes == 950

    fake = Fake(peak=lambda c: 970, tps=lambda c: 1.0)
    result = fake.tune([only], budget_bytes=1000, margin=0.02)
    assert (
        result.recommendation["peak_bytes"] == 970 and result.recommendation["limit_bytes"] == 980
    )


def test_nothing_fits_reports_the_smallest_measured_configuration():
    space = search_space(**SPACE)
    fake = Fake(est_scale=0.5)  # estimates say everything fits; the real peaks do not
    result = fake.tune(space, budget_bytes=1100)
    assert result.recommendation is None
    assert result.smallest["peak_source"] == "measured"
    measured = set(fake.keys("measure"))
    best = min((c for c in space if c.key in measured), key=lambda c: (model_peak(c), c.key))
    assert result.smallest["key"] == best.key
    assert result.smallest["smallest_peak_bytes"] == model_peak(best)
    assert "no configuration fits" in result.reason and best.key in result.reason
    # a smaller-estimated candidate of the same mode measured over: the rest is presumed over
    statuses = {r["status"] for r in result.candidates}
    assert "not-measured-presumed-over" in statuses
    assert len(measured) < len(space)


def test_nothing_fits_by_estimate_measures_nothing_and_flags_the_estimate():
    fake = Fake()
    space = search_space(**SPACE)
    result = fake.tune(space, budget_bytes=500)
    assert fake.count("measure") == 0
    assert result.recommendation is None
    assert result.smallest["peak_source"] == "estimate"
    assert result.smallest["smallest_peak_bytes"] == min(model_peak(c) for c in space)
    assert result.smallest["peak_bytes"] is None  # an estimate is never reported as measured
    assert "nothing was measured" in result.reason


def test_verification_failure_falls_back_to_the_next_candidate():
    fake = Fake()
    over = Measurement(2000, 0.1, 1500.0, backend="fake")  # the fresh run peaks higher
    fake.verify_override[VELORA_FAST.key] = over
    result = fake.tune([VELORA_FAST, SMALL, SLOW_VELORA], budget_bytes=2100)
    rows = by_key(result)
    assert rows[VELORA_FAST.key]["status"] == "verification-failed"
    assert rows[VELORA_FAST.key]["note"].startswith("verification run: peak")
    assert rows[VELORA_FAST.key]["verify_peak_bytes"] == 2000
    rec = result.recommendation
    assert rec["key"] == SLOW_VELORA.key  # next fastest
    assert rec["status"] == "ok" and rec["peak_bytes"] == model_peak(SLOW_VELORA)
    assert f"{VELORA_FAST.key} failed verification" in rec["reason"]
    assert fake.keys("measure").count(SLOW_VELORA.key) == 2  # searched, then verified


def test_verification_oom_or_crash_also_falls_back():
    fake = Fake()
    fake.verify_override[VELORA_FAST.key] = Measurement(None, None, None, status="oom")
    fake.verify_override[SLOW_VELORA.key] = Measurement(None, None, None, status="error")
    result = fake.tune([VELORA_FAST, SMALL, SLOW_VELORA], budget_bytes=2100)
    assert result.recommendation["key"] == SMALL.key
    assert by_key(result)[SLOW_VELORA.key]["status"] == "verification-failed"


def test_accuracy_rejection():
    bad = Candidate("full", "qkv+down", 32, False, 4, 1)  # fast, loss +2%
    fake = Fake()
    result = fake.tune([bad, SMALL, FAST], budget_bytes=2100, max_loss_increase=0.01)
    row = by_key(result)[bad.key]
    assert row["status"] == "rejected-accuracy" and "+2.00%" in row["note"]
    assert row["loss_increase"] == 0.02 and row["grad_cosine_min"] == 0.9
    assert result.recommendation["key"] == SMALL.key
    assert fake.keys("probe") == [bad.key]  # candidates without VeLoRA are never probed
    assert by_key(result)[SMALL.key]["loss_increase"] == 0.0
    # a looser tolerance accepts it
    assert (
        Fake().tune([bad, SMALL], budget_bytes=2100, max_loss_increase=0.03).recommendation["key"]
        == bad.key
    )


def test_candidates_differing_only_in_gc_share_one_probe():
    a = Candidate("full", "paper", 32, False, 2, 4)
    b = Candidate("full", "paper", 32, 2, 2, 4)
    c = Candidate("full", "paper", 32, True, 2, 4)
    fake = Fake(tps=lambda x: {a: 3.0, b: 2.0, c: 1.0}[x])
    fake.tune([a, b, c], budget_bytes=10_000)
    assert fake.count("probe") == 1


def test_probe_failures_reject_and_no_probe_disables_the_gate():
    velora = Candidate("full", "paper", 32, micro_batch_size=4)

    def broken(c):
        raise RuntimeError("nan loss")

    result = Fake().tune([velora, SMALL], budget_bytes=2100, probe=broken)
    row = by_key(result)[velora.key]
    assert row["status"] == "rejected-accuracy" and "RuntimeError: nan loss" in row["note"]
    assert result.recommendation["key"] == SMALL.key

    result = Fake().tune([velora, SMALL], budget_bytes=2100, probe=None)
    assert result.recommendation["key"] == velora.key
    assert result.recommendation["loss_increase"] is None
    assert "accuracy not probed" in result.recommendation["reason"]


def test_never_recommends_an_unmeasured_candidate():
    fake = Fake()

    def crashing(c):
        fake.calls.append(("measure", c.key))
        raise RuntimeError("CUDA error")

    space = search_space(**SPACE)
    result = tune(
        space, estimate=fake.estimate, measure=crashing, probe=fake.probe, budget_bytes=3000
    )
    assert result.recommendation is None
    assert all(r["peak_bytes"] is None for r in result.candidates)
    assert any("RuntimeError: CUDA error" in r["note"] for r in result.candidates)
    assert result.smallest["peak_source"] == "estimate"

    # the fastest errors out; the recommendation is another one, measured and verified
    fake = Fake()
    measure_ok = fake.measure

    def measure(c):
        if c == FAST:
            fake.calls.append(("measure", c.key))
            return Measurement(None, None, None, status="error")
        return measure_ok(c)

    result = tune(
        [FAST, SMALL], estimate=fake.estimate, measure=measure, probe=None, budget_bytes=3000
    )
    assert result.recommendation["key"] == SMALL.key
    assert fake.keys("measure") == [FAST.key, SMALL.key, SMALL.key]
    for rec_or_row in (result.recommendation, *result.candidates):
        if rec_or_row["status"] in ("ok", "chosen", "feasible"):
            assert rec_or_row["peak_bytes"] is not None


def test_max_measured_caps_the_search():
    space = search_space(**SPACE)
    fake = Fake(est_tps=False)
    result = fake.tune(space, budget_bytes=5000, max_measured=2)
    statuses = [r["status"] for r in result.candidates]
    assert len(set(fake.keys("measure"))) == 2
    assert "not-measured-limit" in statuses
    assert result.recommendation is not None


def test_progress_is_reported_per_measured_candidate():
    events = []
    fake = Fake()
    fake.tune(search_space(**SPACE), budget_bytes=2000, progress=lambda *e: events.append(e))
    measures = [e for e in events if e[0].startswith("measure ")]
    assert len(measures) == len(set(fake.keys("measure")))
    assert [done for _, done, _ in measures] == list(range(len(measures)))
    assert all(done < total for _, done, total in measures)
    assert events[-1][0].startswith("verify ")


def test_result_is_json_serializable():
    result = Fake().tune(search_space(**SPACE), budget_bytes=2000)
    doc = json.loads(json.dumps(asdict(result)))
    assert doc["recommendation"]["budget_bytes"] == 2000
    assert doc["recommendation"]["activation_bytes"] == 7  # backend row fields come through
    assert {"micro_batch_size", "grad_accum_steps", "mode", "loss_increase"} <= set(
        doc["candidates"][0]
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(budget_bytes=0), "budget_bytes"),
        (dict(margin=1.0), "margin"),
        (dict(objective="fast"), "speed, memory, accuracy"),
        (dict(max_loss_increase=math.nan), "max_loss_increase"),
        (dict(max_measured=0), "max_measured"),
    ],
)
def test_tune_argument_errors(kwargs, message):
    args = dict(budget_bytes=1000) | kwargs
    with pytest.raises(ValueError, match=message):
        Fake().tune([Candidate()], **args)


# -- journal and resume ---------------------------------------------------------------------------


def test_interrupted_tune_resumes_without_redoing_finished_candidates(tmp_path):
    space = search_space(**SPACE)
    reference = Fake()
    expected = reference.tune(space, budget_bytes=2000)
    assert reference.count("measure") >= 4

    path = tmp_path / "tune.jsonl"
    first = Fake()
    measure_ok = first.measure

    def interrupted(c):
        if first.count("measure") == 2:
            raise KeyboardInterrupt  # the 3rd call
        return measure_ok(c)

    with pytest.raises(KeyboardInterrupt):
        tune(space, estimate=first.estimate, measure=interrupted, probe=first.probe, budget_bytes=2000,
             journal=Journal(path, context={"model": "tiny"}))  # fmt: skip
    finished = first.keys("measure")
    assert len(finished) == 2

    second = Fake()
    journal = Journal.load(path)
    assert journal.context == {"model": "tiny"}
    resumed = second.tune(space, budget_bytes=2000, journal=journal)
    assert second.count("estimate") == 0  # estimates came from the journal
    assert second.count("measure") == reference.count("measure") - 2
    for key in finished:  # measured once in the first run; at most its verification remains
        assert second.keys("measure").count(key) == reference.keys("measure").count(key) - 1
    assert resumed.recommendation == expected.recommendation
    assert resumed.candidates == expected.candidates

    # a finished journal replays without calling anything; its counter starts at 1, as the
    # progress names the stage of a resumed measurement (issue 28: it started at [0/4])
    from velora_cli.report.progress import TuneProgress

    third = Fake()
    lines: list[str] = []
    progress = TuneProgress(echo=lines.append, terminal=False, heartbeat=0)
    again = third.tune(space, budget_bytes=2000, journal=Journal.load(path), progress=progress)
    measured = [line for line in lines if " measure " in line]
    assert measured and measured[0].startswith("[1/") and "resume measure" in measured[0]
    assert third.calls == []
    assert again.recommendation == expected.recommendation


def test_journal_tolerates_a_truncated_last_line(tmp_path):
    path = tmp_path / "j.jsonl"
    journal = Journal(path)
    journal.record("measure", "a", asdict(Measurement(1, 0.1, 2.0)))
    journal.record("probe", "b", asdict(Probe(3.0, 0.001)))
    with open(path, "a") as f:
        f.write('{"v": 1, "stage": "measure", "key": "c", "res')  # crash mid-write

    loaded = Journal.load(path)
    assert len(loaded) == 2
    assert loaded.get("measure", "a")["peak_bytes"] == 1 and loaded.get("measure", "c") is None
    assert path.read_text().endswith("}\n")  # the partial line was cut
    loaded.record("measure", "c", asdict(Measurement(5, 0.1, 2.0)))
    assert len(Journal.load(path)) == 3


def test_journal_keeps_a_whole_last_record_without_newline_and_skips_corrupt_middle_lines(
    tmp_path,
):
    path = tmp_path / "j.jsonl"
    Journal(path).record("measure", "a", asdict(Measurement(1, 0.1, 2.0)))
    path.write_text(path.read_text().rstrip("\n"))
    loaded = Journal.load(path)
    assert loaded.get("measure", "a") is not None
    loaded.record("measure", "b", asdict(Measurement(2, 0.1, 2.0)))
    assert len(Journal.load(path)) == 2

    header, *records = path.read_text().splitlines(keepends=True)
    path.write_text(header + "not json\n" + "".join(records))  # a damaged line in the middle
    loaded = Journal.load(path)
    assert loaded.skipped == [2] and loaded.context is None  # Journal(path) has no context
    assert len(loaded) == 2 and loaded.get("measure", "b")["peak_bytes"] == 2  # the rest kept
    with pytest.raises(FileNotFoundError):
        Journal.load(tmp_path / "missing.jsonl")


def test_resume_after_a_truncated_journal(tmp_path):
    path = tmp_path / "tune.jsonl"
    space = search_space(**SPACE)
    expected = Fake().tune(space, budget_bytes=2000, journal=Journal(path))
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:10])  # the verification record was cut
    fake = Fake()
    result = fake.tune(space, budget_bytes=2000, journal=Journal.load(path))
    assert fake.keys("measure") == [expected.recommendation["key"]]  # only the verification again
    assert result.recommendation == expected.recommendation


def test_empty_candidates_and_failed_estimates():
    result = Fake().tune([], budget_bytes=1000)
    assert result.recommendation is None and result.smallest is None
    assert result.reason == "no candidates to try"

    fake = Fake()

    def estimate(c):
        raise NotImplementedError("no estimate for this mode")

    result = tune([SMALL], estimate=estimate, measure=fake.measure, probe=None, budget_bytes=2000)
    row = by_key(result)[SMALL.key]
    assert row["estimate_status"] == "error" and row["estimate_peak_bytes"] is None
    assert result.recommendation["key"] == SMALL.key  # still measured, then verified
