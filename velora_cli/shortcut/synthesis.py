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
    head, tail = pos[:slot], pos[slot + 2 :]
    units = [("from_first", unit), ("from_last", m - 1 - unit)]
    if context is not None:
        units.append(("relative", unit - context))
    return frozenset([
        (way, head + (u, i) + tail) for way, u in units for i in (index, index - length)
    ])  # fmt: skip


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
        if any(h[3] is not cost and h[3] != cost for h in heads):  # (mostly one cost object)
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
    deep = _DeepTrace(templates, m)
    return deep.trace(like), deep.sequence


class _DeepTrace:
    """The deep step's trace, written out a unit at a time from the templates at ``m`` units.

    A free names the storage it frees by position (`_names`). The storage ids are kept in
    tables shaped like the positions, filled in the order the step is written, so that a
    position not written yet, or one where a storage was freed, names none (as in the real
    step): per run of the storages alive at the start, per run of ops, and per run of the
    events of an op outside the stack, a list per unit (one for a run outside the stack) of
    its items' ids in order (an op's events one after another; None for a free). Each unit
    template is compiled once (`_program`) to a flat list of events with their op's offset in
    the unit, each free to its table and the ways it is named, so that the repeated middle
    units are written by one loop over plain tuples.
    """

    def __init__(self, templates: _Templates, m: int) -> None:
        self.templates, self.m = templates, m
        self.initial: list[tuple[int, int]] = []
        self.categories: dict[int, str] = {}
        self.events: list[tuple[int, int, int]] = []
        self.init_ids = [self._table(run) for run in templates.initial]
        for r, u, _, (nbytes, role) in _walk(templates.initial, m):
            sid = len(self.categories)
            self.categories[sid] = role
            self.initial.append((sid, nbytes))
            self.init_ids[r][u or 0].append(sid)
        self.op_ids = [self._table(run) for run in templates.ops]
        self.sub_ids: dict[tuple[int, int], list] = {}  # (run, item) of an op outside
        # per run, per unit part (first, middle, last): where each op's events start in the
        # unit's list, then their end (`_starts`)
        self.starts: list[tuple[list[int], ...]] = []
        for r, run in enumerate(templates.ops):
            if run[0] == OUT:
                for i, (_, _, _, _, slot) in enumerate(run[1]):
                    self.sub_ids[r, i] = [self._table(events) for events in slot[1]]
            self.starts.append(tuple(_starts(part) if run[0] != OUT else [] for part in run[1:]))
        self._programs: dict[int, list[tuple]] = {}  # id(a unit's template) -> its program
        self._ops: dict[int, tuple[list, list]] = {}  # id(a unit's template) -> `_heads`
        self._frees: dict[int, tuple] = {}  # id(names) -> the free compiled
        # phase boundaries: the unit they are in, the event in it, and the names they go by
        self.wanted: dict[tuple, list[frozenset]] = {}  # position at m units -> its names
        for _, start, end in templates.phases:
            for names in (start, end):
                pos = _resolve(names, None, m, templates.length_at)
                self.wanted.setdefault(pos, []).append(names)
        self.hits: dict[tuple, dict[int, list[frozenset]]] = {}
        for pos, group in self.wanted.items():
            if pos[0] == "op" and len(pos) == 7:  # unit (r, None, i, r2, u2), event e
                self.hits.setdefault(pos[1:6], {})[pos[6]] = group
            elif pos[0] == "op":  # unit (r, u), op i, event e
                at = self._address(self.starts[pos[1]], pos[2], pos[3], pos[4])
                if at is not None:
                    self.hits.setdefault(pos[1:3], {})[at] = group
        self.marks: dict[frozenset, int] = {}
        self.op_names: list[str] = []
        self.sequence: list[tuple[str, int | None, OpCost | None]] = []
        self._write_ops()

    def _table(self, run: tuple[str, list, list, list]) -> list[list]:
        return [[] for _ in range(1 if run[0] == OUT else self.m)]

    def _address(self, starts: tuple, unit: int, index: int, e: int) -> int | None:
        """Where event e of op ``index`` of ``unit`` is in its unit's list (None: nowhere)."""
        part = _unit_items(("", *starts), unit, self.m)
        if not 0 <= index < len(part) - 1 or part[index] + e >= part[index + 1]:
            return None
        return part[index] + e

    def _write_ops(self) -> None:
        m, k = self.m, 0
        for r, (kind, first, middle, last) in enumerate(self.templates.ops):
            for u in _order(kind, m):
                items = _unit_items((kind, first, middle, last), u, m)
                names, sequence = self._heads(items)
                self.op_names.extend(names)
                self.sequence.extend(sequence)
                if kind != OUT:  # the unit's events in one list
                    program = self._program(items, "ops")
                    self._place(k, program, u, self.op_ids[r][u], self.hits.get((r, u)))
                    k += len(items)
                    continue
                for i, (_, _, _, _, slot) in enumerate(items):  # each op's runs of events
                    for r2, (kind2, *parts) in enumerate(slot[1]):
                        table = self.sub_ids[r, i][r2]
                        for u2 in _order(kind2, m):
                            events = _unit_items((kind2, *parts), u2, m)
                            self._place(k, self._program(events, "events"), u2,
                                        table[u2 or 0], self.hits.get((r, None, i, r2, u2)))  # fmt: skip
                    k += 1
        del self.op_names[0], self.sequence[0]  # op 0: the stretch before the first op

    def _heads(self, items: list[tuple]) -> tuple[list, list]:
        """The names and ``(phase, micro, cost)`` of a unit's ops."""
        heads = self._ops.get(id(items))
        if heads is None:
            heads = self._ops[id(items)] = (
                [name for name, _, _, _, _ in items],
                [(phase, micro, cost) for _, phase, micro, cost, _ in items],
            )
        return heads

    def _program(self, template: list, kind: str) -> list[tuple]:
        """A unit's events from its template (its ops' or, ``"events"``, one op's):
        ``(op in the unit, True, bytes, role)`` or ``(op, False, bytes, free)`` (`_free`)."""
        program = self._programs.get(id(template))
        if program is None:
            ops = [slot[1] for _, _, _, _, slot in template] if kind == "ops" else [template]
            program = self._programs[id(template)] = [
                (i, True, nbytes, extra) if sign == "+" else (i, False, nbytes, self._free(extra))
                for i, events in enumerate(ops)
                for sign, nbytes, extra in events
            ]  # fmt: skip
        return program

    def _place(self, k: int, program: list[tuple], context: int | None, ids: list,
               hits: dict[int, list[frozenset]] | None) -> None:  # fmt: skip
        """Append a unit's events (ops k, k + 1, … of unit ``context``) and their ids."""
        events, categories, find = self.events, self.categories, self._find
        for at in sorted(hits or ()):  # a phase starts or ends at event `at` of the unit
            if at < len(program):
                for names in hits[at]:  # type: ignore[index]
                    self.marks.setdefault(names, len(events) + at)
        for i, allocates, nbytes, what in program:
            if allocates:
                sid = len(categories)
                categories[sid] = what
                ids.append(sid)
            else:
                sid = find(what, context)
                ids.append(None)
            events.append((k + i, sid, nbytes))

    def _free(self, names: frozenset) -> tuple:
        """A free compiled: ``(table, how, found, ways)``. ``table``: the storage ids of its run;
        ``ways``: ``(starts, event, ((way, unit, item), ...), lengths, units)``, its ops'
        first events per unit part and the event in the op (or None: the table holds no ops),
        the ways it is named by (`_names`: they differ in unit and item only), the items of
        the first, middle and last unit parts and the units in the table. ``how``: ``"fixed"`` where no way is relative to the
        freeing unit (``found``: `_locate`'s answer, None where it raises); ``"shift"`` where
        every way is the freeing unit plus one ``shift`` (``found``: ``(shift, answers)``,
        `_locate`'s address in a first, a middle and a last unit, each None where it raises),
        else ``"any"`` (`_locate` at every free)."""
        free = self._frees.get(id(names))
        if free is not None:
            return free
        templates, wheres, named = self.templates, set(), []
        for way, pos in names:
            if pos[0] == "init":  # ("init", r, u, i)
                where = self.init_ids[pos[1]], None, None, templates.initial[pos[1]]
            elif len(pos) == 5:  # ("op", r, u, i, e)
                r = pos[1]
                where = self.op_ids[r], self.starts[r], pos[4], templates.ops[r]
            else:  # ("op", r, None, i, r2, u2, e): an op outside the stack, its run r2
                r, i, r2 = pos[1], pos[3], pos[4]
                where = self.sub_ids[r, i][r2], None, None, templates.ops[r][1][i][4][1][r2]
            unit = 2 if pos[0] == "init" or len(pos) == 5 else 5
            wheres.add((id(where[0]), where[2]))
            named.append((way, pos[unit], pos[unit + 1]))
        assert len(wheres) == 1, "ways of naming a storage differ in its unit and item only"
        table, starts, e, run = where
        ways = (starts, e, tuple(named), tuple(len(part) for part in run[1:]), len(table))
        shifts = {unit for way, unit, _ in named if way == "relative"}
        if not shifts:
            free = (table, "fixed", self._try_locate(ways, None), ways)
        elif len(shifts) == 1 and all(way == "relative" for way, _, _ in named):
            shift, m = shifts.pop(), self.m
            found = tuple(self._try_locate(ways, unit - shift) for unit in (0, 1, m - 1))
            answers = tuple(None if a is None else a[1] for a in found)
            free = (table, "shift", (shift, answers), ways)
        else:
            free = (table, "any", None, ways)
        self._frees[id(names)] = free
        return free

    def _find(self, free: tuple, context: int | None) -> int:
        """The id of the storage a compiled free (`_free`) names from an event of unit
        ``context``: `_resolve`'s position, then the storage written there by now."""
        table, how, found, ways = free
        if how == "shift":
            shift, answers = found
            unit = context + shift
            m = self.m
            at = answers[0 if unit == 0 else 2 if unit == m - 1 else 1] if 0 <= unit < m else None
            found = (unit, at) if at is not None else None
        if found is None:
            found = self._locate(ways, context)
        unit, at = found
        ids = table[unit]
        if at < len(ids):
            sid = ids[at]
            if sid is not None:
                return sid
        raise NotExtrapolable("a free names no storage of the deep step")

    def _locate(self, ways: tuple, context: int | None) -> tuple[int, int]:
        """``(unit, place in the unit's list)`` of the position a free's ways name from unit
        ``context`` (`_resolve`, on `_free`'s ``ways``).

        Raises:
            NotExtrapolable: the ways differ, or the position is none of the deep step's.
        """
        starts, e, named, (first, middle, last), units = ways
        m = self.m
        found = set()
        for way, unit, index in named:
            if way != "at":
                if way == "from_last":
                    unit = m - 1 - unit
                elif way == "relative":
                    unit = context + unit
                if index < 0:  # counted from the end of its unit part (`_unit_items`)
                    index += first if unit == 0 else last if unit == m - 1 else middle
            found.add((unit, index))
        if len(found) != 1:
            raise NotExtrapolable("a freed storage is named two ways that differ deeper down")
        unit, index = found.pop()
        unit = unit or 0  # a run outside the stack has one list
        if starts is not None:  # an op's event: its place in the unit's list
            index = self._address(starts, unit, index, e) if 0 <= unit < m else None
        if index is None or not 0 <= unit < units or index < 0:
            raise NotExtrapolable("a free names no storage of the deep step")
        return unit, index

    def _try_locate(self, ways: tuple, context: int) -> tuple[int, int] | None:
        try:
            return self._locate(ways, context)
        except NotExtrapolable:
            return None

    def trace(self, like: AllocationTrace) -> AllocationTrace:
        """The trace written, its phases placed."""
        for names in self.wanted.get(_END, ()):
            self.marks[names] = len(self.events)
        if any(names not in self.marks for group in self.wanted.values() for names in group):
            raise NotExtrapolable("a phase boundary is not in the deep step")
        return AllocationTrace(
            initial=tuple(self.initial),
            events=tuple(self.events),
            categories=self.categories,
            phases=tuple(
                (name, self.marks[start], self.marks[end])
                for name, start, end in self.templates.phases
            ),
            round_to=like.round_to,
            ops=len(self.op_names),
            op_names=tuple(self.op_names),
        )


def _starts(part: list[tuple]) -> list[int]:
    """Where each op of a unit's template starts in the unit's events, then their end."""
    out = [0]
    for _, _, _, _, slot in part:
        out.append(out[-1] + len(slot[1]))
    return out


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
