"""FSDP2's rank N−1 given rank 0's figures where every parameter's dim0 is a multiple of N
(parallel/estimate.py, `uniform_shards`), against the reference path, which steps both ranks.

Tiny llamas of 2 blocks built from a config, CPU, fake ranks. The reference path must find
ranks 0 and N−1 equal, field for field, wherever the fast path copies rank 0; where a dim0 is
not a multiple of N (a vocabulary of 1001, K/V projections of 10 rows over 8 ranks: torch.chunk
gives 5 chunks of 2, ranks 5-7 none) the fast path steps both ranks and rank N−1 really holds
less (its AdamW state is made like its unpadded local shard), so the condition is not vacuous.
"""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from velora_cli.measure.train_step import StepSpec, Strategy
from velora_cli.parallel import estimate
from velora_cli.parallel.estimate import ParallelEstimateBackend, uniform_shards

SMALL = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "max_position_embeddings": 256,
}  # fmt: skip
# the fields the fast path's row may differ in: which ranks were stepped, and how
SAID = ("estimated_ranks", "ranks_note", "estimate_method")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("uniform-shards")
    configs = {
        "even": SMALL,  # every dim0 (256, 64, 128, 32) a multiple of 2, 4 and 8
        "vocab1001": {**SMALL, "vocab_size": 1001},  # embeddings and LM head: 1001 rows
        # head_dim 10 and one K/V head: k_proj and v_proj have 10 rows; norms 40, MLP 96
        "kv10": {**SMALL, "hidden_size": 40, "intermediate_size": 96, "num_key_value_heads": 1},
    }
    paths = {}
    for name, config in configs.items():
        LlamaConfig(**config).save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def _spec(model, world, parallel="fsdp", **kwargs):
    return StepSpec(model=model, batch_size=2, seq_len=32, world_size=world, parallel=parallel,
                    **kwargs)  # fmt: skip


def _counted(monkeypatch):
    """The ranks `estimate_rank` steps, in order."""
    stepped: list[int] = []
    original = estimate.estimate_rank

    def counting(spec, rank, **kwargs):
        stepped.append(rank)
        return original(spec, rank, **kwargs)

    monkeypatch.setattr(estimate, "estimate_rank", counting)
    return stepped


def _rank_fields(row):
    """The job row's per-rank entries without their rank numbers."""
    return [{k: v for k, v in r.items() if k != "rank"} for r in row["ranks"]]


UNIFORM = [
    pytest.param("fsdp", 2, {}, False, id="fsdp-2"),
    pytest.param("fsdp", 4, {"gc": True}, False, id="fsdp-4-gc"),
    pytest.param("fsdp-no-reshard", 8, {"placement": "paper", "num_groups": 8}, False,
                 id="fsdp-no-reshard-8-velora"),
    pytest.param("fsdp", 2, {}, True, id="fsdp-2-cpu-offload"),
]  # fmt: skip


@pytest.mark.parametrize(("parallel", "world", "strategy", "offload"), UNIFORM)
def test_rank_n_minus_1_given_rank_0s_figures_equals_the_reference(
    monkeypatch, models, parallel, world, strategy, offload
):
    spec = _spec(models["even"], world, parallel, strategy=Strategy(**strategy),
                 cpu_offload=offload)  # fmt: skip
    assert uniform_shards(spec) is not None
    # the reference path steps ranks 0 and N − 1: the same, byte for byte, AdamW state included
    stepped = _counted(monkeypatch)
    ref = ParallelEstimateBackend(expandable=False, shortcuts=False).measure(spec)
    assert ref["status"] == "ok", ref.get("error")
    assert stepped == [0, world - 1] and ref["estimated_ranks"] == [0, world - 1]
    first, last = _rank_fields(ref)
    assert first == last
    assert first["optimizer_bytes"] > 0 and first["predicted_device_bytes"] > 0
    # the fast path steps rank 0 alone and says so; every other field is the reference's
    stepped.clear()
    row = ParallelEstimateBackend(expandable=False).measure(spec)
    assert stepped == [0]
    assert row["estimated_ranks"] == [0]
    assert row["ranks_note"].startswith(
        f"rank 0 of {world} estimated; rank {world - 1} given rank 0's figures: every sharded "
        f"parameter's dim0 is a multiple of {world}"
    )
    assert [r["rank"] for r in row["ranks"]] == [0, world - 1]
    for key in SAID:
        row.pop(key, None), ref.pop(key, None)
    differ = {k: (row.get(k), ref.get(k)) for k in row.keys() | ref.keys()
              if row.get(k) != ref.get(k)}  # fmt: skip
    assert not differ
    assert list(row) == list(ref)


