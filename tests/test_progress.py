"""Progress off a terminal (plain lines with elapsed and ETA, a heartbeat) and on one (a bar)."""

import time

from typer.testing import CliRunner

from velora_cli.cli import app
from velora_cli.measure.train_step import Strategy
from velora_cli.report.progress import RowProgress, TuneProgress, duration

runner = CliRunner()


def test_row_lines_off_a_terminal():
    lines = []
    with RowProgress(3, terminal=False, echo=lines.append) as progress:
        for i, strategy in enumerate([Strategy(), Strategy(gc=True), Strategy("paper", 32)]):
            progress.start(i, 3, strategy)
            status = "error" if i == 1 else "ok"
            progress.done(i, 3, {"label": strategy.label, "status": status, "error": "boom"})
    assert lines[0].startswith("[1/3] measuring baseline (0s elapsed")
    assert lines[1].startswith("[2/3] measuring gc (") and "eta ~" in lines[1]
    assert "[2/3] gc: error: boom" in lines
    assert lines[-2].startswith("[3/3] measuring velora paper g32")
    assert lines[-1].startswith("measured 3 rows in ")


def test_a_long_row_prints_a_heartbeat():
    lines = []
    with RowProgress(1, terminal=False, echo=lines.append, heartbeat=0.05) as progress:
        progress.start(0, 1, Strategy())
        time.sleep(0.3)
        progress.done(0, 1, {"label": "baseline", "status": "ok"})
        quiet_after = len(lines)
        time.sleep(0.15)
    assert any(line.startswith("  ... still measuring baseline (") for line in lines)
    assert len(lines) == quiet_after  # no heartbeat once the row is done


def test_terminal_gets_a_bar_not_lines(capsys):
    lines = []
    with RowProgress(2, terminal=True, echo=lines.append) as progress:
        progress.start(0, 2, Strategy())
        progress.done(0, 2, {"label": "baseline", "status": "ok"})
    assert progress.progress is not None and lines == []
    with TuneProgress(lines.append, terminal=True) as tune_progress:
        tune_progress("estimate a", 0, 2)
        tune_progress("estimate b", 1, 2)
        tune_progress("estimate done", 2, 2)
        tune_progress("measure a", 0, 1)
    assert lines == []  # the bar's console prints instead (stderr)
    assert "estimated 2 candidates" in capsys.readouterr().err


def test_estimates_print_a_line_every_few_seconds_and_a_summary():
    lines = []
    progress = TuneProgress(lines.append, terminal=False, estimate_every=3600)
    for i in range(50):
        progress(f"estimate c{i}", i, 50)
    progress("estimate done", 50, 50)
    # the first and the last, not fifty lines; then how long the estimates took
    assert [line.split(" (")[0] for line in lines] == [
        "[1/50] estimate c0",
        "[50/50] estimate c49",
        "estimated 50 candidates in 0s",
    ]
    assert "eta ~" in lines[1]


def test_resumed_items_do_not_shorten_the_eta():
    lines = []
    progress = TuneProgress(lines.append, terminal=False)
    progress("measure a", 0, 3)
    time.sleep(0.05)
    progress("resume measure b", 1, 3)  # from the journal: instant
    progress("measure c", 2, 3)
    assert progress.times["measure"] == [progress.times["measure"][0]]  # only a counted
    assert progress.times["measure"][0] >= 0.05


def test_silent_stages_print_nothing():
    lines = []
    progress = TuneProgress(lines.append, terminal=False, silent=("measure", "verify"))
    progress("measure a", 0, 1)
    progress("probe a", 1, 1)
    progress("verify a", 1, 1)
    assert [line.split(" (")[0] for line in lines] == ["[1/1] probe a"]


def test_duration():
    assert [duration(s) for s in (4.4, 61, 3725)] == ["4s", "1m01s", "1h02m"]


def test_profile_and_tune_print_progress_lines_when_piped(tmp_path, monkeypatch):
    monkeypatch.setenv("VELORA_PROFILES_DIR", str(tmp_path))
    result = runner.invoke(
        app,
        [
            "profile",
            "llama-tiny",
            "--backend",
            "estimate",
            "--seq-len",
            "32",
            "--placements",
            "paper",
            "--num-groups",
            "32",
            "--gc-every",
            "1",
            "--no-velora-gc",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    steps = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert [line.split(" (")[0] for line in steps] == [
        "[1/3] measuring baseline",
        "[2/3] measuring gc",
        "[3/3] measuring velora paper g32",
    ]
    assert all("elapsed" in line for line in steps)
    result = runner.invoke(
        app,
        [
            "tune",
            "llama-tiny",
            "--backend",
            "estimate",
            "--budget",
            "2GB",
            "--seq-len",
            "32",
            "--mode",
            "full",
            "--optimizer",
            "adamw",
            "--placements",
            "paper",
            "--micro-batches",
            "4",
            "--gc-every",
            "1",
            "--probe-steps",
            "0",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    assert "[1/4] estimate full|none|g-|gc=off|mb4x1|adamw (" in result.stderr
    assert "estimated 4 candidates in " in result.stderr
    assert "] measure " not in result.stderr  # --backend estimate measures nothing
