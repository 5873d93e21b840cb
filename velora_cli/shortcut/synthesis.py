"""The deep step from three shallow ones: its allocation trace and its op counts, op for op.

A step over a stack of identical blocks is one sequence of ops at every depth, with the part of
each block repeated (`measure.extrapolate` says why). `synthesize` writes that sequence out at
the real depth from the same step recorded at three shallow depths (`step_record.StepRecord`:
2, 3 and 4 units of ``period`` blocks, the checkpointing interval), with every allocation and
free in it, and returns what the real step's tracker and op counter would have returned: an
`AllocationTrace` equal to the real one (the same storages in the same order, so the same
ids; the same ops, op names, events and phases) and `StepCounts` equal to the real ones. Every
field computed from them (peaks, the allocator replay, the timeline, the roofline's time) is
then the real step's, computed by the functions the real step uses.

How, and what is checked (anything else is refused with the reason, `NotExtrapolable`, and the
caller runs the real depth):

- A sequence whose items belong to units (ops by their block label, `depth.BlockMarks`; the
  storages alive at the start by the block they belong to; the allocations and frees one op
  makes by the storage's unit) is cut into runs (`cut`): items outside the stack, and sweeps
  through every unit in order, up (forward, a per-parameter optimizer, a foreach op's outputs
  in parameter order) or down (backward, a list freed last item first). The cuts must match at
  the three depths.
- An item outside the stack must be the same at the three depths; an item of unit 0 too; the
  items of units 1 … m − 1 must be the same in every such unit at every depth: that is the
  template written out M − 1 times at the real depth M. Items are compared whole: an op's name,
  phase and cost, and its allocations (size and final role) and frees.
- A free names its storage by where it was allocated (run, unit, position in the unit, event in
  the op), the unit said relative to the freeing unit (u + k), from the first (k) or from the last
  (m − 1 − k); only a way that holds at every depth and unit is kept, then applied at M.
- The one thing allowed to change with depth is the cost of a ``_foreach_*`` op outside the
  stack (an optimizer op over every parameter): its numbers (tensors, chunks, bytes, FLOPs)
  must lie exactly on a line in m, and its tensor list must be a fixed head, a part repeated
  once per unit, and a fixed tail at every depth, so that they are exactly affine (a
  single growing tensor, whose chunk count is a ceiling, would not be).
- Phases start and end at positions named the same way.

Plain data in, plain data out; no torch is run here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from velora_cli.measure.tracker import AllocationTrace
from velora_cli.shortcut.extrapolate import NotExtrapolable
from velora_cli.shortcut.record import OpsRecord, StepRecord
from velora_cli.timing.opcount import OpCost, Segment, StepCounts

OUT, UP, DOWN = "out", "up", "down"
_END = ("end",)  # the position after the last event


def op_unit(label: tuple, depth: int, period: int) -> int | None:
    """The unit of the stack an op with this `depth.BlockMarks` label ran for (None: outside).

    ``("fwd_after", j)`` is the stretch after block j's forward: inside the stack before the
    next block, outside after the last."""
    kind = label[0]
    if kind in ("fwd", "bwd", "opt") or (kind == "fwd_after" and label[1] < depth - 1):
        return label[1] // period
    return None


def cut(
    units: Sequence[int | None], m: int, *, partial: bool = False
) -> list[tuple[str, list[list[int]]]]:
    """A sequence labelled by unit (None: outside) cut into runs.

    Args:
        units: each item's unit.
        m: units in the stack.
        partial: a stretch of units that is not a whole sweep (an op outside the stack that
            frees the last block's output, say) joins the items outside; else it is refused.

    Returns:
        ``(OUT, [indices])`` for a stretch outside the stack, ``(UP | DOWN, per_unit)`` for a
        sweep through all ``m`` units, ``per_unit[u]`` the indices of unit u in order.

    Raises:
        NotExtrapolable: a stretch of units that is not a whole sweep in order.
    """
    runs: list[tuple[str, list[list[int]]]] = []
    sweep: list[list[int]] | None = None  # per unit, in visiting order
    seen: list[int] = []  # units of the open sweep, in visiting order

    def outside(indices: list[int]) -> None:
        if not runs or runs[-1][0] != OUT:
            runs.append((OUT, [[]]))
        runs[-1][1][0].extend(indices)

    def close() -> None:
        nonlocal sweep, seen
        if sweep is None:
            return
        if seen == list(range(m)):
            runs.append((UP, sweep))
        elif seen == list(range(m - 1, -1, -1)):
            runs.append((DOWN, sweep[::-1]))
        elif partial:
            outside([i for part in sweep for i in part])
        else:
            raise NotExtrapolable(f"a pass over the blocks is not whole and in order ({seen})")
        sweep, seen = None, []

    for i, u in enumerate(units):
        if u is None:
            close()
            outside([i])
            continue
        if sweep is not None and u != seen[-1]:
            step = u - seen[-1]
            going = None if len(seen) == 1 else seen[-1] - seen[-2]
            if abs(step) != 1 or (going is not None and step != going):
                close()  # the next sweep starts here
        if sweep is None:
            sweep, seen = [], []
        if not seen or u != seen[-1]:
            seen.append(u)
            sweep.append([])
        sweep[-1].append(i)
    close()
    return runs


def _order(kind: str, m: int) -> list[int]:
    """Units of a run in the order they come (one None for a run outside the stack)."""
    if kind == OUT:
        return [None]  # type: ignore[list-item]
    return list(range(m)) if kind == UP else list(range(m - 1, -1, -1))


# -- one shallow step, cut up ------------------------------------------------------------------


class _Shallow:
    """One recorded step cut into runs, with a position for every op, event and storage.

    Positions are depth-free names: an op ``(run, unit, index in its unit)`` (unit None outside
    the stack); an event of an op in the stack ``("op", run, unit, index, event)``, of an op
    outside ``("op", run, None, index, run in the op, unit, event in that run)``; a storage
    alive at the start ``("init", run, unit, index)``.
    """

    def __init__(self, ops: OpsRecord, record: StepRecord | None, depth: int,
                 period: int) -> None:  # fmt: skip
        self.m = depth // period
        labels, owners = ops.labels, ops.owners
        self.ops = ops if ops.sequence is not None else None
        # op 0: the stretch before the first op. An op outside the blocks' passes that reads a
        # block's storage first (AdamW reading each parameter's step counter) counts for it.
        self.units = [None] + [
            _div(owner, period) if unit is None else unit
            for unit, owner in zip((op_unit(label, depth, period) for label in labels), owners,
                                   strict=True)
        ]  # fmt: skip
        self.runs = cut(self.units, self.m, partial=True)
        self.trace = record.trace if record is not None else None
        if ops.sequence is not None and len(ops.sequence) != len(labels):
            raise NotExtrapolable("the op counter and the tracker saw different ops")
        self.slots: list[list[int]] = [[] for _ in self.units]
        self.event_runs: dict[int, list[tuple[str, list[list[int]]]]] = {}
        self.coord: dict[int, tuple] = {}  # storage id -> where it was allocated (or found)
        self.event_pos: list[tuple] = []
        if self.trace is not None:
            self._place(record, period)  # type: ignore[arg-type]

    def _place(self, record: StepRecord, period: int) -> None:
        trace = self.trace
        assert trace is not None
        unit: dict[int, int | None] = {}
        self.initial_runs = cut(
            [_div(record.initial_blocks.get(sid), period) for sid, _ in trace.initial], self.m
        )
        for r, (kind, parts) in enumerate(self.initial_runs):
            for u, part in zip(_order(kind, self.m), _parts(kind, parts, self.m), strict=True):
                for e, i in enumerate(part):
                    sid = trace.initial[i][0]
                    self.coord[sid] = ("init", r, u, e)
                    unit[sid] = u
        for index, (op, _, _) in enumerate(trace.events):
            if op >= len(self.slots):
                raise NotExtrapolable("the trace counts more ops than were recorded")
            self.slots[op].append(index)
        self.event_pos = [()] * len(trace.events)
        for r, (kind, parts) in enumerate(self.runs):
            for u, part in zip(_order(kind, self.m), _parts(kind, parts, self.m), strict=True):
                for i, k in enumerate(part):
                    self._place_slot(k, r, u, i, unit, record.aligned)

    def _place_slot(self, k: int, r: int, u, i: int, unit: dict, aligned: dict[int, int]) -> None:
        trace = self.trace
        events = self.slots[k]
        if u is not None:  # an op in the stack: its events belong to its unit
            for e, index in enumerate(events):
                _, sid, nbytes = trace.events[index]
                pos = ("op", r, u, i, e)
                self.event_pos[index] = pos
                if nbytes > 0:
                    self.coord[sid], unit[sid] = pos, u
            return
        owners = []
        for index in events:
            _, sid, nbytes = trace.events[index]
            if nbytes > 0:
                unit[sid] = unit.get(aligned[sid]) if sid in aligned else None
            owners.append(unit.get(sid))
        runs = cut(owners, self.m, partial=True)
        self.event_runs[k] = runs
        for r2, (kind, parts) in enumerate(runs):
            for u2, part in zip(_order(kind, self.m), _parts(kind, parts, self.m), strict=True):
                for e, j in enumerate(part):
                    index = events[j]
                    _, sid, nbytes = trace.events[index]
                    pos = ("op", r, None, i, r2, u2, e)
                    self.event_pos[index] = pos
                    if nbytes > 0:
                        self.coord[sid] = pos

    # -- descriptions to compare across depths and units -------------------------------------

    def event(self, index: int, context: int | None) -> tuple:
        """``("+", bytes, role)`` or ``("-", bytes, ways to name the storage)``."""
        _, sid, nbytes = self.trace.events[index]
        if nbytes > 0:
            return ("+", nbytes, self.trace.categories[sid])
        if sid not in self.coord:
            raise NotExtrapolable("a storage is freed that the step neither had nor allocated")
        pos = self.coord[sid]
        return ("-", nbytes, _names(pos, context, self.m, self.length(pos)))

    def length(self, pos: tuple) -> int | None:
        """Items in the unit part that holds ``pos`` (None: a position outside the stack)."""
        slot = _unit_slot(pos)
        if slot is None:
            return None
        if pos[0] == "init":
            return len(self.initial_runs[pos[1]][1][pos[2]])
        if slot == 2:
            return len(self.runs[pos[1]][1][pos[2]])
        k = self.runs[pos[1]][1][0][pos[3]]
        return len(self.event_runs[k][pos[4]][1][pos[5]])

    def op(self, k: int) -> tuple:
        """``(name, phase, micro, cost)`` of op k (0: the stretch before the first op)."""
        if k == 0:
            return (None, None, None, None)
        name = self.trace.op_names[k - 1] if self.trace is not None else "op"
        if self.ops is None:
            return (name, None, None, None)
        phase, micro, cost = self.ops.sequence[k - 1]
        return (name, phase, micro, cost)

    def boundary(self, index: int) -> frozenset:
        """Ways to name the position of event ``index`` (a phase starts or ends there)."""
        pos = self.event_pos[index] if index < len(self.event_pos) else _END
        return _names(pos, None, self.m, self.length(pos))


def _div(block: int | None, period: int) -> int | None:
    return None if block is None else block // period


def _parts(kind: str, parts: list[list[int]], m: int) -> list[list[int]]:
    """A run's index lists in the order `_order` gives their units."""
    return parts if kind != DOWN else parts[::-1]


def _unit_slot(pos: tuple) -> int | None:
    """Where a position holds its unit (None: it has none, outside the stack)."""
    if pos[0] == "init":  # an initial storage outside the stack has unit None (Adafactor
        return 2 if pos[2] is not None else None  # frees its RMS state of the norms, say)
    if pos[0] == "op" and len(pos) == 5:
        return 2
    if pos[0] == "op" and pos[5] is not None:
        return 5
    return None


def _names(pos: tuple, context: int | None, m: int, length: int | None) -> frozenset:
    """Ways to name ``pos`` from an event of unit ``context`` (None: outside) at ``m`` units.

    The unit: from the first, from the last, or relative to ``context``; the item in the unit
    part (of ``length`` items): counted from its start (≥ 0) or from its end (< 0), so that a
    reference into a first or last unit whose part is longer or shorter than the middle units'
    names the same item at every depth."""
    slot = _unit_slot(pos)
    if slot is None:
        return frozenset({("at", pos)})
    unit, index = pos[slot], pos[slot + 1]
    units = {"from_first": unit, "from_last": m - 1 - unit}
    if context is not None:
        units["relative"] = unit - context
    return frozenset(
        (way, (*pos[:slot], u, i, *pos[slot + 2 :]))
        for way, u in units.items()
        for i in (index, index - length)
    )


def _resolve(names: frozenset, context: int | None, m: int, length: Callable) -> tuple:
    """The position at ``m`` units that every remaining way of naming it gives (``length``:
    items in the unit part holding a position, at ``m`` units)."""
    found = set()
    for way, pos in names:
        if way != "at":
            slot = _unit_slot(pos)
            unit = pos[slot]
            if way == "from_last":
                unit = m - 1 - unit
            elif way == "relative":
                unit = context + unit
            pos = (*pos[:slot], unit, *pos[slot + 1 :])
            if pos[slot + 1] < 0:
                pos = (*pos[: slot + 1], pos[slot + 1] + length(pos), *pos[slot + 2 :])
        found.add(pos)
    if len(found) != 1:
        raise NotExtrapolable("a freed storage is named two ways that differ deeper down")
    return found.pop()


# -- templates: what every depth and unit agrees on ---------------------------------------------


def _same_events(samples: list[tuple], line: tuple | None = None) -> tuple:
    """One event's description agreed by all samples (frees: the ways that hold for all).

    ``line``: ``(ms, big_m)`` where the samples are one per depth, outside the stack, and a
    storage may grow with depth (`synthesize`'s ``grows``): the bytes it is allocated or freed
    with exactly affine in the units ``ms``, written out at ``big_m``."""
    first = samples[0]
    if line is not None and any(s[1] != first[1] for s in samples):
        if any(s[0] != first[0] for s in samples):
            raise NotExtrapolable("an allocation or free differs between depths or blocks")
        ms, big_m = line
        grown = _line_at(ms, [s[1] for s in samples], big_m, "a storage outside the blocks")
        samples = [(s[0], grown, *s[2:]) for s in samples]
        first = samples[0]
    if any(s[:2] != first[:2] for s in samples):
        raise NotExtrapolable("an allocation or free differs between depths or blocks")
    if first[0] == "+":
        if any(s[2] != first[2] for s in samples):
            raise NotExtrapolable("a storage's role differs between depths or blocks")
        return first
    names = first[2]
    for s in samples[1:]:
        names = names & s[2]
    if not names:
        raise NotExtrapolable("a freed storage cannot be named the same way at every depth")
    return ("-", first[1], names)


def _template_runs(
    instances: list[tuple[_Shallow, list[tuple[str, list[list[int]]]]]],
    item: Callable[[list[tuple[_Shallow, int, int | None]]], Any],
) -> list[tuple[str, list, list, list]]:
    """Runs agreed by every depth: ``(OUT, items, [], [])`` outside the stack, ``(UP | DOWN,
    first unit's items, a middle unit's, the last unit's)`` for a sweep.

    The first and the last unit have templates of their own (LoRA's first block computes no
    input gradient; the last block's backward starts from a gradient made outside the stack);
    the middle units 1 … m − 2 one between them, seen at (u, m) = (1, 3), (1, 4), (2, 4).

    Args:
        instances: (step, its runs) per depth.
        item: the template of one item from its samples (step, index, unit).
    """
    shapes = {tuple(kind for kind, _ in runs) for _, runs in instances}
    if len(shapes) != 1:
        raise NotExtrapolable("the runs of blocks differ between depths")
    out = []
    for r, (kind, _) in enumerate(instances[0][1]):
        if kind == OUT:
            parts = [(s, None, runs[r][1][0]) for s, runs in instances]
            out.append((OUT, _items(parts, item, "the step outside the blocks"), [], []))
            continue
        first = [(s, 0, runs[r][1][0]) for s, runs in instances]
        last = [(s, s.m - 1, runs[r][1][s.m - 1]) for s, runs in instances]
        middle = [(s, u, runs[r][1][u]) for s, runs in instances for u in range(1, s.m - 1)]
        if not middle:
            raise NotExtrapolable("no shallow depth has a block between the first and the last")
        out.append((
            kind,
            _items(first, item, "the first block"),
            _items(middle, item, "the blocks between the first and the last"),
            _items(last, item, "the last block"),
        ))  # fmt: skip
    return out


def _items(parts: list[tuple[_Shallow, int | None, list[int]]], item, what: str) -> list:
    """The templates of the items of one kind of unit, from every instance of it."""
    n = _one_length([part for _, _, part in parts], f"{what} differs between depths or blocks")
    return [item([(s, part[p], u) for s, u, part in parts]) for p in range(n)]


def _one_length(parts: list[list[int]], why: str) -> int:
    lengths = {len(p) for p in parts}
    if len(lengths) != 1:
        raise NotExtrapolable(f"{why} ({sorted(lengths)})")
    return lengths.pop()


class _Templates:
    """Everything the three shallow steps agree on, and what changes with depth (foreach costs
    outside the stack), evaluated at ``big_m`` units."""

    def __init__(self, steps: list[_Shallow], big_m: int, traced: bool,
                 grows: Sequence | None = None) -> None:  # fmt: skip
        self.steps, self.big_m, self.traced = steps, big_m, traced
        self.grows = grows  # `synthesize`'s: per step, the storage ids that may grow
        self.ms = [s.m for s in steps]
        self.ops = _template_runs([(s, s.runs) for s in steps], self._op)
        if traced:
            self.initial = _template_runs([(s, s.initial_runs) for s in steps], self._initial)
            names = [[name for name, _, _ in s.trace.phases] for s in steps]
            if any(n != names[0] for n in names):
                raise NotExtrapolable("the phases differ between depths")
            self.phases = [
                (name,
                 _agreed([s.boundary(s.trace.phases[p][1]) for s in steps], "a phase's start"),
                 _agreed([s.boundary(s.trace.phases[p][2]) for s in steps], "a phase's end"))
                for p, name in enumerate(names[0])
            ]  # fmt: skip

    def length_at(self, pos: tuple) -> int:
        """Items in the unit part that holds ``pos``, at ``big_m`` units."""
        slot = _unit_slot(pos)
        if pos[0] == "init":
            return len(_unit_items(self.initial[pos[1]], pos[2], self.big_m))
        if slot == 2:
            return len(_unit_items(self.ops[pos[1]], pos[2], self.big_m))
        op = self.ops[pos[1]][1][pos[3]]  # an op outside the stack
        return len(_unit_items(op[4][1][pos[4]], pos[5], self.big_m))

    def _initial(self, samples) -> tuple:
        descriptions = {
            (step.trace.initial[i][1], step.trace.categories[step.trace.initial[i][0]])
            for step, i, _ in samples
        }
        if len(descriptions) != 1:
            raise NotExtrapolable("the storages alive at the start differ between depths")
        return descriptions.pop()

    def _op(self, samples) -> tuple:
        heads = [step.op(k) for step, k, _ in samples]
        name, phase, micro, cost = heads[0]
        if any(h[:3] != heads[0][:3] for h in heads):
            raise NotExtrapolable(f"an op differs between depths or blocks ({name})")
        if any(h[3] != cost for h in heads):
            cost = self._growing_cost(samples, heads)
        slot = None
        if self.traced:
            slot = self._slot(samples)
        return (name, phase, micro, cost, slot)

    def _slot(self, samples) -> tuple:
        step0, k0, u0 = samples[0]
        if u0 is not None:  # an op in the stack: its events in order
            n = _one_length([s.slots[k] for s, k, _ in samples], "an op's events differ")
            return ("events", [
                _same_events([s.event(s.slots[k][e], u) for s, k, u in samples]) for e in range(n)
            ])  # fmt: skip
        instances = [(s, s.event_runs[k]) for s, k, _ in samples]
        slots = {id(s): s.slots[k] for s, k, _ in samples}

        def item(event_samples):
            line = None
            if self.grows and all(
                u is None and s.trace.events[slots[id(s)][j]][1] in self.grows[self.steps.index(s)]
                for s, j, u in event_samples
            ):
                line = ([s.m for s, _, _ in event_samples], self.big_m)  # one per depth
            return _same_events([s.event(slots[id(s)][j], u) for s, j, u in event_samples], line)

        return ("runs", _template_runs(instances, item))

    def _growing_cost(self, samples, heads) -> OpCost:
        """A foreach op's cost at ``big_m`` when it grows by whole units (module docstring)."""
        costs = [h[3] for h in heads]
        name = heads[0][0]
        steps = [s for s, _, u in samples]
        if samples[0][2] is not None or len({id(s) for s in steps}) != len(steps):
            raise NotExtrapolable(f"the cost of {name} differs between blocks")
        if not all(isinstance(c, OpCost) and c.kind == "foreach" for c in costs):
            raise NotExtrapolable(f"the cost of {name} changes with depth")
        fixed = {(c.kind, c.op, c.precision, c.lists, c.gemm) for c in costs}
        if len(fixed) != 1:
            raise NotExtrapolable(f"the cost of {name} changes with depth")
        columns = [s.ops.columns.get(k) for s, k, _ in samples]
        if any(c is None for c in columns) or not _repeats(columns, self.ms):
            raise NotExtrapolable(f"{name}'s tensors do not grow by whole blocks")
        values = {}
        for attr in ("flops", "bytes", "tensors", "chunks", "fresh_bytes"):
            values[attr] = _line_at(self.ms, [getattr(c, attr) for c in costs], self.big_m, name)
        return replace(costs[0], **values)


def _agreed(names: list[frozenset], what: str) -> frozenset:
    out = names[0]
    for n in names[1:]:
        out = out & n
    if not out:
        raise NotExtrapolable(f"{what} is not at the same place at every depth")
    return out


def _repeats(sequences: list[tuple], ms: list[int]) -> bool:
    """True when each sequence is head + body × m + tail, the same head, body and tail."""
    lengths = [len(s) for s in sequences]
    body, rest = divmod(lengths[1] - lengths[0], ms[1] - ms[0])
    if rest or body <= 0 or any(n != lengths[0] + body * (m - ms[0])
                                for n, m in zip(lengths, ms, strict=True)):  # fmt: skip
        return False
    fixed = lengths[0] - body * ms[0]
    if fixed < 0:
        return False
    first = sequences[0]
    # the head is a prefix and the tail a suffix of every sequence: only head lengths h with
    # h ≤ their longest common prefix and fixed − h ≤ their longest common suffix can hold
    # (each h tried below builds whole sequences; the range is usually one or two values)
    prefix = _common_length(sequences, fixed)
    suffix = _common_length([s[::-1] for s in sequences], fixed)
    for h in range(max(0, fixed - suffix), min(fixed, prefix) + 1):
        head, unit, tail = first[:h], first[h : h + body], first[h + body * ms[0] :]
        if all(s == head + unit * m + tail for s, m in zip(sequences, ms, strict=True)):
            return True
    return False


def _common_length(sequences: list[tuple], limit: int) -> int:
    """How many leading items all ``sequences`` share, up to ``limit``."""
    first = sequences[0]
    n = 0
    while n < limit and all(n < len(s) and s[n] == first[n] for s in sequences):
        n += 1
    return n


def _line_at(xs: Sequence[int], ys: Sequence[int], x: int, what: str) -> int:
    rise, run = ys[1] - ys[0], xs[1] - xs[0]
    if (ys[2] - ys[1]) * run != rise * (xs[2] - xs[1]):
        raise NotExtrapolable(f"the cost of {what} is not affine in depth")
    step, rest = divmod(rise * (x - xs[0]), run)
    if rest:
        raise NotExtrapolable(f"the cost of {what} extrapolates to a fraction")
    return ys[0] + step


# -- writing the deep step out -------------------------------------------------------------------


def _unit_items(run: tuple[str, list, list, list], u: int | None, m: int) -> list:
    """The items of unit ``u`` of a run template at ``m`` units."""
    _, first, middle, last = run
    return first if (u is None or u == 0) else last if u == m - 1 else middle


def _walk(runs: list[tuple[str, list, list, list]], m: int) -> Iterator[tuple]:
    """(run, unit, index in unit, item) of every item at ``m`` units, in order."""
    for r, (kind, first, middle, last) in enumerate(runs):
        for u in _order(kind, m):
            for i, item in enumerate(_unit_items((kind, first, middle, last), u, m)):
                yield r, u, i, item


def synthesize(
    records: list[StepRecord],
    depth: int,
    period: int,
    *,
    trace: bool = True,
    grows: Sequence | None = None,
) -> tuple[AllocationTrace | None, StepCounts | None, StepCounts | None]:
    """The trace and counts of the step at ``depth`` blocks from three shallow records.

    Args:
        records: the step at three depths, ascending, of 2, 3 and 4 (or more) units.
        depth: the real number of blocks, a multiple of ``period``.
        period: blocks per unit.
        trace: write the allocation trace out (False: the op counts only).
        grows: per record, the ids of the storages (in its trace) that may grow with depth:
            allocated and freed by ops outside the stack, their bytes exactly affine in the
            units (DDP's flat copy of every module buffer, `parallel.rank_shortcut`, which
            checks that the real depth makes them so too). None: every storage the same at
            every depth.

    Returns:
        (the `AllocationTrace` of the tracked step or None, its `StepCounts` or None when its
        ops were not counted, the `StepCounts` of the regular step counted apart or None).

    Raises:
        NotExtrapolable: with the reason (the caller runs the real depth).
    """
    big_m = depth // period
    ms = [r.depth // period for r in records]
    if depth % period or any(r.depth % period for r in records) or ms[0] < 2 or big_m <= ms[-1]:
        raise NotExtrapolable("the shallow depths must be whole units, at least 2, below the real")
    counted = records[0].ops.sequence is not None
    synthesized, counts = None, None
    if trace or counted:
        steps = [_Shallow(r.ops, r if trace else None, r.depth, period) for r in records]
        templates = _Templates(steps, big_m, traced=trace, grows=grows)
        synthesized, sequence = _write(templates, big_m, records[0].trace if trace else None)
        counts = _counts(sequence) if counted else None
    regular = None
    if records[0].regular is not None:
        shallow = [_Shallow(r.regular, None, r.depth, period) for r in records]
        _, regular_sequence = _write(_Templates(shallow, big_m, traced=False), big_m, None)
        regular = _counts(regular_sequence)
    return synthesized, counts, regular


def _write(templates: _Templates, m: int, like: AllocationTrace | None):
    """The op sequence (and with a trace, its events) at ``m`` units."""
    sequence: list[tuple[str, int | None, OpCost | None]] = []
    if like is None:
        for _, _, _, (name, phase, micro, cost, _) in _walk(templates.ops, m):
            if name is not None:
                sequence.append((phase, micro, cost))
        return None, sequence
    initial: list[tuple[int, int]] = []
    categories: dict[int, str] = {}
    where: dict[tuple, int] = {}  # position at m units -> storage id
    for r, u, i, (nbytes, role) in _walk(templates.initial, m):
        sid = len(categories)
        categories[sid] = role
        initial.append((sid, nbytes))
        where[("init", r, u, i)] = sid
    length = templates.length_at
    wanted: dict[tuple, list[frozenset]] = {}  # phase boundary at m units -> its names
    for _, start, end in templates.phases:
        for names in (start, end):
            wanted.setdefault(_resolve(names, None, m, length), []).append(names)
    marks: dict[frozenset, int] = {}
    events: list[tuple[int, int, int]] = []
    op_names: list[str] = []
    for k, (r, u, i, (name, phase, micro, cost, slot)) in enumerate(_walk(templates.ops, m)):
        if k:
            op_names.append(name)
            sequence.append((phase, micro, cost))
        if slot[0] == "events":
            placed = [(("op", r, u, i, e), u, ev) for e, ev in enumerate(slot[1])]
        else:
            placed = [(("op", r, None, i, r2, u2, e), u2, ev)
                      for r2, u2, e, ev in _walk(slot[1], m)]  # fmt: skip
        for pos, context, (sign, nbytes, extra) in placed:
            for names in wanted.get(pos, ()):
                marks.setdefault(names, len(events))
            if sign == "+":
                sid = len(categories)
                categories[sid] = extra
                where[pos] = sid
            else:
                sid = where.get(_resolve(extra, context, m, length))
                if sid is None:
                    raise NotExtrapolable("a free names no storage of the deep step")
            events.append((k, sid, nbytes))
    for names in wanted.get(_END, ()):
        marks[names] = len(events)
    if any(names not in marks for group in wanted.values() for names in group):
        raise NotExtrapolable("a phase boundary is not in the deep step")
    trace = AllocationTrace(
        initial=tuple(initial),
        events=tuple(events),
        categories=categories,
        phases=tuple((name, marks[start], marks[end]) for name, start, end in templates.phases),
        round_to=like.round_to,
        ops=len(op_names),
        op_names=tuple(op_names),
    )
    return trace, sequence


def _counts(sequence: list[tuple[str, int | None, OpCost | None]]) -> StepCounts:
    """`OpCounter.counts` of an op sequence: per (phase, micro) in first-seen order, each
    distinct cost with its count in first-seen order.

    The sequence repeats a few template costs once per unit, the same objects: they are
    counted by identity (an `OpCost` hashes its ten fields), then equal ones merged in the
    order they were first seen, which keeps each class of equal costs where its first member
    came and that member as its key (what a `Counter` of the sequence keeps)."""
    segments: dict[tuple[str, int | None], dict[int, list]] = {}
    for phase, micro, cost in sequence:
        if cost is not None:
            ops = segments.get((phase, micro))
            if ops is None:  # (not setdefault: it would build a dict per op)
                ops = segments[phase, micro] = {}
            seen = ops.get(id(cost))  # the sequence holds every cost: ids stay unique
            if seen is None:
                ops[id(cost)] = [cost, 1]
            else:
                seen[1] += 1
    out = []
    for (phase, micro), ops in segments.items():
        merged: Counter = Counter()
        for cost, count in ops.values():
            merged[cost] += count
        out.append(Segment(phase, micro, tuple(merged.items())))
    return StepCounts(tuple(out))
