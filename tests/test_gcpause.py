"""The CLI's collector pause (velora_cli/gcpause.py): off for the imports, frozen and back on
after the first model, and nobody else's collector touched."""

from __future__ import annotations

import gc

import pytest

from velora_cli import gcpause


@pytest.fixture
def collector():
    """Leave the collector, its frozen generation and the module's flags as they were."""
    enabled = gc.isenabled()
    state = gcpause._paused, gcpause._rows, gcpause._on_after_rows
    gcpause._paused, gcpause._rows, gcpause._on_after_rows = False, 0, False
    gc.unfreeze()
    yield
    gcpause._paused, gcpause._rows, gcpause._on_after_rows = state
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


def test_pause_then_resume_freezes_what_is_alive_and_turns_the_collector_back_on(collector):
    gc.enable()
    gcpause.pause()
    assert not gc.isenabled()
    kept = [[] for _ in range(1000)]  # made while paused, alive after: frozen by resume
    before = gc.get_freeze_count()
    gcpause.resume()
    assert gc.isenabled()
    assert gc.get_freeze_count() >= before + len(kept)
    gcpause.resume()  # a second resume (the next model built) changes nothing
    assert gc.isenabled()


def test_a_collector_someone_else_turned_off_stays_off(collector):
    # a library user of velora_cli (prepare() calls resume) who runs without the collector
    gc.disable()
    gcpause.pause()
    gcpause.resume()
    assert not gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_the_cli_pauses_until_the_first_model_is_built(collector, monkeypatch):
    # cli.main pauses; measure.train_step.prepare resumes once the model is built
    from velora_cli.measure.train_step import StepSpec, prepare

    gc.enable()
    gcpause.pause()
    prepare(StepSpec(model="llama-tiny", batch_size=1, seq_len=8), "meta")
    assert gc.isenabled() and gc.get_freeze_count() > 0


def test_the_import_pause_ending_inside_a_row_turns_the_collector_on_after_the_row(collector):
    # the first estimate row builds the first model: `resume` runs inside the row's pause
    gc.enable()
    gcpause.pause()
    with gcpause.paused():
        with gcpause.paused():
            gcpause.resume()
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer row is still running
    assert gc.isenabled()