UNEVEN = [
    # model, world size, the rows of the parameter that does not split
    pytest.param("vocab1001", 2, 1001, id="vocab1001-2"),
    pytest.param("kv10", 8, 10, id="kv10-8-empty-shards"),
    pytest.param("even", 3, 64, id="hidden64-3"),
]


@pytest.mark.parametrize(("model", "world", "rows"), UNEVEN)
def test_a_dim0_not_a_multiple_of_n_steps_both_ranks_which_differ(monkeypatch, models, model,
                                                                    world, rows):  # fmt: skip
    spec = _spec(models[model], world)
    assert uniform_shards(spec) is None and rows % world
    stepped = _counted(monkeypatch)
    row = ParallelEstimateBackend(expandable=False).measure(spec)
    assert row["status"] == "ok", row.get("error")
    assert stepped == [0, world - 1] and row["estimated_ranks"] == [0, world - 1]
    first, last = row["ranks"]
    # FSDP2 pads the sharded parameters, not the AdamW state of the short (or empty) shards
    assert last["param_bytes"] == first["param_bytes"]
    assert last["optimizer_bytes"] < first["optimizer_bytes"]
    ref = ParallelEstimateBackend(expandable=False, shortcuts=False).measure(spec)
    for key in ("estimate_method",):
        row.pop(key, None), ref.pop(key, None)
    assert row == ref


def test_the_condition_reads_the_model_the_rank_builds(models):
    even = models["even"]
    # LoRA adapters are parameters too: lora_A has lora_rank rows (4 of 4 ranks: even; 2: not)
    assert uniform_shards(_spec(even, 4, mode="lora", lora_rank=4)) is not None
    assert uniform_shards(_spec(even, 4, mode="lora", lora_rank=2)) is None
    assert uniform_shards(_spec(even, 8)) is not None
    assert uniform_shards(_spec(models["kv10"], 2)) is not None  # 10, 40, 96, 256: all even
    assert uniform_shards(_spec(models["kv10"], 4)) is None  # 10 rows in 4: 3, 3, 3, 1
    assert uniform_shards(_spec(even, 2, "ddp")) is None  # DDP: rank 0 alone anyway


def test_the_reference_path_and_explicit_ranks_step_every_rank_asked(monkeypatch, models):
    spec = _spec(models["even"], 4)
    stepped = _counted(monkeypatch)
    monkeypatch.setenv("VELORA_ESTIMATE_REFERENCE", "1")
    assert ParallelEstimateBackend(expandable=False).measure(spec)["estimated_ranks"] == [0, 3]
    assert stepped == [0, 3]
    monkeypatch.delenv("VELORA_ESTIMATE_REFERENCE")
    stepped.clear()
    row = ParallelEstimateBackend(expandable=False, ranks=(0, 3)).measure(spec)
    assert stepped == [0, 3] and row["estimated_ranks"] == [0, 3]
    stepped.clear()
    row = ParallelEstimateBackend(expandable=False, ranks="all").measure(spec)
    assert stepped == [0, 1, 2, 3] and row["estimated_ranks"] == [0, 1, 2, 3]
