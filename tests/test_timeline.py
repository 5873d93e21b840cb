"""The saved memory timeline: made from the tracker's allocation trace, checked against it."""

import json
import random

import pytest

from velora_cli.estimate.backend import EstimateBackend
from velora_cli.measure import timeline
from velora_cli.measure.cpu import CpuBackend
from velora_cli.measure.tracker import AllocationTrace
from velora_cli.measure.train_step import StepSpec, Strategy

STRATEGIES = [
    Strategy(),
    Strategy(gc=True),
    Strategy(placement="paper", num_groups=4),
    Strategy(placement="qkv+down", num_groups=4, gc=True),
]


@pytest.fixture
def traced(monkeypatch):
    """measure(backend, spec) -> (row, the trace of its tracked step), tracked_step unchanged."""
    from velora_cli.measure import observe

    traces = []
    original = observe.tracked_step

    def spy(prepared, **kwargs):
        row, trace = original(prepared, **kwargs)
        traces.append(trace)
        return row, trace

    monkeypatch.setattr(observe, "tracked_step", spy)

    def measure(backend, spec):
        row = backend.measure(spec)
        assert row["status"] == "ok", row
        return row, traces[-1]

    return measure


def _check_against_trace(row, trace, tl):
    data = timeline.decode(tl)
    live = trace.live_bytes()  # the trace's own totals: the independent reference
    assert all(data["totals"][k] == live[x] for k, x in enumerate(data["x"]))
    assert all(v >= 0 for values in data["series"].values() for v in values)
    peak = tl["peak"]
    assert peak["bytes"] == row["peak_bytes"] == max(live) == data["totals"][peak["point"]]
    assert data["x"][peak["point"]] == peak["event"] == live.index(max(live))
    at_peak = {c: data["series"][c][peak["point"]] for c in tl["categories"]}
    assert at_peak == peak["breakdown"] == row["peak_breakdown"]
    assert tl["points"] == len(data["x"]) <= timeline.DEFAULT_POINTS


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.label)
def test_estimate_timeline_integral_matches_the_trace_and_the_row(mha_dir, strategy, traced):
    spec = StepSpec(model=mha_dir, batch_size=2, seq_len=32, strategy=strategy)
    row, trace = traced(EstimateBackend(), spec)
    _check_against_trace(row, trace, row["timeline"])
    json.dumps(row["timeline"])  # plain JSON data


def test_cpu_backend_rows_carry_a_timeline_too(mha_dir, traced):
    spec = StepSpec(model=mha_dir, batch_size=2, seq_len=32, strategy=Strategy(gc=True))
    row, trace = traced(CpuBackend(warmup=1, steps=1), spec)
    _check_against_trace(row, trace, row["timeline"])


def test_downsampling_keeps_the_peak_exactly_and_the_envelope(mha_dir, traced):
    spec = StepSpec(model=mha_dir, batch_size=2, seq_len=32)
    row, trace = traced(EstimateBackend(), spec)
    live = trace.live_bytes()
    for max_points in (4, 10, 61, 200):
        tl = timeline.compact(trace, max_points=max_points)
        data = timeline.decode(tl)
        assert len(data["x"]) <= max_points < len(live)
        assert tl["peak"]["bytes"] == row["peak_bytes"] == max(data["totals"])
        assert all(data["totals"][k] == live[x] for k, x in enumerate(data["x"]))
        width = tl["bucket_events"]
        for start in range(0, len(live), width):  # each bucket's extremes are drawn
            chunk = live[start : start + width]
            kept = [
                t
                for x, t in zip(data["x"], data["totals"], strict=True)
                if start <= x < start + width
            ]
            assert max(kept) == max(chunk) and min(kept) == min(chunk)


