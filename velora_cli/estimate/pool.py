"""A second process for dear estimates: a list of rows worked from both ends at once.

Estimates run one after another on meta tensors, one CPU core busy. When they are dear and
enough are left, the caller starts one helper process that estimates the same list from its far
end, backwards, while the caller goes on from the near end; they meet in the middle. Each index
is claimed once, under a lock, by whichever side reaches it first, so nothing is estimated twice.

Two callers, two ways to start the helper:

- ``fork``, where the platform has it (Linux): the child starts at once with the caller's
  backend as it is after the first row: modules imported, meta models built and warmed
  (`shortcut.meta_cache`), kernel results cached. It starts as soon as the rows left would take
  2 s alone (`fork_pays`), so even a profile of 19 rows at a third of a second each gains.
  PyTorch's own DataLoader forks its workers the same way; the child runs meta tensors only,
  touches no device and writes nothing, and a caller stops a child that hangs (`PATIENCE`).
- ``spawn`` elsewhere: the helper builds its own worker from a picklable configuration (the
  tune's settings; ~5 s here), so it starts only once the first estimates show that the list
  left is long and dear (`helper_wanted`). The profile does not spawn one: its rows are done
  before a spawned helper would be ready.

The callers: ``velora tune`` (`search.estimator.Estimator`, fork or spawn) and ``velora
profile`` (`profiling.profiler.run_profile`, fork only).

The answer does not change: the caller still takes every item in order and decides there, as
before, whether it needs its own estimate (the tune: or its mode's floor, params + grads +
optimizer state over budget); a helper's row is used only where the caller would have estimated
that item itself, and a row depends on nothing but its item (the fast path's rows equal the
reference path's: tests/test_estimate_shortcuts.py). Should the helper fail (an exception, a
dead process), the caller estimates what is left itself. ``VELORA_ESTIMATE_WORKERS=1`` turns the
helper off.

The helper's worker (what ``make_worker(config)`` returns) has ``row(item)``, the row;
``floored(item)``, whether the caller will not ask for the item's row (the helper skips it);
and ``note_floor(item, row)``, called after each of its rows.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable, Sequence
from typing import Any

MIN_SPENT = 3.0  # seconds of estimates before a helper starts: a short tune never starts one
MIN_MEAN = 0.3  # seconds per estimate at least: a helper's start (~5 s) must pay
MIN_LEFT = 6  # candidates left to estimate
# a forked helper (the profile's) starts in milliseconds: it pays once the rows left would take
# this long alone (a tiny model's profile, a few hundredths of a second per row, never forks)
FORK_MIN_SECONDS = 2.0
# seconds a caller waits for a row its forked helper is on before it stops the helper and
# estimates the rest itself (or 20 of its own estimates' mean time, if longer)
PATIENCE = 60.0
FREE, MINE, HELPER = 0, 1, 2  # who claimed an index


def helper_wanted(spent: float, estimates: int, left: int) -> bool:
    """Whether a spawned helper process pays, after ``estimates`` estimates took ``spent``
    seconds with ``left`` candidates to go: dear estimates, enough of them left, a second core.
    ``VELORA_ESTIMATE_WORKERS=1`` never starts one, ``=2`` always (where there is a second core).
    """
    setting = _setting()
    if setting == "1" or not _second_core() or estimates < 1:
        return False
    dear = spent >= MIN_SPENT and spent / estimates >= MIN_MEAN and left >= MIN_LEFT
    return setting == "2" or dear


def fork_pays(seconds_per_row: float, left: int) -> bool:
    """Whether a forked helper pays: a second core, the platform forks, and the ``left`` rows
    at ``seconds_per_row`` would take `FORK_MIN_SECONDS` alone (``VELORA_ESTIMATE_WORKERS`` as
    in `helper_wanted`)."""
    import multiprocessing

    setting = _setting()
    if setting == "1" or not _second_core() or left < 2:
        return False
    if "fork" not in multiprocessing.get_all_start_methods():
        return False
    return setting == "2" or seconds_per_row * left >= FORK_MIN_SECONDS


def _setting() -> str:
    return os.environ.get("VELORA_ESTIMATE_WORKERS", "").strip()


def _second_core() -> bool:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (cores or 1) >= 2


class EstimatePool:
    """The helper process and the claims on the items' indices.

    Args:
        config: what the helper builds its worker from (the tune's settings; with ``fork``, the
            profile's worker itself).
        items: what is to be estimated, in the caller's order.
        make_worker: builds the helper's worker from ``config`` (module docstring; e.g.
            `search.estimator.Estimator`, passed in: that module starts the pool, so this one
            does not import it back).
        method: ``spawn`` (``config`` and ``make_worker`` are pickled) or ``fork``.
        mine: the indices the caller is past already, claimed for it before the helper starts.
    """

    def __init__(
        self,
        config: Any,
        items: Sequence[Any],
        make_worker: Callable[[Any], Any],
        *,
        method: str = "spawn",
        mine: int = 0,
    ) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context(method)
        self.claims = ctx.Array("b", len(items), lock=False)
        for i in range(mine):
            self.claims[i] = MINE
        self.lock = ctx.Lock()
        self.results = ctx.Queue()
        self.rows: dict[int, tuple[str, Any]] = {}
        self.process = ctx.Process(
            target=_work,
            args=(make_worker, config, list(items), self.claims, self.lock, self.results),
            name="velora-estimate",
            daemon=True,  # never outlives the caller
        )
        self.process.start()

    def take(self, index: int, *, patience: float | None = None) -> dict[str, Any] | None:
        """The helper's row for ``index`` when the helper has it or is on it (waited for), else
        None with the index claimed for this process (which then estimates it).

        Args:
            patience: seconds to wait for a row the helper is on; past them the helper is
                stopped (a forked child that hangs must not hang the caller) and the caller
                estimates the rest. None: wait while the helper lives.
        """
        with self.lock:
            if self.claims[index] == FREE:
                self.claims[index] = MINE
                return None
        waited = 0.0
        while index not in self.rows:
            if not self.process.is_alive():
                self._drain()
                break  # the helper died (or was stopped) on it: estimated here instead
            try:
                got, kind, value = self.results.get(timeout=1.0)
            except queue.Empty:
                waited += 1.0
                if patience is not None and waited >= patience:
                    self.process.terminate()
                    self.process.join(timeout=5)
                continue
            self.rows[got] = (kind, value)
        kind, value = self.rows.pop(index, ("error", None))
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


def _work(make_worker, config, items, claims, lock, results) -> None:
    """The helper: estimate from the last index down until reaching the caller's claims."""
    import warnings

    # the tune has said what there is to say about these models (notes, warnings) already
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)  # meta work is one thread's; the caller's process has the other core

    worker = make_worker(config)
    for index in range(len(items) - 1, -1, -1):
        item = items[index]
        if worker.floored(item):
            continue  # not asked for (the tune: over budget by its floor alone), left to it
        with lock:
            if claims[index] != FREE:
                return  # the caller is here already
            claims[index] = HELPER
        try:
            row = worker.row(item)
        except Exception as exc:  # the caller estimates it again and records the error itself
            results.put((index, "error", f"{type(exc).__name__}: {exc}"))
            continue
        worker.note_floor(item, row)
        results.put((index, "row", row))


