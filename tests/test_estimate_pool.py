"""The helper process for dear estimates (velora_cli/estimate/pool.py), the tune's and the
profile's: it changes no row, and the caller goes on alone when it fails, hangs or is off."""

import time

import pytest

from velora_cli.estimate.pool import HELPER, fork_pays, helper_wanted
from velora_cli.search import autotune

SPACE = dict(
    model="llama-tiny", batch_size=4, seq_len=64, budget_bytes=2 * 10**9, backend="estimate",
    probe_steps=0, placements=("paper", "all-linear"), num_groups=(8,), gc_every=(2,),
    micro_batches=(1, 2, 4), modes=("full", "lora"),
)  # fmt: skip


def plain_estimates(settings):
    estimator = autotune.Estimator(settings)
    space, _ = autotune.build_space(settings)
    return space, [estimator(c) for c in space]


def helped_estimator(settings, space, monkeypatch, method="fork"):
    """An Estimator whose helper process (forked, or spawned where fork is ruled out) has
    started and claimed a candidate."""
    from velora_cli.estimate import pool as pools

    monkeypatch.setenv("VELORA_ESTIMATE_WORKERS", "2")  # whatever the first estimate costs
    if method == "spawn":
        monkeypatch.setattr(pools, "fork_pays", lambda seconds, left: False)
    estimator = autotune.Estimator(settings)
    estimator.plan(space)
    first = estimator(space[0])
    pool = estimator._pool
    assert pool is not None and pool.process.is_alive()
    deadline = time.monotonic() + 120
    while HELPER not in pool.claims[:]:
        assert time.monotonic() < deadline, "the helper never claimed a candidate"
        time.sleep(0.05)
    return estimator, first


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_the_helper_process_changes_no_estimate(monkeypatch, method):
    settings = autotune.TuneSettings(**SPACE)
    space, reference = plain_estimates(settings)
    assert len(space) >= 20
    estimator, first = helped_estimator(settings, space, monkeypatch, method)
    assert estimator._forked is (method == "fork")
    helped = [first] + [estimator(c) for c in space[1:]]
    estimator.finish()
    assert helped == reference  # every field, the helper's rows included
    assert estimator.helped >= 1
    assert estimator._pool is None


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_dead_helper_leaves_the_rest_to_the_tune(monkeypatch, method):
    settings = autotune.TuneSettings(**SPACE)
    space, reference = plain_estimates(settings)
    estimator, first = helped_estimator(settings, space, monkeypatch, method)
    process = estimator._pool.process
    process.kill()
    process.join(10)
    helped = [first] + [estimator(c) for c in space[1:]]
    estimator.finish()
    assert helped == reference


def test_a_tune_with_the_helper_answers_as_without(monkeypatch):
    settings = autotune.TuneSettings(**SPACE)
    monkeypatch.setenv("VELORA_ESTIMATE_WORKERS", "1")
    alone = autotune.run(settings, save_path=None, journal=None)
    monkeypatch.setenv("VELORA_ESTIMATE_WORKERS", "2")
    shared = autotune.run(settings, save_path=None, journal=None)
    for doc in (alone, shared):
        doc.pop("created")
        doc.pop("environment", None)
    assert shared["candidates"] == alone["candidates"]
    assert shared["recommendation"] == alone["recommendation"]


@pytest.mark.parametrize(
    ("env", "spent", "estimates", "left", "wanted"),
    [("", 4.0, 3, 40, True), ("", 2.0, 2, 40, False), ("", 4.0, 40, 40, False),
     ("", 4.0, 3, 3, False), ("1", 99.0, 9, 99, False), ("2", 0.0, 1, 1, True),
     ("2", 0.0, 0, 9, False)],
)  # fmt: skip
def test_a_helper_starts_only_where_it_pays(monkeypatch, env, spent, estimates, left, wanted):
    import os

    monkeypatch.setenv("VELORA_ESTIMATE_WORKERS", env)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert helper_wanted(spent, estimates, left) is wanted
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert helper_wanted(spent, estimates, left) is False


@pytest.mark.parametrize(
    ("env", "seconds", "left", "methods", "pays"),
    [("", 0.3, 18, ["fork", "spawn"], True), ("", 0.05, 18, ["fork", "spawn"], False),
     ("", 9.0, 1, ["fork", "spawn"], False), ("", 0.3, 18, ["spawn"], False),
     ("1", 9.0, 90, ["fork"], False), ("2", 0.0, 2, ["fork"], True)],
)  # fmt: skip
def test_a_fork_starts_where_the_rows_left_take_seconds(monkeypatch, env, seconds, left, methods,
                                                        pays):  # fmt: skip
    import multiprocessing
    import os

    monkeypatch.setenv("VELORA_ESTIMATE_WORKERS", env)
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: methods)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert fork_pays(seconds, left) is pays
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert fork_pays(seconds, left) is False


def _profile(monkeypatch, workers: str, backend=None):
    from velora_cli.estimate.backend import EstimateBackend
    from velora_cli.measure.train_step import StepSpec
    from velora_cli.profiling.profiler import plan_strategies, run_profile

    monkeypatch.setenv("VELORA_ESTIMATE_WORKERS", workers)
    spec = StepSpec(model="llama-tiny", batch_size=2, seq_len=32)
    strategies = plan_strategies(["paper", "all-linear"], num_groups=[4, 8], gc_every=[1, 2])
    document = run_profile(spec, strategies, backend or EstimateBackend())
    document.pop("created")
    return document


def test_a_profile_with_a_forked_helper_answers_as_without(monkeypatch):
    from velora_cli.estimate import pool

    taken = []
    take = pool.EstimatePool.take

    def counted(self, index, **kwargs):
        row = take(self, index, **kwargs)
        taken.append(row is not None)
        return row

    monkeypatch.setattr(pool.EstimatePool, "take", counted)
    alone = _profile(monkeypatch, "1")
    assert taken == []
    shared = _profile(monkeypatch, "2")
    assert len(shared["rows"]) >= 8
    assert any(taken), "the helper made no row"
    assert shared == alone  # every row and field, the helper's included


def test_a_helper_that_hangs_is_stopped_and_the_profile_finishes(monkeypatch):
    import os

    from velora_cli.estimate import pool
    from velora_cli.estimate.backend import EstimateBackend

    parent = os.getpid()

    class Hanging(EstimateBackend):
        def measure(self, spec, **kwargs):
            if os.getpid() != parent:  # the forked helper only
                time.sleep(3600)
            return super().measure(spec, **kwargs)

    alone = _profile(monkeypatch, "1")
    monkeypatch.setattr(pool, "PATIENCE", 2.0)
    start = time.monotonic()
    shared = _profile(monkeypatch, "2", Hanging())
    assert shared == alone
    assert time.monotonic() - start < 120