def test_phases_tile_the_step_and_name_the_peak(mha_dir, traced):
    spec = StepSpec(model=mha_dir, batch_size=4, seq_len=32, grad_accum_steps=2)
    row, trace = traced(CpuBackend(warmup=1, steps=1), spec)
    tl = row["timeline"]
    names = [name for name, _, _ in tl["phases"]]
    assert names == ["forward 1", "backward 1", "forward 2", "backward 2", "optimizer", "zero_grad"]
    assert tl["phases"][0][1] == 0 and tl["phases"][-1][2] == tl["events"] == len(trace.events)
    for (_, _, end), (_, start, _) in zip(tl["phases"], tl["phases"][1:], strict=False):
        assert end == start
    name, start, end = next(p for p in tl["phases"] if p[0] == tl["peak"]["phase"])
    assert start < tl["peak"]["event"] <= end
    assert tl["micro_batches"] == {"traced": 2, "step": 2}


def test_estimate_says_how_many_micro_batches_it_traced(mha_dir):
    spec = StepSpec(model=mha_dir, batch_size=4, seq_len=32, grad_accum_steps=4)
    row = EstimateBackend().measure(spec)
    assert row["timeline"]["micro_batches"] == {"traced": 2, "step": 4}


def _synthetic_trace(events: int, seed: int = 0) -> AllocationTrace:
    """A long random trace: params live throughout, activations and temporaries come and go."""
    rng = random.Random(seed)
    initial = ((0, 4096 * 100), (1, 512))
    categories = {0: "params", 1: "buffers"}
    live, out, sid = [], [], 2
    for i in range(events):
        if live and rng.random() < 0.45:
            victim = live.pop(rng.randrange(len(live)))
            out.append((i, victim[0], -victim[1]))
        else:
            nbytes = rng.randrange(1, 10**6)
            categories[sid] = rng.choice(["activations", "temporaries", "grads"])
            live.append((sid, nbytes))
            out.append((i, sid, nbytes))
            sid += 1
    phases = (("forward_backward", 0, events // 2), ("forward", 0, events // 4),
              ("backward", events // 4, events // 2), ("optimizer", events // 2, events))  # fmt: skip
    return AllocationTrace(initial, tuple(out), categories, phases, round_to=512, ops=events)


def test_a_long_step_stays_small_in_the_document():
    trace = _synthetic_trace(50_000)
    tl = timeline.compact(trace)
    live = trace.live_bytes()
    data = timeline.decode(tl)
    assert tl["peak"]["bytes"] == max(live) and max(data["totals"]) == max(live)
    assert tl["points"] <= timeline.DEFAULT_POINTS
    assert len(json.dumps(tl)) < 16_000  # a few kilobytes a row, whatever the model's size
    full = timeline.compact(trace, max_points=timeline.MAX_POINTS)
    assert full["points"] <= timeline.MAX_POINTS and full["peak"]["bytes"] == max(live)


def test_encoding_round_trips():
    rng = random.Random(1)
    for _ in range(50):
        values = [
            rng.choice([0, 5, -3, rng.randrange(-(10**9), 10**9)])
            for _ in range(rng.randrange(0, 40))
        ]
        assert timeline._decode(timeline._encode(values)) == values
    assert timeline._encode([7, 7, 7, 7]) == "7 0*3"


def test_a_trace_that_does_not_add_up_is_refused():
    trace = AllocationTrace(((0, 1024),), ((1, 5, -512),), {0: "params", 5: "temporaries"},
                            (), round_to=512, ops=1)  # fmt: skip
    with pytest.raises(ValueError, match="freed at op 1 but not live"):
        timeline.compact(trace)
    with pytest.raises(ValueError, match="max_points"):
        timeline.compact(_synthetic_trace(10), max_points=timeline.MAX_POINTS + 1)


def test_decode_refuses_an_unknown_version():
    with pytest.raises(ValueError, match="re-run the profile"):
        timeline.decode({"version": 99})


def test_tune_measurements_leave_the_timeline_out(mha_dir):
    from velora_cli.search.estimator import measurement_of

    spec = StepSpec(model=mha_dir, batch_size=2, seq_len=32)
    row = EstimateBackend().measure(spec)
    assert "timeline" in row
    assert "timeline" not in measurement_of(row, spec, False).detail
