"""From three shallow steps to the deep one: the estimate's depth extrapolation, exact or refused.

A step over a stack of identical blocks is the same sequence of ops at every depth, with the
block part repeated. Memory at a fixed point of that sequence is affine in the depth: a point
inside block j holds the parameters, gradients and optimizer state of every block (d times one
block's), the activations of the blocks below (j times), the gradients of the blocks above in
backward ((d−1−j) times) and what is local to the point. Between blocks (embeddings, head, loss,
the foreach optimizer ops over all parameters) a point sits at the same place at every depth.

So a peak is a maximum over lines in d, and a maximum of lines is not a line: a point that is
highest at 2, 3 and 4 blocks can be overtaken at 32 by one that grows faster (the loss at small
depth, the end of backward at large depth). Checking that three peaks lie on a line does not
exclude that. This module therefore extrapolates the whole curve, point by point
(`memory_at_depth`):

- the logs of the three depths (`PositionLog`, from `depth.PositionTracker` + `BlockMarks`) are cut
  into gaps (points outside blocks) and passes (forward, backward, a per-parameter optimizer:
  points inside blocks, grouped in units of ``period`` blocks, the checkpointing interval), and
  aligned across depths: same
  gaps with the same number of points in the same phases, and every unit after the first with
  the same number of points (the first unit may differ, e.g. LoRA's first block computes no
  input gradient);
- a gap point and a first-unit point must be exactly affine in the depth over the three depths;
- a point p of unit u ≥ 1 at depth m (in units) must be exactly α + β·u + γ·m over all six
  (u, m) the three depths give (2, 3, 4 units: u = 1 | 1, 2 | 1, 2, 3): the maximum over u at the
  real depth M is then at u = 1 or u = M − 1;
- the peak at M is the maximum over all these points, ties going to the earliest (the tracker
  keeps the first point that reaches its peak); its breakdown by category is extrapolated from
  the same point at the three depths (exactly affine again, summing to the peak).

Everything else in a row (`fields_at_depth`) is one number per run and affine in depth where it
counts something per block (saved activations, parameters, wrapped layers, per-pattern bytes):
extrapolated when its three integer values are exactly affine (a float only when it is equal),
copied when equal (strings, flags), refused otherwise. A refusal is a reason string: the caller
runs the real depth instead. Plain data in, plain data out: no torch here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# The row fields `memory_at_depth` gives (the rest go through `fields_at_depth`).
MEMORY_FIELDS = (
    "peak_bytes",
    "peak_phase",
    "fwd_bwd_peak_bytes",
    "optimizer_peak_bytes",
    "peak_breakdown",
)
# Row fields that must come from the real step: a row carrying one is not extrapolated. For a
# field computed as a maximum over the step from its trace (an allocator simulation's reserved
# peak, say), three values on a line do not exclude a faster-growing point deeper down (see
# above); a sum over the step's ops (bytes moved, roofline seconds) is affine and needs nothing.
FULL_DEPTH_FIELDS: set[str] = set()
# The phases whose peaks a row reports, in the order the step enters them (observe.tracked_step).
ROW_PHASES = ("forward_backward", "optimizer")


class NotExtrapolable(Exception):
    """Raised inside this module with the reason; callers get the reason string."""


@dataclass
class PositionLog:
    """The labelled memory curve of one step at one depth.

    Args:
        depth: blocks in the stack.
        points: ``(label, phases, live_bytes, events)`` per tracker check
            (`depth.PositionTracker.log`).
        breakdown_at: events -> bytes by category after that many trace events.
    """

    depth: int
    points: list[tuple[tuple, tuple[str, ...], int, int]]
    breakdown_at: Callable[[int], dict[str, int]]


# -- cutting a log into gaps and passes ---------------------------------------------------------


@dataclass
class _Gap:
    points: list[int] = field(default_factory=list)


@dataclass
class _Pass:
    direction: str  # "fwd" | "bwd" | "opt" (a per-parameter optimizer, blocks ascending)
    blocks: dict[int, list[int]] = field(default_factory=dict)

    def units(self, period: int) -> list[list[int]]:
        """Point indices per unit of ``period`` blocks, unit 0 first, each in time order."""
        count = len(self.blocks) // period
        out = []
        for u in range(count):
            js = range(u * period, (u + 1) * period)
            js = reversed(js) if self.direction == "bwd" else js
            out.append([i for j in js for i in self.blocks[j]])
        return out


def _segments(log: PositionLog) -> list[_Gap | _Pass]:
    depth = log.depth
    segments: list[_Gap | _Pass] = []
    last_block: int | None = None
    for i, (label, _, _, _) in enumerate(log.points):
        kind = label[0]
        direction = None
        if kind == "fwd" or (kind == "fwd_after" and label[1] < depth - 1):
            direction = "fwd"
        elif kind in ("bwd", "opt"):
            direction = kind
        if direction is None:
            if not segments or not isinstance(segments[-1], _Gap):
                segments.append(_Gap())
            segments[-1].points.append(i)
            continue
        j = label[1]
        current = segments[-1] if segments else None
        if not isinstance(current, _Pass) or current.direction != direction:
            current = _Pass(direction)
            segments.append(current)
            last_block = None
        if last_block is not None and (j > last_block if direction == "bwd" else j < last_block):
            raise NotExtrapolable(f"blocks ran out of order in a {direction} pass")
        last_block = j
        current.blocks.setdefault(j, []).append(i)
    for s in segments:
        if isinstance(s, _Pass) and sorted(s.blocks) != list(range(depth)):
            raise NotExtrapolable(f"a {s.direction} pass did not go through every block")
    return segments


# -- lines -------------------------------------------------------------------------------------


def _line_at(xs: Sequence[int], ys: Sequence[int], x: int, what: str) -> int:
    """The value at ``x`` of the line through three exactly collinear integer points."""
    rise, run = ys[1] - ys[0], xs[1] - xs[0]
    if (ys[2] - ys[1]) * run != rise * (xs[2] - xs[1]):  # integers: exact
        raise NotExtrapolable(f"{what} is not affine in depth ({', '.join(map(str, ys))})")
    step, rest = divmod(rise * (x - xs[0]), run)
    if rest:
        raise NotExtrapolable(f"{what} extrapolates to a fraction of a byte")
    return ys[0] + step


@dataclass(frozen=True)
class _Point:
    """A point of the curve at the real depth: its value, when it comes, where it is."""

    value: int
    time: tuple[int, int, int]  # (segment, unit in processing order, point in unit)
    phases: tuple[str, ...]
    # ("at", segment, point) | ("at-unit0" | "at-unitlast", segment, point) |
    # ("unit", segment, "first" | "last" | "last-edge", point, whether the pass has an edge)
    where: tuple


def _aligned(logs: list[PositionLog], period: int) -> list[list[_Gap | _Pass]]:
    cut = [_segments(log) for log in logs]
    shapes = {tuple(type(s).__name__ + getattr(s, "direction", "") for s in c) for c in cut}
    if len(shapes) != 1:
        raise NotExtrapolable("the step's phases and passes differ between depths")
    return cut


def _phases(log: PositionLog, points: list[int]) -> list[tuple[str, ...]]:
    return [log.points[i][1] for i in points]


def memory_points(
    logs: list[PositionLog], depth: int, period: int, *, edges: bool = False
) -> list[_Point]:
    """Every point of the step's memory curve at ``depth`` blocks, from the three ``logs``.

    Raises:
        NotExtrapolable: the logs do not align, or a point is not affine (module docstring).
    """
    if depth % period or any(log.depth % period for log in logs):
        raise NotExtrapolable(f"the depths are not multiples of the period {period}")
    ms = [log.depth // period for log in logs]
    big_m = depth // period
    if ms[0] < 2 or ms[1] < 3 or big_m <= ms[-1]:
        raise NotExtrapolable("the shallow depths must be at least 2 and 3 units, below the real")
    cut = _aligned(logs, period)
    points: list[_Point] = []
    for s, segs in enumerate(zip(*cut, strict=True)):
        if isinstance(segs[0], _Gap):
            sizes = {len(g.points) for g in segs}
            if len(sizes) != 1:
                raise NotExtrapolable(f"the step outside blocks differs between depths ({sizes})")
            for p in range(len(segs[0].points)):
                idx = [g.points[p] for g in segs]
                phases = {log.points[i][1] for log, i in zip(logs, idx, strict=True)}
                if len(phases) != 1:
                    raise NotExtrapolable("a point outside blocks changed phase with depth")
                ys = [log.points[i][2] for log, i in zip(logs, idx, strict=True)]
                value = _line_at(ms, ys, big_m, "the memory at a point outside blocks")
                points.append(_Point(value, (s, 0, p), phases.pop(), ("at", s, p)))
            continue
        points += _pass_points(logs, segs, s, ms, big_m, period, edges)
    return points


def _pass_points(logs, passes, s, ms, big_m, period, edges=False) -> list[_Point]:
    direction = passes[0].direction
    units = [ps.units(period) for ps in passes]
    out: list[_Point] = []
    # edges: a pass whose last unit differs from the middle ones (an engine that looks one
    # unit ahead: FSDP2's backward prefetch) gets that unit's points as unit 0's, at a fixed
    # place at every depth, and the middle units 1 … m − 2 their planes from (1, 3), (1, 4),
    # (2, 4) units (the caller checks the result against the synthesized trace)
    body_sizes = {len(us[u]) for us, m in zip(units, ms, strict=True) for u in range(1, m)}
    edge = edges and len(body_sizes) > 1 and ms[1] >= 3
    if edge:
        if len({len(us[-1]) for us in units}) != 1:
            raise NotExtrapolable("the last block unit differs between depths")
        for p in range(len(units[0][-1])):
            idx = [us[-1][p] for us in units]
            phases = {log.points[i][1] for log, i in zip(logs, idx, strict=True)}
            if len(phases) != 1:
                raise NotExtrapolable("a point of the last block changed phase with depth")
            ys = [log.points[i][2] for log, i in zip(logs, idx, strict=True)]
            value = _line_at(ms, ys, big_m, "the memory at a point of the last block")
            where = ("at-unitlast", s, p)
            order = 0 if direction == "bwd" else big_m - 1  # processing order of unit M - 1
            out.append(_Point(value, (s, order, p), phases.pop(), where))

    def rank(u: int, m: int) -> int:  # processing order of unit u among m units
        return m - 1 - u if direction == "bwd" else u

    # unit 0: a fixed place at every depth
    if len({len(us[0]) for us in units}) != 1:
        raise NotExtrapolable("the first block unit differs between depths")
    for p in range(len(units[0][0])):
        idx = [us[0][p] for us in units]
        phases = {log.points[i][1] for log, i in zip(logs, idx, strict=True)}
        if len(phases) != 1:
            raise NotExtrapolable("a point of the first block changed phase with depth")
        ys = [log.points[i][2] for log, i in zip(logs, idx, strict=True)]
        value = _line_at(ms, ys, big_m, "the memory at a point of the first block")
        out.append(_Point(value, (s, rank(0, big_m), p), phases.pop(), ("at-unit0", s, p)))
    # units 1..m-1 (1..m-2 with edges): one plane per point
    top = 1 if edge else 0
    body = [
        (u, m, log, us[u])
        for log, us, m in zip(logs, units, ms, strict=True)
        for u in range(1, m - top)
    ]
    sizes = {len(b[3]) for b in body}
    if len(sizes) != 1:
        raise NotExtrapolable(f"block units have different op counts ({sorted(sizes)})")
    for p in range(sizes.pop()):
        samples = {(u, m): log.points[pts[p]][2] for u, m, log, pts in body}
        phases = {log.points[pts[p]][1] for _, _, log, pts in body}
        if len(phases) != 1:
            raise NotExtrapolable("a point inside blocks changed phase with depth")
        beta, at = _plane(samples, ms[1:] if edge else ms)
        if beta > 0 or (beta == 0 and direction == "bwd"):
            u, which = big_m - 1 - top, "last-edge" if edge else "last"
        else:
            u, which = 1, "first"
        out.append(
            _Point(at(u, big_m), (s, rank(u, big_m), p), phases.pop(), ("unit", s, which, p, edge))
        )
    return out


def _plane(samples: dict[tuple[int, int], int], ms: list[int]):
    """(β, value(u, m)) with value = α + β·u + γ·m exactly at every sample, or NotExtrapolable.

    The plane through (1, m1), (1, m2), (2, m2), the other samples checking it; in integers
    scaled by m2 − m1, so that every comparison is exact.
    """
    m1, m2 = ms[0], ms[1]
    den = m2 - m1
    gamma = samples[(1, m2)] - samples[(1, m1)]  # γ·den
    beta = samples[(2, m2)] - samples[(1, m2)]  # β
    alpha = den * (samples[(1, m1)] - beta) - gamma * m1  # α·den
    for (u, m), value in samples.items():
        if alpha + den * beta * u + gamma * m != den * value:
            raise NotExtrapolable("the memory inside blocks is not affine in block and depth")

    def at(u: int, m: int) -> int:
        value, rest = divmod(alpha + den * beta * u + gamma * m, den)
        if rest:
            raise NotExtrapolable("a point inside blocks extrapolates to a fraction of a byte")
        return value

    return beta, at


def _log_index(logs, cut, where, k: int, period: int) -> int:
    """The point of log k that ``where`` (a `_Point.where`) names."""
    kind, s = where[0], where[1]
    seg = cut[k][s]
    if kind == "at":
        return seg.points[where[2]]
    units = seg.units(period)
    if kind == "at-unit0":
        return units[0][where[2]]
    if kind == "at-unitlast":
        return units[-1][where[2]]
    u = {"first": 1, "last": len(units) - 1, "last-edge": len(units) - 2}[where[2]]
    return units[u][where[3]]


def memory_at_depth(
    logs: list[PositionLog], depth: int, period: int, *, edges: bool = False
) -> dict[str, Any]:
    """The row's memory fields (`MEMORY_FIELDS`) at ``depth`` blocks, from three shallow logs.

    Args:
        logs: the step at three depths, ascending, of 2, 3 and 4 (or more) units.
        depth: the real number of blocks (a multiple of ``period``).
        period: blocks per unit (the checkpointing interval, else 1).
        edges: a pass whose last unit differs from the middle ones is extrapolated with that
            unit apart (`_pass_points`); only where the caller checks the result otherwise.

    Returns:
        ``peak_bytes``, ``peak_phase``, ``fwd_bwd_peak_bytes``, ``optimizer_peak_bytes`` and
        ``peak_breakdown`` as the tracker would report them at ``depth``.

    Raises:
        NotExtrapolable: with the reason (the caller runs the real depth).
    """
    points = memory_points(logs, depth, period, edges=edges)
    if not points:
        raise NotExtrapolable("no memory points were logged")
    top = max(points, key=lambda pt: (pt.value, [-t for t in pt.time]))
    cut = [_segments(log) for log in logs]
    ms = [log.depth // period for log in logs]
    if top.where[0] == "unit" and top.where[4]:
        breakdown = _edge_breakdown(logs, cut, top.where, ms, depth // period, period)
    else:
        parts: dict[str, list[int]] = {}
        for k, log in enumerate(logs):
            events = log.points[_log_index(logs, cut, top.where, k, period)][3]
            for name, nbytes in log.breakdown_at(events).items():
                parts.setdefault(name, []).append(nbytes)
        breakdown = {
            name: _line_at(ms, ys, depth // period, f"{name} at the peak")
            for name, ys in parts.items()
        }
    if sum(breakdown.values()) != top.value:
        raise NotExtrapolable("the extrapolated breakdown does not sum to the peak")
    return {"peak_bytes": top.value, **_phase_fields(points), "peak_breakdown": breakdown}


def _edge_breakdown(logs, cut, where, ms: list[int], big_m: int, period: int) -> dict[str, int]:
    """The breakdown at a peak inside a middle unit of a pass whose last unit has its own
    points (`_pass_points` with an edge): each category's bytes at that point, on the plane
    through the middle units (1, 3), (1, 4), (2, 4) as the point's value is (the shallowest
    depth has no middle unit: its units 0 and 1 are the first and the last)."""
    _, s, which, p, _ = where
    samples: dict[str, dict[tuple[int, int], int]] = {}
    for log, segs, m in zip(logs, cut, ms, strict=True):
        units = segs[s].units(period)
        for u in range(1, m - 1):
            events = log.points[units[u][p]][3]
            for name, nbytes in log.breakdown_at(events).items():
                samples.setdefault(name, {})[(u, m)] = nbytes
    u = 1 if which == "first" else big_m - 2
    out = {}
    for name, values in samples.items():
        _, at = _plane(values, ms[1:])
        out[name] = at(u, big_m)
    return out


def _phase_fields(points) -> dict[str, Any]:
    peaks = {}
    for name in ROW_PHASES:
        values = [pt.value for pt in points if name in pt.phases]
        if values:
            peaks[name] = max(values)
    return {
        "peak_phase": max(peaks, key=peaks.get) if peaks else None,
        "fwd_bwd_peak_bytes": peaks.get("forward_backward"),
        "optimizer_peak_bytes": peaks.get("optimizer"),
    }


def memory_of_log(log: PositionLog) -> dict[str, Any]:
    """The same fields at the log's own depth, straight from its points (a self-check: they must
    equal what the tracker reported for that run)."""
    points = [
        _Point(value, (i, 0, 0), phases, ("at", i, 0))
        for i, (_, phases, value, _) in enumerate(log.points)
    ]
    top_index = max(range(len(points)), key=lambda i: (points[i].value, -i))
    return {
        "peak_bytes": points[top_index].value,
        **_phase_fields(points),
        "peak_breakdown": log.breakdown_at(log.points[top_index][3]),
    }


# -- every other field -------------------------------------------------------------------------


def fields_at_depth(
    rows: list[dict[str, Any]], depths: Sequence[int], depth: int, skip: Sequence[str] = ()
) -> dict[str, Any]:
    """The row fields at ``depth`` from rows at three ``depths`` (module docstring's rule).

    Args:
        rows: one row per depth, same keys.
        depths: their depths, ascending.
        depth: the real depth.
        skip: fields left out (those `memory_at_depth` gives).

    Returns:
        The extrapolated fields, in the first row's order.

    Raises:
        NotExtrapolable: a field whose values are neither equal nor affine (the reason names it).
    """
    keys = list(rows[0])
    if any(list(row) != keys for row in rows[1:]):
        raise NotExtrapolable("the rows have different fields at different depths")
    needs_real = [key for key in keys if key in FULL_DEPTH_FIELDS]
    if needs_real:
        raise NotExtrapolable(f"{needs_real[0]} needs the real step")
    return {
        key: _value_at([row[key] for row in rows], depths, depth, key)
        for key in keys
        if key not in skip
    }


def _value_at(values: list[Any], depths: Sequence[int], depth: int, what: str) -> Any:
    first = values[0]
    if all(isinstance(v, bool) or v is None or isinstance(v, str) for v in values):
        if any(v != first or type(v) is not type(first) for v in values):
            raise NotExtrapolable(f"{what} changes with depth ({values})")
        return first
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return _line_at(depths, values, depth, what)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return _float_at([float(v) for v in values], depths, depth, what)
    if all(isinstance(v, dict) for v in values):
        return _dict_at(values, depths, depth, what)
    if any(v != first for v in values):
        raise NotExtrapolable(f"{what} changes with depth")
    return first


def _dict_at(values: list[dict], depths: Sequence[int], depth: int, what: str) -> dict:
    """Entry by entry. A dict sorted largest first at every depth (bytes per module pattern,
    sorted stably from the order modules first saved something) is sorted again at ``depth``;
    entries tied there keep their order at the deepest run if they were tied at every depth
    (that order is then the underlying one), else the order is unknown and it is refused."""
    keys = list(values[-1])
    if any(set(v) != set(keys) for v in values):
        raise NotExtrapolable(f"{what} has different entries at different depths")
    out = {k: _value_at([v[k] for v in values], depths, depth, f"{what}[{k}]") for k in keys}
    if not all(_descending(v) for v in values):
        if any(list(v) != keys for v in values):
            raise NotExtrapolable(f"{what} changes its order with depth")
        return out
    ordered = sorted(out.items(), key=lambda kv: -kv[1])  # stable: deepest run's order in ties
    for (a, va), (b, vb) in zip(ordered, ordered[1:], strict=False):
        if va == vb and any(v[a] != v[b] for v in values):
            raise NotExtrapolable(f"{what}: {a} and {b} tie only at the real depth")
    return dict(ordered)


def _descending(mapping: dict) -> bool:
    values = list(mapping.values())
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return False
    return all(a >= b for a, b in zip(values, values[1:], strict=False))


def _float_at(ys: list[float], xs: Sequence[int], x: int, what: str) -> float:
    # A float computed from the real step need not equal one extrapolated from three (rounding):
    # copied when it does not change with depth, else the real depth runs. (The roofline's
    # times are not extrapolated: they are computed from the synthesized op counts.)
    if any(y != ys[0] for y in ys):
        raise NotExtrapolable(f"{what} changes with depth, a float not extrapolated exactly")
    return ys[0]
