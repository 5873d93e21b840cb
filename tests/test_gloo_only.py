"""What real gloo ranks hold that NCCL ranks would not (issue 26, docs/multi-gpu.md "gloo vs
NCCL"): the ``gloo`` category, ``gloo_only_bytes`` of the cpu backend's rank rows, and the
per-rank estimate against real gloo ranks on llama-60m shapes, to the byte.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from velora_cli.measure.tracker import AllocationTrace, MemoryTracker
from velora_cli.measure.train_step import StepSpec, Strategy
from velora_cli.parallel.rank_step import gloo_only_fields, peak_without
from velora_cli.parallel.roles import GLOO_ONLY, CommBuffers, GlooOnly


def _tracker(model: nn.Module) -> MemoryTracker:
    return MemoryTracker(model, round_to=1, extra_categories=("comm", GLOO_ONLY), trace=True)


def test_born_as_labels_only_storages_first_counted_inside():
    model = nn.Linear(4, 4)
    unseen = torch.zeros(256)  # made before tracking: the tracker has not counted it
    with _tracker(model) as tracker:
        known = torch.ones(64)  # counted when made, as an activation
        with tracker.born_as(GLOO_ONLY) as born:
            parts = unseen.split(128)  # a view exposes the unseen storage: born here
            known.add_(1)  # in place on a storage already counted: keeps its role
        after = torch.zeros(32)  # the window is closed: an activation again
        assert tracker.snapshot()[GLOO_ONLY] == 256 * 4
        assert tracker.snapshot()["activations"] == (64 + 32) * 4
    assert [n for _, n in born] == [256 * 4]
    del parts, after
    with pytest.raises(ValueError, match="unknown category"), tracker.born_as("nccl"):
        pass


def test_peak_without_finds_the_peak_of_what_remains_at_its_own_moment():
    # 0: params 4096 B; 1: activation 3072 B, freed; 2: gloo 4096 B, freed; 3: temporary 1024 B
    trace = AllocationTrace(
        initial=((0, 4096),),
        events=((1, 1, 3072), (2, 1, -3072), (3, 2, 4096), (4, 3, 1024), (5, 2, -4096)),
        categories={0: "params", 1: "activations", 2: GLOO_ONLY, 3: "temporaries"},
        phases=(),
        round_to=512,
        ops=5,
    )
    assert max(trace.live_bytes()) == 4096 + 4096 + 1024  # with gloo's storage
    assert peak_without(trace, {2}) == 4096 + 3072  # without it: the activation's moment
    fields = gloo_only_fields(trace, {"reduce_scatter_single": [(2, 4096)]})
    assert fields["gloo_only_bytes"] == (4096 + 4096 + 1024) - (4096 + 3072)
    assert fields["gloo_only_items"] == {
        "reduce_scatter_single": {"storages": 1, "largest_bytes": 4096, "at_peak_bytes": 4096}
    }
    assert fields["gloo_only_note"].startswith("gloo-only: ProcessGroupGloo's reduce-scatter")
    assert fields["gloo_only_note"].endswith("NCCL would not hold it")
    # gloo's storage outside the peak: nothing of the peak is gloo-only, and no note
    late = AllocationTrace(
        initial=((0, 4096),),
        events=((1, 1, 8192), (2, 1, -8192), (3, 2, 4096), (4, 2, -4096)),
        categories={0: "params", 1: "activations", 2: GLOO_ONLY},
        phases=(),
        round_to=512,
        ops=4,
    )
    quiet = gloo_only_fields(late, {"reduce_scatter_single": [(2, 4096)]})
    assert quiet["gloo_only_bytes"] == 0 and "gloo_only_note" not in quiet
    assert quiet["gloo_only_items"]["reduce_scatter_single"]["at_peak_bytes"] == 0


@pytest.fixture
def gloo_group():
    """A one-rank gloo process group in this process (gloo's reduce-scatter copies its input
    for any world size)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_gloo_reduce_scatter_holds_a_copy_of_its_input(gloo_group):
    import torch.distributed as dist

    original = dist.reduce_scatter_single
    model = nn.Linear(4, 4)
    grads = torch.ones(1 << 16)  # 256 KiB: FSDP2's reduce-scatter input, counted before
    out = torch.empty(1 << 16)
    with _tracker(model) as tracker, CommBuffers(tracker), GlooOnly(tracker) as gloo:
        dist.reduce_scatter_single(out, grads * 2, op=dist.ReduceOp.SUM)
        dist.all_gather_single(out, grads)
    # the reduce-scatter's copy of its input, seen once (the all-gather's flat output lives on
    # gloo's worker thread, out of any tracker's sight)
    assert list(gloo.born) == ["reduce_scatter_single"]
    assert [n for _, n in gloo.born["reduce_scatter_single"]] == [grads.nbytes]
    assert torch.equal(out, grads)
    fields = gloo_only_fields(tracker.trace, gloo.born)
    assert fields["gloo_only_bytes"] == grads.nbytes  # the input (grads * 2) and its copy
    assert dist.reduce_scatter_single is original  # restored on exit


