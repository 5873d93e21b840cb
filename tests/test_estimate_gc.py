"""The estimate's rows pause Python's cyclic garbage collector (`velora_cli.gcpause.paused`): a
row must not depend on when that collector runs. The tracker hears a storage's free through a
weakref callback, so a storage freed only by a collection (one held in a reference cycle) would
show up wherever the collector happened to run. Here collections are forced every few
allocations of Python objects during the rows, on the reference path and the fast path, and the
rows equal the rows with the collector paused, field for field."""

from __future__ import annotations

import contextlib
import gc

import pytest
from transformers import LlamaConfig

from velora_cli import gcpause
from velora_cli.estimate.backend import EstimateBackend
from velora_cli.measure.train_step import StepSpec, Strategy
from velora_cli.shortcut import shortcuts


@pytest.fixture(scope="module")
def llama8(tmp_path_factory):
    path = tmp_path_factory.mktemp("gc-llama") / "llama8"
    LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
    ).save_pretrained(path)  # fmt: skip
    return str(path)


@contextlib.contextmanager
def collecting_often():
    """The collector on, every generation collected after a few allocations."""
    thresholds, enabled = gc.get_threshold(), gc.isenabled()
    gc.set_threshold(20, 1, 1)
    gc.enable()
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        if not enabled:
            gc.disable()


def test_the_pause_restores_the_collector():
    gc.enable()
    with gcpause.paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gcpause.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()


@pytest.mark.parametrize(
    ("settings", "strategy"),
    [
        ({"batch_size": 4, "grad_accum_steps": 2}, Strategy(gc=True)),
        ({"mode": "lora", "optimizer": "adamw_torch_fused"}, Strategy(placement="paper",
                                                                      num_groups=16)),
    ],
)  # fmt: skip
@pytest.mark.parametrize("reference", [True, False], ids=["reference", "fast"])
def test_rows_do_not_depend_on_when_the_collector_runs(
    llama8, monkeypatch, settings, strategy, reference
):
    monkeypatch.setattr(shortcuts, "shallow_runs_pay", lambda *_: True)  # extrapolate at 8
    spec = StepSpec(model=llama8, seq_len=32, **{"batch_size": 2, **settings}, strategy=strategy)
    paused = EstimateBackend(shortcuts=not reference).measure(spec, breakdown=True)
    monkeypatch.setattr(gcpause, "paused", collecting_often)
    before = [g["collections"] for g in gc.get_stats()]
    forced = EstimateBackend(shortcuts=not reference).measure(spec, breakdown=True)
    after = [g["collections"] for g in gc.get_stats()]
    # it did collect, often: the young generations (where a step's own cycles would be) every
    # few hundred objects, the whole heap whenever CPython's rule allows (a quarter of it new)
    assert after[0] > before[0] + 100 and after[1] > before[1] + 100, (before, after)
    assert paused["status"] == "ok", paused.get("error")
    differ = {k: (paused.get(k), forced.get(k)) for k in paused.keys() | forced.keys()
              if paused.get(k) != forced.get(k)}  # fmt: skip
    assert not differ
    assert reference or paused["estimate_method"].startswith("extrapolated")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_rank_rows_do_not_depend_on_when_the_collector_runs(llama8, monkeypatch, parallel):
    # the per-rank estimate pauses the collector the same way (parallel/estimate.py)
    from velora_cli.parallel.estimate import ParallelEstimateBackend

    spec = StepSpec(
        model=llama8, batch_size=2, seq_len=32, world_size=2, parallel=parallel,
        strategy=Strategy(placement="paper", num_groups=16),
    )  # fmt: skip
    paused = ParallelEstimateBackend(shortcuts=False).measure(spec)
    monkeypatch.setattr(gcpause, "paused", collecting_often)
    before = gc.get_stats()[0]["collections"]
    forced = ParallelEstimateBackend(shortcuts=False).measure(spec)
    assert gc.get_stats()[0]["collections"] > before + 100
    assert paused["status"] == "ok", paused.get("error")
    assert paused == forced
