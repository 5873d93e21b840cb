"""`synthesis._write` (the deep step written a unit at a time, its frees found through compiled
tables, `synthesis._DeepTrace`) against the slow, obvious way it was written before (issue 26):
every event named by its position tuple, every free resolved by `synthesis._resolve` and looked
up in a dict of the positions allocated so far. The same templates, from real shallow steps of
a tiny model, written out at several depths, far deeper than the tests that compare with a real
deep step reach (tests/test_estimate_shortcuts.py): the same trace, event for event."""

import pytest
from transformers import LlamaConfig

from velora_cli.estimate.backend import EstimateBackend
from velora_cli.measure.tracker import AllocationTrace
from velora_cli.measure.train_step import StepSpec, Strategy
from velora_cli.shortcut import shortcuts, synthesis
from velora_cli.shortcut.extrapolate import NotExtrapolable


def write_by_positions(templates, m, like):
    """The deep trace at ``m`` units as `synthesis._write` wrote it before issue 26."""
    where = {}  # position at m units -> storage id
    initial, categories = [], {}
    for r, u, i, (nbytes, role) in synthesis._walk(templates.initial, m):
        where["init", r, u, i] = len(categories)
        initial.append((len(categories), nbytes))
        categories[len(categories)] = role
    wanted = {}  # phase boundary at m units -> its names
    for _, start, end in templates.phases:
        for names in (start, end):
            pos = synthesis._resolve(names, None, m, templates.length_at)
            wanted.setdefault(pos, []).append(names)
    marks, events, op_names = {}, [], []
    for k, (r, u, i, (name, _, _, _, slot)) in enumerate(synthesis._walk(templates.ops, m)):
        if k:
            op_names.append(name)
        if slot[0] == "events":
            placed = [(("op", r, u, i, e), u, ev) for e, ev in enumerate(slot[1])]
        else:
            placed = [(("op", r, None, i, r2, u2, e), u2, ev)
                      for r2, u2, e, ev in synthesis._walk(slot[1], m)]  # fmt: skip
        for pos, context, (sign, nbytes, extra) in placed:
            for names in wanted.get(pos, ()):
                marks.setdefault(names, len(events))
            if sign == "+":
                sid = where[pos] = len(categories)
                categories[sid] = extra
            else:
                sid = where.get(synthesis._resolve(extra, context, m, templates.length_at))
                if sid is None:
                    raise NotExtrapolable("a free names no storage of the deep step")
            events.append((k, sid, nbytes))
    for names in wanted.get(synthesis._END, ()):
        marks[names] = len(events)
    return AllocationTrace(
        initial=tuple(initial), events=tuple(events), categories=categories,
        phases=tuple((name, marks[a], marks[b]) for name, a, b in templates.phases),
        round_to=like.round_to, ops=len(op_names), op_names=tuple(op_names),
    )  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthesis-write") / "llama8"
    LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
    ).save_pretrained(path)  # fmt: skip
    return str(path)


def shallow_records(monkeypatch, spec):
    """The three shallow steps' records the estimate hands to `synthesize`, and their period."""
    seen = []

    def keep(records, depth, period, **kwargs):
        seen.append((records, period))
        raise NotExtrapolable("recorded")  # the row is then stepped at full depth

    monkeypatch.setattr(shortcuts, "shallow_runs_pay", lambda *_: True)
    monkeypatch.setattr(shortcuts, "synthesize", keep)
    EstimateBackend().measure(spec)
    (records, period), = seen  # fmt: skip
    return records, period


@pytest.mark.parametrize(
    ("settings", "strategy"),
    [({"mode": "lora"}, {"gc": True}),  # LoRA: the first block's backward is shorter
     ({"mode": "lora"}, {}),
     ({"optimizer": "adamw_torch"}, {}),  # foreach AdamW: ops outside the stack, per unit
     ({"optimizer": "adafactor"}, {"gc": True})],  # Adafactor frees its factored state
)  # fmt: skip
def test_the_deep_trace_is_written_as_by_positions(model, monkeypatch, settings, strategy):
    spec = StepSpec(model=model, batch_size=2, seq_len=16, **settings,
                    strategy=Strategy(**strategy))  # fmt: skip
    records, period = shallow_records(monkeypatch, spec)
    steps = [synthesis._Shallow(r.ops, r, r.depth, period) for r in records]
    for m in (5, 6, 7, 13, 40):  # past every shallow depth (2, 3, 4 units)
        templates = synthesis._Templates(steps, m, traced=True)
        written, _ = synthesis._write(templates, m, records[0].trace)
        expected = write_by_positions(templates, m, records[0].trace)
        assert written.events == expected.events, f"{m} units: the events differ"
        assert written == expected and list(written.categories) == list(expected.categories)
        assert len(written.op_names) == len(records[0].trace.op_names) + (m - 2) * (
            len(records[1].trace.op_names) - len(records[0].trace.op_names)
        )  # one unit's ops more per unit
