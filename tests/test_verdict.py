"""The verdict of a profile on hand-made rows, its lines, and `--budget`'s exit codes."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from velora_cli.cli import app
from velora_cli.profiling.verdict import choose, memory_figure
from velora_cli.report.verdict import verdict_lines

runner = CliRunner()


def _row(label, memory, seconds, strategy="velora", status="ok", **extra):
    return {"label": label, "strategy": strategy, "status": status, "peak_bytes": memory,
            "predicted_step_seconds": seconds, **extra}  # fmt: skip


ROWS = [
    _row("baseline", 1000, 1.00, strategy="baseline"),
    _row("gc", 500, 1.40, strategy="gc"),  # 0.5 × 1.4 = 0.70
    _row("sac op", 600, 1.10, strategy="gc"),  # 0.6 × 1.1 = 0.66: the best trade
    _row("velora mlp", 900, 0.95),  # the fastest
    _row("velora all + gc + offload", 400, 1.80, host_bytes=300),  # the lowest: 0.72
    _row("slower and bigger", 950, 1.50),  # dominated: never a pick
    _row("broken", None, None, status="error"),
]


def test_the_three_picks():
    v = choose(ROWS)
    assert v.lowest_memory.label == "velora all + gc + offload"
    assert v.fastest.label == "velora mlp"
    assert v.best_trade.label == "sac op"
    assert v.best_trade.memory_ratio == 0.6 and v.best_trade.time_ratio == 1.1
    assert v.measured == 6 and v.exit_code == 0 and v.time_source == "predicted"


def test_a_budget_limits_the_fastest_and_the_trade():
    v = choose(ROWS, budget=550)
    assert v.fitting == ["gc", "velora all + gc + offload"]
    assert v.fastest.label == "gc"  # velora mlp (900) does not fit
    assert v.best_trade.label == "gc"  # 0.70 beats 0.72
    assert v.lowest_memory.label == "velora all + gc + offload"
    assert v.exit_code == 0
    nothing = choose(ROWS, budget=300)
    assert nothing.fitting == [] and nothing.exit_code == 1 and nothing.fastest is None


def test_nothing_estimated_and_baseline_as_the_trade():
    assert choose([_row("broken", None, None, status="error")]).exit_code == 2
    assert choose([]).exit_code == 2
    rows = [_row("baseline", 1000, 1.0, strategy="baseline"), _row("gc", 900, 1.5)]
    v = choose(rows)
    assert v.best_trade.label == "baseline"  # 0.9 × 1.5 = 1.35 > 1
    import dataclasses

    lines = verdict_lines(dataclasses.asdict(v))
    assert "best trade: baseline (no row saves memory worth its time)" in lines[1]


def test_the_device_figure_comes_first():
    row = {"peak_bytes": 10, "predicted_device_bytes": 30}
    assert memory_figure(row) == (30, "predicted_device_bytes")
    assert memory_figure({"peak_bytes": 10}) == (10, "peak_bytes")


def test_lines_carry_the_figures():
    import dataclasses

    lines = verdict_lines(dataclasses.asdict(choose(ROWS, budget=550)))
    assert lines[0].startswith("verdict: lowest memory: velora all + gc + offload: −60% memory")
    assert "+80% predicted time" in lines[0] and "pinned host" in lines[0]
    assert "best trade: gc: −50% memory at +40% predicted time" in lines[1]
    assert "2 of 6 rows fit" in lines[1]


PROFILE = ["profile", "llama-tiny", "--backend", "estimate", "--placements", "paper",
           "--num-groups", "4", "--gc-every", "1", "--no-velora-gc", "--sac", "op",
           "--offload", "none", "--no-save", "--format", "json"]  # fmt: skip


def test_budget_exit_codes():
    fits = runner.invoke(app, [*PROFILE, "--budget", "1TB"])
    assert fits.exit_code == 0, fits.output
    document = json.loads(fits.stdout)
    assert document["verdict"]["exit_code"] == 0 and len(document["verdict"]["fitting"]) == 4
    tight = runner.invoke(app, [*PROFILE, "--budget", "1MB"])
    assert tight.exit_code == 1, tight.output
    assert json.loads(tight.stdout)["verdict"]["fitting"] == []
    bad = runner.invoke(app, [*PROFILE, "--budget", "lots"])
    assert bad.exit_code == 1 and "Traceback" not in bad.output


def test_nothing_estimated_exits_2(monkeypatch):
    from velora_cli.estimate.backend import EstimateBackend

    monkeypatch.setattr(
        EstimateBackend,
        "measure",
        lambda self, spec, breakdown=False: {"status": "error", "error": "boom"},
    )
    result = runner.invoke(app, [*PROFILE, "--budget", "1TB"])
    assert result.exit_code == 2, result.output


def test_sac_and_offload_options_are_checked():
    result = runner.invoke(app, [*PROFILE, "--sac", "everything"])
    assert result.exit_code == 1 and "--sac everything: choose from op, attn, mlp" in result.output
