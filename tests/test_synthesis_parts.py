"""Pieces of `shortcut.synthesis` checked alone against a slow, obvious version of each."""

import random

from velora_cli.shortcut.synthesis import _repeats


def repeats_by_every_head(sequences, ms):
    """`_repeats` trying every head length (the code before it bounded them by the longest
    common prefix and suffix)."""
    lengths = [len(s) for s in sequences]
    body, rest = divmod(lengths[1] - lengths[0], ms[1] - ms[0])
    if rest or body <= 0 or any(n != lengths[0] + body * (m - ms[0])
                                for n, m in zip(lengths, ms, strict=True)):  # fmt: skip
        return False
    fixed = lengths[0] - body * ms[0]
    if fixed < 0:
        return False
    first = sequences[0]
    for h in range(fixed + 1):
        head, unit, tail = first[:h], first[h : h + body], first[h + body * ms[0] :]
        if all(s == head + unit * m + tail for s, m in zip(sequences, ms, strict=True)):
            return True
    return False


def test_repeats_agrees_with_trying_every_head():
    rng = random.Random(26)
    ms = [2, 3, 4]
    seen = {True: 0, False: 0}
    for _ in range(3000):
        alphabet = rng.choice([(0, 1), (0, 1, 2), (7,)])  # few symbols: heads and units alike
        head = tuple(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))
        unit = tuple(rng.choice(alphabet) for _ in range(rng.randint(1, 3)))
        tail = tuple(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))
        sequences = [head + unit * m + tail for m in ms]
        if rng.random() < 0.5:  # break one item of one sequence (or its length)
            s = list(sequences[rng.randrange(3)])
            i = rng.randrange(len(s))
            if rng.random() < 0.8:
                s[i] = rng.choice(alphabet + (9,))
            else:
                del s[i]
            k = rng.randrange(3)
            sequences[k] = tuple(s)
        expected = repeats_by_every_head(sequences, ms)
        assert _repeats(sequences, ms) == expected, (sequences, expected)
        seen[expected] += 1
    assert seen[True] > 500 and seen[False] > 500  # both answers were exercised


def counts_by_equality(sequence):
    """`_counts` with every cost hashed (the code before it counted repeated objects by
    identity): a `Counter` per (phase, micro) in first-seen order."""
    from collections import Counter

    from velora_cli.timing.opcount import Segment, StepCounts

    segments = {}
    for phase, micro, cost in sequence:
        if cost is not None:
            segments.setdefault((phase, micro), Counter())[cost] += 1
    return StepCounts(tuple(Segment(p, m, tuple(ops.items())) for (p, m), ops in segments.items()))


def test_counts_by_identity_agree_with_counting_by_equality():
    # a synthesized sequence repeats template objects, and equal costs may be distinct
    # objects (from different templates): both must land in one entry, at the place and
    # with the key of the first one seen
    from velora_cli.shortcut.synthesis import _counts
    from velora_cli.timing.opcount import OpCost

    rng = random.Random(26)
    twins = 0  # sequences holding equal, distinct cost objects
    for _ in range(200):
        pool = [OpCost("gemm", rng.choice(["mm", "addmm"]), "bf16", rng.randint(1, 3), 8)
                for _ in range(rng.randint(1, 8))]  # fmt: skip
        sequence = [
            (rng.choice(["forward", "backward"]), rng.choice([None, 0, 1]),
             rng.choice([*pool, None]))
            for _ in range(rng.randint(0, 60))
        ]  # fmt: skip
        costs = [c for _, _, c in sequence if c is not None]
        twins += any(a == b and a is not b for a in costs for b in costs)
        got, want = _counts(sequence), counts_by_equality(sequence)
        assert got == want
        for a, b in zip(got.segments, want.segments, strict=True):  # the same key objects
            assert [id(c) for c, _ in a.ops] == [id(c) for c, _ in b.ops]
    assert twins > 50