def test_the_estimate_sees_no_gloo_storages():
    """The estimate's fake process group allocates nothing in a collective: no gloo fields."""
    from velora_cli.parallel.estimate import estimate_rank

    spec = StepSpec(model="llama-tiny", batch_size=2, seq_len=32, world_size=2, parallel="fsdp")
    row, _ = estimate_rank(spec, 0)
    assert GLOO_ONLY not in row["peak_breakdown"] and "gloo_only_bytes" not in row


def test_rank_lines_say_what_is_gloo_only():
    from velora_cli.report.ranks import rank_lines, rank_table

    row = {
        "label": "baseline",
        "status": "ok",
        "ranks": [{"rank": 0, "peak_bytes": 3 << 20}],
        "peak_rank": 0,
        "peak_bytes": 3 << 20,
        "gloo_only_bytes": 1 << 20,
        "gloo_only_note": "gloo-only: a copy: NCCL would not hold it",
        "peak_breakdown": {"params": 2 << 20, GLOO_ONLY: 1 << 20},
    }
    lines = rank_lines({"backend": "cpu", "rows": [row]})
    assert any(
        "baseline: 1 MiB of the 3 MiB peak is gloo-only (the peak without it: 2 MiB" in line
        for line in lines
    )
    assert "gloo-only: a copy: NCCL would not hold it" in lines
    table = rank_table({"rows": [row]})
    assert [c.header for c in table.columns][-2] == "gloo-only"


def _root_unit_bytes(spec: StepSpec) -> int:
    """The root FSDP2 unit's gradients, unsharded and padded (what its reduce-scatter reads):
    the parameters outside the decoder layers (embeddings, final norm, lm_head)."""
    from velora_cli.measure.train_step import prepare
    from velora_cli.parallel.shard import decoder_layers

    model = prepare(spec, "meta").model
    in_layers = {id(p) for layer in decoder_layers(model) for p in layer.parameters()}
    world = spec.world_size
    total = 0
    for p in model.parameters():
        if id(p) not in in_layers:
            rows = -(-p.shape[0] // world) * world  # FSDP2 pads dim 0 to a multiple of N
            total += rows * p[0].numel() * p.element_size()
    return -(-total // 512) * 512


@pytest.mark.slow
def test_estimate_equals_gloo_ranks_less_gloo_only_on_llama_60m():
    """Issue 26's command (llama-60m, -b 2 -s 128, fsdp ×2): two real gloo ranks per row
    against the per-rank estimate. The estimate predicts NCCL ranks; the gloo ranks also hold
    the reduce-scatter's input copy, at their peak the root unit's (131 MB here)."""
    from velora_cli.parallel.estimate import ParallelEstimateBackend
    from velora_cli.parallel.launch import RanksBackend

    strategies = [Strategy(), Strategy(gc=True), Strategy(placement="paper", num_groups=32)]
    specs = [
        StepSpec(
            model="llama-60m",
            batch_size=2,
            seq_len=128,
            world_size=2,
            parallel="fsdp",
            strategy=s,
        )
        for s in strategies
    ]
    real = RanksBackend(device="cpu", steps=1, timeout=1200).measure_many(specs)
    estimate = ParallelEstimateBackend(ranks="all")
    root = _root_unit_bytes(specs[0])
    for s, measured in zip(specs, real, strict=True):
        label = s.strategy.label
        assert measured["status"] == "ok", (label, measured.get("error"))
        predicted = estimate.measure(s)
        for got, want in zip(predicted["ranks"], measured["ranks"], strict=True):
            nccl = want["peak_bytes"] - want["gloo_only_bytes"]
            assert got["peak_bytes"] == nccl, (label, got["rank"], got["peak_bytes"], want)
            # itemised: at the gloo peak, one reduce-scatter copy is live, the root unit's
            (item,) = want["gloo_only_items"].values()
            assert item["at_peak_bytes"] == want["peak_breakdown"][GLOO_ONLY] == root, label
            assert want["gloo_only_bytes"] > 0, label  # here it sets the gloo peak
        assert "NCCL would not hold it" in measured["gloo_only_note"]
