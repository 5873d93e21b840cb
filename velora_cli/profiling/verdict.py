"""The verdict of a profile: which row to use, in plain data (rendered by `report.verdict`).

Three picks among the rows that were measured (``status == "ok"``) and have a memory figure:

- **lowest memory**: the smallest device memory (`memory_figure`);
- **fastest**: the shortest step (measured ``step_seconds``, else the roofline's
  ``predicted_step_seconds``);
- **best trade**: among the rows not beaten on both memory and time by another (the Pareto
  front), the one with the smallest product of its memory and time ratios against the baseline.
  The product weighs relative changes equally: halving memory is worth doubling the step time,
  −40% memory at +10% time (0.6 × 1.1 = 0.66) beats −20% at ±0% (0.8). When it is the baseline
  itself, nothing is worth its cost.

With a ``budget`` (bytes of device memory), the fastest and the best trade are chosen among the
rows that fit (memory figure ≤ budget), the lowest-memory row among all (when nothing fits it says
by how much the best attempt misses). ``exit_code``: 0 something fits (or no budget and a row was
measured), 1 nothing fits, 2 no row could be estimated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Pick:
    """One row as the verdict sees it; ``*_ratio`` against the baseline (None without one)."""

    label: str
    memory_bytes: int
    seconds: float | None
    memory_ratio: float | None = None
    time_ratio: float | None = None
    host_bytes: int | None = None


@dataclass(frozen=True)
class Verdict:
    """The picks, what fits a budget, and the exit code a CI job gates on.

    Example:
        >>> rows = [
        ...     {"label": "baseline", "strategy": "baseline", "status": "ok",
        ...      "peak_bytes": 100, "step_seconds": 1.0},
        ...     {"label": "gc", "strategy": "gc", "status": "ok",
        ...      "peak_bytes": 50, "step_seconds": 1.3},
        ... ]
        >>> v = choose(rows, budget=60)
        >>> v.lowest_memory.label, v.fastest.label, v.best_trade.label, v.exit_code
        ('gc', 'gc', 'gc', 0)
    """

    baseline: Pick | None
    lowest_memory: Pick | None
    fastest: Pick | None
    best_trade: Pick | None
    measured: int
    time_source: str  # "measured" or "predicted"
    memory_source: str
    budget: int | None = None
    fitting: list[str] = field(default_factory=list)
    exit_code: int = 0


def memory_figure(row: dict[str, Any]) -> tuple[int | None, str]:
    """The device memory a row needs, and which field gave it.

    The device's own figure when there is one (NVML's per-process or whole-device use on a GPU,
    the estimate's predicted device memory: reserved + CUDA context), else the allocator peak
    (``peak_bytes``: the cpu backend, or an estimate without device fields), as `velora tune`
    compares a budget with.
    """
    for key in ("process_used_bytes", "device_used_bytes", "predicted_device_bytes", "peak_bytes"):
        if row.get(key) is not None:
            return int(row[key]), key
    return None, "none"


def row_seconds(row: dict[str, Any]) -> tuple[float | None, str]:
    """The row's step time and whether it was ``measured`` or ``predicted``."""
    if row.get("step_seconds"):
        return float(row["step_seconds"]), "measured"
    if row.get("predicted_step_seconds"):
        return float(row["predicted_step_seconds"]), "predicted"
    return None, "none"


def _pick(row: dict[str, Any], base: dict[str, Any] | None) -> Pick:
    memory, _ = memory_figure(row)
    seconds, _ = row_seconds(row)
    mem_ratio = time_ratio = None
    if base is not None:
        base_memory, _ = memory_figure(base)
        base_seconds, _ = row_seconds(base)
        mem_ratio = memory / base_memory if base_memory else None
        time_ratio = seconds / base_seconds if seconds and base_seconds else None
    return Pick(row["label"], memory, seconds, mem_ratio, time_ratio, row.get("host_bytes"))


def _pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def key(r):
        return memory_figure(r)[0], row_seconds(r)[0] or float("inf")

    front = []
    for row in rows:
        m, t = key(row)
        dominated = any((om <= m and ot <= t) and (om < m or ot < t) for om, ot in map(key, rows))
        if not dominated:
            front.append(row)
    return front


def choose(rows: list[dict[str, Any]], budget: int | None = None) -> Verdict:
    """The verdict on a profile's rows (see the module docstring).

    Args:
        rows: the profile document's rows.
        budget: device memory in bytes, or None.

    Returns:
        The `Verdict`.
    """
    ok = [r for r in rows if r.get("status") == "ok" and memory_figure(r)[0] is not None]
    sources = {memory_figure(r)[1] for r in ok}
    times = {row_seconds(r)[1] for r in ok} - {"none"}
    memory_source = sources.pop() if len(sources) == 1 else "mixed"
    time_source = "measured" if times == {"measured"} else "predicted" if times else "none"
    if not ok:
        return Verdict(None, None, None, None, 0, time_source, memory_source, budget, [], 2)
    base_row = next((r for r in ok if r.get("strategy") == "baseline"), None)
    fitting = ok if budget is None else [r for r in ok if memory_figure(r)[0] <= budget]
    # ties on memory go to the faster row
    lowest = min(ok, key=lambda r: (memory_figure(r)[0], row_seconds(r)[0] or float("inf")))
    timed = [r for r in fitting if row_seconds(r)[0] is not None]
    fastest = min(timed, key=lambda r: row_seconds(r)[0]) if timed else None
    trade = None
    if timed:
        reference = base_row or lowest

        def score(r):
            m0, t0 = memory_figure(reference)[0], row_seconds(reference)[0] or 1.0
            return (memory_figure(r)[0] / m0) * (row_seconds(r)[0] / t0)

        trade = min(_pareto(timed), key=score)
    pick = lambda r: None if r is None else _pick(r, base_row)  # noqa: E731
    return Verdict(
        baseline=pick(base_row),
        lowest_memory=pick(lowest),
        fastest=pick(fastest),
        best_trade=pick(trade),
        measured=len(ok),
        time_source=time_source,
        memory_source=memory_source,
        budget=budget,
        fitting=[r["label"] for r in fitting] if budget is not None else [],
        exit_code=0 if fitting else 1,
    )