class Helped:
    """A list of items estimated in order by this process and, once that pays, from the far end
    by a helper (module docstring): forked where the platform forks, else spawned from
    ``spawn`` = (config, make_worker) where given (None: this process alone).

    Args:
        worker: this process's worker (``row``, ``floored``, ``note_floor``); a forked helper
            runs a copy of it.
        items: the list, in the caller's order.
    """

    def __init__(
        self, worker: Any, items: Sequence[Any], *, spawn: tuple[Any, Callable] | None = None
    ) -> None:
        self.worker = worker
        self.items = list(items)
        self.spawn = spawn
        self.pool: EstimatePool | None = None
        self.started = False  # once: a helper that died is not replaced
        self.forked = False
        self.spent, self.measured = 0.0, 0  # this process's seconds and rows
        self.helped = 0  # rows the helper made

    def row(self, index: int) -> dict[str, Any]:
        """The row of ``items[index]``: the helper's where it has it or is on it, else made here
        (and the helper started after it, where it pays)."""
        if self.pool is not None:
            mean = self.spent / max(1, self.measured)
            row = self.pool.take(index, patience=max(PATIENCE, 20 * mean) if self.forked else None)
            if row is not None:
                self.helped += 1
                return row
        start = time.perf_counter()
        row = self.worker.row(self.items[index])
        self.spent += time.perf_counter() - start
        self.measured += 1
        if not self.started:
            self._start(index)
        return row

    def _start(self, index: int) -> None:
        left = len(self.items) - index - 1
        # the caller is past index: not the helper's to do
        if fork_pays(self.spent / self.measured, left):
            self.started = self.forked = True
            self.pool = EstimatePool(
                self.worker, self.items, _itself, method="fork", mine=index + 1
            )
        elif self.spawn is not None and helper_wanted(self.spent, self.measured, left):
            self.started = True
            config, make_worker = self.spawn
            self.pool = EstimatePool(config, self.items, make_worker, mine=index + 1)

    def close(self) -> None:
        """Stop the helper, if one runs."""
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close()


def _itself(worker: Any) -> Any:
    """A forked helper's worker: the caller's, copied with its process."""
    return worker
