"""A second process for the tune's estimates: the list worked from both ends at once.

The tune estimates its candidates one after another on meta tensors, one CPU core busy. When
its estimates are dear (a 7B model: ~1-2 s each) and enough are left, `Estimator` starts one
helper process (``spawn``) that estimates the same list from its far end, backwards, while the
tune goes on from the near end; they meet in the middle. Each index is claimed once, under a
lock, by whichever side reaches it first, so nothing is estimated twice.

The tune's answer does not change: it still takes every candidate in order and decides there,
as before, whether the candidate needs its own estimate or gets its mode's floor (params +
grads + optimizer state over budget: `estimator.Estimator`); a helper's row is used only where
the tune would have estimated that candidate itself, and an estimate's row depends on nothing
but its candidate (the fast path's rows equal the reference path's: tests/test_estimate_shortcuts
.py). The helper skips the candidates its own floors say are over budget, so it wastes little
on them. Should the helper fail (an exception, a dead process), the tune estimates what is left
itself. ``VELORA_ESTIMATE_WORKERS=1`` turns the helper off.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from velora_cli.search.candidates import Candidate
    from velora_cli.search.settings import TuneSettings

MIN_SPENT = 3.0  # seconds of estimates before a helper starts: a short tune never starts one
MIN_MEAN = 0.3  # seconds per estimate at least: a helper's start (~5 s) must pay
MIN_LEFT = 6  # candidates left to estimate
FREE, MINE, HELPER = 0, 1, 2  # who claimed an index


def helper_wanted(spent: float, estimates: int, left: int) -> bool:
    """Whether a helper process pays, after ``estimates`` estimates took ``spent`` seconds with
    ``left`` candidates to go: dear estimates, enough of them left, a second core.
    ``VELORA_ESTIMATE_WORKERS=1`` never starts one, ``=2`` always (where there is a second core).
    """
    setting = os.environ.get("VELORA_ESTIMATE_WORKERS", "").strip()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if setting == "1" or (cores or 1) < 2 or estimates < 1:
        return False
    dear = spent >= MIN_SPENT and spent / estimates >= MIN_MEAN and left >= MIN_LEFT
    return setting == "2" or dear


class EstimatePool:
    """The helper process and the claims on the candidates' indices.

    Args:
        settings: the tune's settings (the helper builds its own estimator from them).
        candidates: what is to be estimated, in the tune's order.
        make_estimator: builds the helper's estimator from ``settings`` (`estimator.Estimator`,
            passed in: that module starts the pool, so this one does not import it back).
    """

    def __init__(
        self,
        settings: TuneSettings,
        candidates: Sequence[Candidate],
        make_estimator: Callable[[TuneSettings], Any],
    ) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.claims = ctx.Array("b", len(candidates), lock=False)
        self.lock = ctx.Lock()
        self.results = ctx.Queue()
        self.rows: dict[int, tuple[str, Any]] = {}
        self.process = ctx.Process(
            target=_work,
            args=(make_estimator, settings, list(candidates), self.claims, self.lock, self.results),
            name="velora-estimate",
            daemon=True,  # never outlives the tune
        )
        self.process.start()

    def take(self, index: int) -> dict[str, Any] | None:
        """The helper's row for ``index`` when the helper has it or is on it (waited for), else
        None with the index claimed for this process (which then estimates it)."""
        with self.lock:
            if self.claims[index] == FREE:
                self.claims[index] = MINE
                return None
        while index not in self.rows:
            try:
                got, kind, value = self.results.get(timeout=1.0)
            except queue.Empty:
                if not self.process.is_alive():
                    self._drain()
                    if index not in self.rows:
                        return None  # the helper died on it: estimated here instead
                continue
            self.rows[got] = (kind, value)
        kind, value = self.rows.pop(index)
        return value if kind == "row" else None  # an exception: estimated (and raised) here

    def _drain(self) -> None:
        while True:
            try:
                got, kind, value = self.results.get_nowait()
            except queue.Empty:
                return
            self.rows[got] = (kind, value)

    def close(self) -> None:
        """Stop the helper (it may still be estimating candidates nobody needs any more)."""
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(timeout=5)
        self.results.close()


def _work(make_estimator, settings, candidates, claims, lock, results) -> None:
    """The helper: estimate from the last index down until reaching the tune's claims."""
    import warnings

    # the tune has said what there is to say about these models (notes, warnings) already
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)  # meta work is one thread's; the tune's process has the other core

    estimator = make_estimator(settings)
    for index in range(len(candidates) - 1, -1, -1):
        c = candidates[index]
        if estimator.floored(c):
            continue  # over budget by its floor alone: cheap for the tune, left to it
        with lock:
            if claims[index] != FREE:
                return  # the tune is here already
            claims[index] = HELPER
        try:
            row = estimator.row(c)
        except Exception as exc:  # the tune estimates it again and records the error itself
            results.put((index, "error", f"{type(exc).__name__}: {exc}"))
            continue
        estimator.note_floor(c, row)
        results.put((index, "row", row))
