"""`velora validate` reports a source's own run-to-run spread beside a case's error.

fitcheck ran one setup three times in a fresh process each (its scripts/calibration_sweep.py,
``REPEAT = ("HuggingFaceTB/SmolLM2-1.7B", 4, 1024)``, ``REPEATS = 3``), timing one step per run:
its 2026-09-15 session measured 4.843, 4.580 and 4.337 s for the eager LoRA setup. The spread is
information: the bounds and the verdict stay each run's own. No estimate runs here (a stand-in
predictor), so these tests take no meta step.
"""

from __future__ import annotations

import copy
import json

import pytest

from velora_cli.validation.compare import repeat_spread
from velora_cli.validation.corpus import load_cases, repeat_groups
from velora_cli.validation.run import validate

EAGER_17B = (
    "fitcheck/t4-2026-09-15-eager-none-fp16-adamw-r32-ckpt-HuggingFaceTB_SmolLM2-1.7B-bs4-seq1024"
)
TINYLLAMA_NF4 = "eager-nf4-fp16-adamw-r32-ckpt-TinyLlama_TinyLlama-1.1B-Chat-v1.0-bs2-seq1024"


def test_the_corpus_repeats_are_fitchecks_deliberate_reruns():
    cases = load_cases(sources=["fitcheck"])
    groups = repeat_groups(cases)
    assert groups[EAGER_17B] == (EAGER_17B, EAGER_17B + "#2", EAGER_17B + "#3")
    by_id = {c.id: c for c in cases}
    seconds = [by_id[i].record["measured"]["step_seconds"] for i in groups[EAGER_17B]]
    assert seconds == pytest.approx([4.8425, 4.5801, 4.3370], abs=1e-3)
    # every group of the corpus: 09-15's four SmolLM2-1.7B bs4 x 1024 setups, three runs each
    assert len(set(groups.values())) == 4
    assert {len(g) for g in groups.values()} == {3}
    # the same setup in another session (torch 2.14 / transformers 5.17 on 09-15, torch 2.10 /
    # transformers 5.0 on 09-16) is not a repeat
    same_setup = [
        i
        for i, c in by_id.items()
        if i.endswith(TINYLLAMA_NF4) and c.measured.get("tokens_per_second")
    ]
    assert [i[9:22] for i in same_setup] == ["t4-2026-09-15", "t4-2026-09-16"]
    assert not set(same_setup) & set(groups)


def test_spread_and_the_error_against_the_runs():
    runs = {"a": 100.0, "b": 110.0, "c": 120.0}
    inside = repeat_spread(runs, 115.0)
    assert inside["runs"] == ["a", "b", "c"]
    assert (inside["min"], inside["median"], inside["max"]) == (100.0, 110.0, 120.0)
    assert inside["spread"] == pytest.approx(0.20)
    assert inside["error_vs_median"] == pytest.approx(5 / 110)
    assert inside["error_vs_range"] == 0.0
    assert repeat_spread(runs, 132.0)["error_vs_range"] == pytest.approx(0.10)
    assert repeat_spread(runs, 90.0)["error_vs_range"] == pytest.approx(-0.10)
    assert repeat_spread({"a": 1.0, "b": 3.0}, None) == {
        "runs": ["a", "b"], "min": 1.0, "median": 2.0, "max": 3.0, "spread": 2.0,
    }  # fmt: skip


def _corpus(tmp_path, base, seconds: dict[str, float]) -> str:
    records = []
    for suffix, s in seconds.items():
        record = copy.deepcopy(base)
        record["id"] = base["id"] + suffix
        record["measured"] = {"step_seconds": s}
        records.append(record)
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "synthetic_t4.json").write_text(json.dumps({"name": "s", "records": records}))
    return str(folder)


def _predictor(tokens_per_second: float):
    def predict(case, mapped, spec):
        return {"status": "ok", "predicted_tokens_per_second": tokens_per_second}

    return predict


def test_the_spread_changes_neither_the_bounds_nor_the_verdict(tmp_path):
    base = load_cases(ids=[EAGER_17B])[0].record
    tokens = 4 * 1024
    folder = _corpus(tmp_path, base, {"": 4.0, "#2": 5.0})  # 1024 and 819 tokens/s
    predict = _predictor(1000.0)  # −2.3 % against the first run, +22 % against the second
    document = validate(load_cases(folder), predict=predict)
    first, second = document["cases"]
    assert first["error"]["tokens_per_second"] == pytest.approx(1000 / (tokens / 4.0) - 1)
    assert not first["out_of_bounds"]
    assert second["out_of_bounds"] == ["tokens_per_second +22.1%"]
    assert document["passed"] is False  # the second run's own error decides, spread or not
    for case in (first, second):
        repeats = case["repeats"]
        assert repeats["runs"] == [first["id"], second["id"]]
        assert repeats["spread"] == pytest.approx(5.0 / 4.0 - 1)
        assert repeats["error_vs_range"] == 0.0  # 1000 lies between 819 and 1024
    # validating one run alone still finds its repeats in the corpus it is given
    alone = validate(load_cases(folder, ids=[second["id"]]), predict=predict,
                     corpus=load_cases(folder))  # fmt: skip
    (case,) = alone["cases"]
    assert case["repeats"]["runs"] == [first["id"], second["id"]]
    assert case["out_of_bounds"] == second["out_of_bounds"]


def test_the_text_formats_show_the_repeats(tmp_path):
    from velora_cli.report.validate import render

    base = load_cases(ids=[EAGER_17B])[0].record
    folder = _corpus(tmp_path, base, {"": 4.0, "#2": 5.0})
    document = validate(load_cases(folder), predict=_predictor(1000.0))
    text = render(document, "markdown")
    assert "Repeated runs of one setup" in text
    # both runs' rows: 2 runs, 819 … 1,024 tokens/s measured, 25 % apart, 0 against the range
    rows = [line for line in text.splitlines() if line.startswith("| " + base["id"])]
    assert len([r for r in rows if "| 819 … 1,024 | 25.00% |" in r and "+0.00%" in r]) == 2
