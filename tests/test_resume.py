"""`velora tune --resume` continues this run's own journal, never another run's; concurrent tunes
never share one."""

import json

import pytest
from typer.testing import CliRunner

from velora_cli import files
from velora_cli.cli import app
from velora_cli.search import resume
from velora_cli.search.journal import Journal
from velora_cli.search.settings import TuneError

runner = CliRunner()
# llama-tiny, 4 candidates, estimated only (as in test_cli_tune)
TINY = ["llama-tiny", "--batch-size", "4", "--seq-len", "128", "--backend", "estimate",
        "--micro-batches", "4", "--placements", "paper", "--gc-every", "1",
        "--mode", "full", "--optimizer", "adamw", "--probe-steps", "0"]  # fmt: skip


@pytest.fixture(autouse=True)
def profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("VELORA_PROFILES_DIR", str(tmp_path / "profiles"))
    monkeypatch.setattr(files, "_stamp", lambda: "20261201-144215")  # every run in one second
    return tmp_path / "profiles"


def tune(*args):
    return runner.invoke(app, ["tune", *TINY, *args])


def headers(path):
    return [json.loads(line) for line in path.read_text().splitlines() if '"header"' in line]


def test_tunes_in_the_same_second_keep_their_own_journals(profiles):
    assert tune("--budget", "3GB").exit_code == 0
    assert tune("--budget", "2GB").exit_code == 0
    journals = sorted(profiles.glob("tune-*.jsonl"))
    assert len(journals) == 2 and len(list(profiles.glob("tune-*.json"))) == 2
    budgets = []
    for path in journals:
        (header,) = headers(path)  # one header each, no records of the other run
        budgets.append(header["context"]["budget_bytes"])
        document = json.loads(path.with_suffix(".json").read_text())
        assert document["budget_bytes"] == header["context"]["budget_bytes"]
    assert sorted(budgets) == [2 * 10**9, 3 * 10**9]


def test_resume_takes_the_newest_journal_of_these_settings(profiles):
    assert tune("--budget", "2GB").exit_code == 0
    mine = next(profiles.glob("tune-*.jsonl"))
    assert tune("--budget", "2GB", "--seq-len", "64").exit_code == 0  # newer, other settings
    result = tune("--resume")  # the budget comes from the journal it takes
    assert result.exit_code == 0, result.output
    assert f"resuming {mine} (" in result.stderr and f"the budget of {mine}" in result.stderr
    assert len(headers(mine)) == 1
    assert len(list(profiles.glob("tune-*.jsonl"))) == 2  # resumed, not a new journal


def test_resume_passes_over_a_journal_that_a_running_tune_holds(profiles):
    assert tune("--budget", "2GB").exit_code == 0
    older = next(profiles.glob("tune-*.jsonl"))
    assert tune("--budget", "2GB").exit_code == 0
    newer = next(p for p in profiles.glob("tune-*.jsonl") if p != older)
    older.touch()  # the held one is the newest
    running = Journal.load(older)
    assert running.claim()
    try:
        result = tune("--resume")
        assert result.exit_code == 0, result.output
        assert f"resuming {newer}" in result.stderr
        assert f"{older} has these settings but a running tune is writing it" in result.stderr
        result = tune("--resume-from", str(older))
        assert result.exit_code == 1 and "a running velora tune is writing it" in result.stderr
    finally:
        running.release()
    assert not Journal.in_use(older)


def test_resume_without_a_matching_journal_names_the_difference(profiles):
    assert tune("--budget", "2GB").exit_code == 0
    result = tune("--resume", "--seq-len", "64")
    assert result.exit_code == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: cannot resume: no tune journal under")
    assert "seq_len=128" in message and "seq_len=64" in message


def test_resume_from_an_empty_journal(profiles):
    profiles.mkdir()
    empty = profiles / "tune-llama-tiny-1.jsonl"
    empty.write_text("")
    result = tune("--budget", "2GB", "--resume-from", str(empty))
    assert result.exit_code == 1
    assert f"cannot resume {empty}: it is empty, so it records no settings" in result.stderr
    assert "model=None" not in result.stderr
    result = tune("--budget", "2GB", "--resume")  # an empty journal is no candidate either
    assert result.exit_code == 1 and "records its settings (all empty or unreadable)" in (
        result.stderr
    )


def test_a_damaged_line_is_skipped_and_named_the_rest_kept(profiles):
    assert tune("--budget", "2GB").exit_code == 0
    path = next(profiles.glob("tune-*.jsonl"))
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + "garbage\n" + "".join(lines[2:]))
    result = tune("--resume")
    assert result.exit_code == 0, result.output
    assert f"resuming {path} ({len(lines) - 1} finished results)" in result.stderr
    assert f"note: {path}:3 is not a journal record: skipped, the rest kept" in result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert all("] resume " in line for line in progress)  # nothing ran again


def test_find_journal_unit(tmp_path):
    context = {"model": "a", "budget_bytes": 1}
    with pytest.raises(TuneError, match="no tune journal under"):
        resume.find_journal(tmp_path, context)
    Journal(tmp_path / "tune-a-1.jsonl", context={"model": "a", "budget_bytes": 2})
    with pytest.raises(TuneError, match="budget_bytes=2"):
        resume.find_journal(tmp_path, context)
    path, notes = resume.find_journal(tmp_path, context, ignore=("budget_bytes",))
    assert path.name == "tune-a-1.jsonl" and notes == []
