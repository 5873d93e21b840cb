"""`measure.extrapolate` on hand-made memory curves: why a line through three peaks is not
enough, the point-by-point rule, and the per-field rule with its refusals."""

import pytest

from velora_cli.shortcut.extrapolate import (
    NotExtrapolable,
    PositionLog,
    fields_at_depth,
    memory_at_depth,
    memory_of_log,
)

FB, OPT = ("forward_backward",), ("optimizer",)


def curve(depth, *, loss, block, end, optimizer, block_points=2):
    """A step of ``depth`` blocks: a forward pass (``block(j, d, k)`` at point k of block j),
    the loss, a backward pass, the optimizer; breakdown: everything is "activations"."""
    points = [(("phase", "forward_backward"), FB, 0, 0)]
    for j in range(depth):
        points += [(("fwd", j), FB, block(j, depth, k), 0) for k in range(block_points)]
    points.append((("fwd_after", depth - 1), FB, loss(depth), 0))
    for j in reversed(range(depth)):
        points.append((("bwd", j), FB, end(depth) - j, 0))
    points.append((("phase", "optimizer"), FB + OPT, end(depth), 0))
    points.append((("phase", "optimizer"), OPT, optimizer(depth), 0))
    points = [(label, phases, value, i) for i, (label, phases, value, _) in enumerate(points)]
    values = [p[2] for p in points]
    return PositionLog(depth, points, lambda events: {"activations": values[events]})


def logs(**kw):
    return [curve(d, **kw) for d in (2, 3, 4)]


def test_the_peak_moves_to_a_faster_growing_point_which_three_peaks_on_a_line_miss():
    kw = dict(
        loss=lambda d: 1000 + d,  # highest at 2, 3 and 4 blocks...
        block=lambda j, d, k: 10 * j + k,
        end=lambda d: 100 * d,  # ...overtaken from 10 blocks on
        optimizer=lambda d: 50 * d,
    )
    peaks = [memory_of_log(log)["peak_bytes"] for log in logs(**kw)]
    assert peaks == [1002, 1003, 1004]  # a line, which would say 1032 at 32 blocks
    out = memory_at_depth(logs(**kw), 32, 1)
    assert out["peak_bytes"] == 3200
    assert out["fwd_bwd_peak_bytes"] == 3200 and out["optimizer_peak_bytes"] == 3200
    assert out["peak_phase"] == "forward_backward"  # reached there first (the phase entry)
    assert out["peak_breakdown"] == {"activations": 3200}
    assert out == memory_of_log(curve(32, **kw))


def test_inside_blocks_the_maximum_is_at_the_top_or_the_bottom_block():
    kw = dict(
        loss=lambda d: 0,
        block=lambda j, d, k: 7 + 5 * j + 3 * d + k,  # grows with j: the top block
        end=lambda d: 0,
        optimizer=lambda d: 0,
    )
    assert memory_at_depth(logs(**kw), 40, 1) == memory_of_log(curve(40, **kw))
    kw["block"] = lambda j, d, k: 500 - 5 * j + 3 * d + k  # shrinks with j: the first block
    assert memory_at_depth(logs(**kw), 40, 1) == memory_of_log(curve(40, **kw))


def test_a_point_that_is_not_affine_in_depth_is_refused():
    kw = dict(loss=lambda d: d * d, block=lambda j, d, k: 0, end=lambda d: 0,
              optimizer=lambda d: 0)  # fmt: skip
    with pytest.raises(NotExtrapolable, match="not affine"):
        memory_at_depth(logs(**kw), 32, 1)
    kw = dict(loss=lambda d: 0, block=lambda j, d, k: j * j, end=lambda d: 0,
              optimizer=lambda d: 0)  # fmt: skip
    with pytest.raises(NotExtrapolable, match="not affine in block and depth"):
        memory_at_depth(logs(**kw), 32, 1)


def test_steps_that_do_not_align_are_refused():
    kw = dict(loss=lambda d: 0, block=lambda j, d, k: 0, end=lambda d: 0, optimizer=lambda d: 0)
    uneven = [curve(2, **kw), curve(3, **kw, block_points=3), curve(4, **kw)]
    with pytest.raises(NotExtrapolable, match="first block unit differs"):
        memory_at_depth(uneven, 32, 1)
    with pytest.raises(NotExtrapolable, match="multiples of the period"):
        memory_at_depth(logs(**kw), 33, 2)


def test_fields_are_extrapolated_when_exactly_affine_and_copied_when_equal():
    rows = [
        {
            "bytes": 10 + 4 * d,
            "name": "x",
            "flag": True,
            "none": None,
            "ratio": 0.5,
            "per": {"a": 3 * d, "b": 100},
        }  # fmt: skip
        for d in (2, 3, 4)
    ]
    out = fields_at_depth(rows, (2, 3, 4), 32)
    assert out == {"bytes": 138, "name": "x", "flag": True, "none": None, "ratio": 0.5,
                   "per": {"a": 96, "b": 100}}  # fmt: skip
    assert list(out["per"]) == ["a", "b"]  # largest first again at 32 (it was b, a at 2-4)
    assert "bytes" not in fields_at_depth(rows, (2, 3, 4), 32, skip=("bytes",))


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ([1, 2, 4], "not affine"),
        # a float that changes with depth is not extrapolated: rounding would differ from the
        # real step's (the roofline's times are computed from synthesized op counts instead)
        ([0.5, 0.75, 1.0], "a float not extrapolated"),
        (["a", "a", "b"], "changes with depth"),
        ([{"a": 1}, {"a": 1}, {"b": 1}], "different entries"),
        ([[1], [1], [2]], "changes with depth"),
    ],
)
def test_fields_that_are_not_affine_are_refused(values, match):
    with pytest.raises(NotExtrapolable, match=match):
        fields_at_depth([{"f": v} for v in values], (2, 3, 4), 32)


def test_a_tie_that_appears_only_at_the_real_depth_is_refused():
    rows = [{"per": {"b": 100, "a": 4 * d}} for d in (2, 3, 4)]
    assert list(fields_at_depth(rows, (2, 3, 4), 26)["per"]) == ["a", "b"]
    with pytest.raises(NotExtrapolable, match="tie only at the real depth"):
        fields_at_depth(rows, (2, 3, 4), 25)  # a = b = 100: which came first is unknown


def test_fields_declared_to_need_the_real_step_are_refused(monkeypatch):
    from velora_cli.shortcut import extrapolate

    monkeypatch.setattr(extrapolate, "FULL_DEPTH_FIELDS", {"reserved_peak"})
    rows = [{"bytes": d, "reserved_peak": 10 * d} for d in (2, 3, 4)]
    with pytest.raises(NotExtrapolable, match="reserved_peak needs the real step"):
        fields_at_depth(rows, (2, 3, 4), 32)
