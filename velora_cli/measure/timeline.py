"""The memory timeline of one training step, from the tracker's allocation trace.

`MemoryTracker(trace=True).trace` (an `AllocationTrace`) lists every allocation and free of the
tracked step in order. `compact` turns it into live bytes by category over the step, small
enough to keep in every row of a profile document (``row["timeline"]``), and `decode` reads it
back for plotting. Nothing here records anything: the trace is the only recorder.

What is kept: the stacked state (live bytes of each category, rounded as the tracker rounds)
before the first allocation event and after each one; the x axis is the event index (every
allocation or free one step, as PyTorch's memory_viz draws its timeline: a foreach optimizer
step is a handful of ops but hundreds of allocations). When the step has more states than
``max_points`` (≤ 2,000), the events are cut into equal buckets and each bucket keeps its lowest
and its highest total, in order: the drawn curve is the min/max envelope of the real one, and the
step's peak (the first highest total, which is the tracker's ``peak_bytes``) is always one of the
points, exactly.

Categories are the final roles of the storages (``AllocationTrace.categories``): an
AccumulateGrad buffer born as a backward temporary counts as ``grads`` all its life, as in the
row's ``peak_breakdown``; so the stacked state at the peak equals ``peak_breakdown``.

The saved form (``version`` 1), sizes in units of ``unit`` bytes (the tracker's rounding, so
exact)::

    {"version": 1, "unit": 512, "ops": 2125, "events": 1932, "points": 679,
     "categories": ["params", "buffers", "optimizer", "grads", "activations", "temporaries"],
     "x": "0 1*4 3 …",                          # event index of each point
     "series": {"params": "453700 0*678", …},   # live units of each category at each point
     "phases": [["forward", 0, 476], …],        # (name, first event, end event) in step order
     "peak": {"point": 212, "event": 475, "op": 583, "bytes": 1444990976,
              "phase": "backward", "breakdown": {"params": 232294400, …}},
     "micro_batches": {"traced": 1, "step": 1}, "bucket_events": 3}

Each sequence is delta-encoded, a run of equal deltas written ``d*n`` (a constant series is one
number and one run): a row's timeline takes a few kilobytes of JSON.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from velora_cli.measure.tracker import AllocationTrace

VERSION = 1
MAX_POINTS = 2000  # the most a saved timeline may hold (issue 15)
DEFAULT_POINTS = 600  # more than the pixels of a panel; a few kilobytes of JSON per row
# Stacking order, bottom first: what lives the whole step under what comes and goes.
STACK = ("params", "buffers", "optimizer", "grads", "activations", "temporaries")
_LEAF_OMIT = ("forward_backward",)  # a container of the per-micro-batch phases


def compact(
    trace: AllocationTrace,
    *,
    max_points: int = DEFAULT_POINTS,
    micro_batches: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The saved timeline of one traced step (the module docstring gives the format).

    Args:
        trace: the tracker's allocation trace of the step.
        max_points: at most this many points (4 ≤ max_points ≤ `MAX_POINTS`).
        micro_batches: (traced, in the step): the estimate traces two micro-batches of a step
            that may have more (every later one repeats the second exactly).

    Returns:
        The timeline as plain JSON data.

    Raises:
        ValueError: ``max_points`` out of range, or a trace whose storages do not add up (a
            free of a storage that is not live, a category going negative).
    """
    if not 4 <= max_points <= MAX_POINTS:
        raise ValueError(f"max_points must be in [4, {MAX_POINTS}], got {max_points}")
    states = _states(trace)
    totals = [sum(s) for s in states]
    peak = max(range(len(totals)), key=lambda i: (totals[i], -i))  # the first highest
    keep = thin(totals, max_points)
    phases = _leaf_phases(trace)
    unit = trace.round_to
    return {
        "version": VERSION,
        "unit": unit,
        "ops": trace.ops,
        "events": len(trace.events),
        "points": len(keep),
        "categories": list(STACK),
        "x": _encode(keep),
        "series": {c: _encode([states[i][k] // unit for i in keep]) for k, c in enumerate(STACK)},
        "phases": [[name, start, end] for name, start, end in phases],
        "peak": {
            "point": keep.index(peak),
            "event": peak,
            "op": trace.events[peak - 1][0] if peak else 0,
            "bytes": totals[peak],
            "phase": next((n for n, s, e in phases if s < peak <= e), None),
            "breakdown": dict(zip(STACK, states[peak], strict=True)),
        },
        "micro_batches": None
        if micro_batches is None
        else {"traced": micro_batches[0], "step": micro_batches[1]},
        "bucket_events": bucket_width(len(totals), max_points)
        if len(totals) > max_points
        else None,
    }


def decode(timeline: dict[str, Any]) -> dict[str, Any]:
    """Read a saved timeline back: event positions and bytes per category at each point.

    Args:
        timeline: ``row["timeline"]`` of a profile document.

    Returns:
        {"x": [event index], "series": {category: [bytes]}, "totals": [bytes]} plus the saved
        ``categories``, ``phases``, ``peak``, ``ops``, ``events``, ``micro_batches`` and
        ``bucket_events`` unchanged.

    Raises:
        ValueError: an unknown version, or sequences of different lengths.
    """
    if timeline.get("version") != VERSION:
        raise ValueError(
            f"timeline version {timeline.get('version')!r} is not {VERSION}: re-run the profile "
            "with this velora"
        )
    unit = timeline["unit"]
    x = _decode(timeline["x"])
    series = {c: [v * unit for v in _decode(timeline["series"][c])] for c in timeline["categories"]}
    if any(len(values) != len(x) for values in series.values()):
        raise ValueError("corrupt timeline: its series have different lengths")
    totals = [sum(values) for values in zip(*series.values(), strict=True)]
    keep = ("categories", "phases", "peak", "ops", "events", "micro_batches", "bucket_events")
    return {"x": x, "series": series, "totals": totals, **{k: timeline.get(k) for k in keep}}


# -- from the trace ------------------------------------------------------------------------------


def _states(trace: AllocationTrace) -> list[list[int]]:
    """Live rounded bytes by category (STACK order) before the first event and after each."""
    index = {c: k for k, c in enumerate(STACK)}
    live = [0] * len(STACK)
    for sid, nbytes in trace.initial:
        live[index[trace.categories[sid]]] += trace.rounded(nbytes)
    states = [list(live)]
    alive = {sid for sid, _ in trace.initial}
    for op, sid, nbytes in trace.events:
        k = index[trace.categories[sid]]
        if nbytes > 0:
            alive.add(sid)
            live[k] += trace.rounded(nbytes)
        else:
            if sid not in alive:
                raise ValueError(f"corrupt trace: storage {sid} freed at op {op} but not live")
            alive.discard(sid)
            live[k] -= trace.rounded(nbytes)
            if live[k] < 0:
                raise ValueError(f"corrupt trace: {STACK[k]} below zero at op {op}")
        states.append(list(live))
    return states


def thin(totals: list[int], max_points: int) -> list[int]:
    """Indices of the states to keep, in order: all of them when they fit, else per bucket of
    `bucket_width` states the first lowest and the first highest total, plus the first and the
    last state. The first highest total overall (the peak) is always kept.

    Args:
        totals: the total of each state.
        max_points: the most indices returned (≥ 4).

    Returns:
        Sorted indices into ``totals``.
    """
    if len(totals) <= max_points:
        return list(range(len(totals)))
    width = bucket_width(len(totals), max_points)
    keep = {0, len(totals) - 1}
    for start in range(0, len(totals), width):
        chunk = range(start, min(start + width, len(totals)))
        keep.add(min(chunk, key=lambda i: (totals[i], i)))
        keep.add(max(chunk, key=lambda i: (totals[i], -i)))
    return sorted(keep)


def bucket_width(states: int, max_points: int) -> int:
    """How many states `thin` puts in one bucket (two points each; the first and last state
    join them)."""
    return -(-states // ((max_points - 2) // 2))


def _leaf_phases(trace: AllocationTrace) -> list[tuple[str, int, int]]:
    """The step's innermost phases in order (forward and backward per micro-batch, numbered
    when there are several; optimizer; zero_grad) as (name, start, end) event ranges: the
    states after the events start..end-1 are the points start+1..end."""
    leaves = [(n, s, e) for n, s, e in trace.phases if n not in _LEAF_OMIT]
    counts = {n: sum(1 for m, _, _ in leaves if m == n) for n, _, _ in leaves}
    seen: dict[str, int] = {}
    out = []
    for name, start, end in leaves:
        seen[name] = seen.get(name, 0) + 1
        out.append((f"{name} {seen[name]}" if counts[name] > 1 else name, start, end))
    return out


# -- encoding ------------------------------------------------------------------------------------


def _encode(values: list[int]) -> str:
    """``v0 d1 d2 …`` with runs of an equal delta written ``d*n``."""
    if not values:
        return ""
    deltas = [values[0]] + [b - a for a, b in zip(values, values[1:], strict=False)]
    tokens: list[str] = []
    i = 0
    while i < len(deltas):
        j = i
        while j + 1 < len(deltas) and deltas[j + 1] == deltas[i] and i > 0:
            j += 1
        n = j - i + 1
        tokens.append(f"{deltas[i]}*{n}" if n > 1 else str(deltas[i]))
        i = j + 1
    return " ".join(tokens)


def _decode(text: str) -> list[int]:
    deltas: list[int] = []
    for token in text.split():
        value, _, count = token.partition("*")
        deltas.extend([int(value)] * (int(count) if count else 1))
    out, running = [], 0
    for d in deltas:
        running += d
        out.append(running)
    return out
