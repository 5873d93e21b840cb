"""The per-rank estimate's depth shortcut (parallel/rank_shortcut.py) against the reference path
(every rank stepped at its real depth): identical rows, or the shortcut is not used.

Tiny llamas of 10 and 20 blocks built from a config (ranks extrapolate in units of one
checkpointing period, from 2, 3 and 4 blocks without checkpointing or with it every block, so
the shortcut needs more than 9: the shallow ranks must step fewer blocks than the real one; from
4, 6 and 8 with checkpointing every 2, more than 18), world sizes 2 and 4, DDP and FSDP2, with
checkpointing and VeLoRA. DDP ranks
extrapolate from 2, 3 and 4 blocks where their gradient buckets repeat by block: a llama of 12
blocks with 32 MiB MLP matrices (fp32, fake tensors: nothing is allocated), whose attention
projections and norms share a bucket with the block below's down projection, as Llama-2-7b's
input norm does; the 20-block llama's buckets each hold several blocks (refused).
The extrapolation's rule for a pass whose last unit differs (FSDP2's backward prefetch) is also
checked on a memory curve made up here, against the same curve at the real depth.
"""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from velora_cli.measure.train_step import StepSpec, Strategy
from velora_cli.parallel.estimate import ParallelEstimateBackend
from velora_cli.shortcut.extrapolate import (
    NotExtrapolable,
    PositionLog,
    memory_at_depth,
    memory_of_log,
    memory_points,
)


@pytest.fixture(scope="module")
def llama20(tmp_path_factory):
    path = tmp_path_factory.mktemp("rank-shortcut") / "llama20"
    LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=20, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
    ).save_pretrained(path)  # fmt: skip
    return str(path)


@pytest.fixture(scope="module")
def llama10(tmp_path_factory):
    path = tmp_path_factory.mktemp("rank-shortcut") / "llama10"
    LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=10, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
    ).save_pretrained(path)  # fmt: skip
    return str(path)


@pytest.fixture(scope="module")
def wide12(tmp_path_factory):
    path = tmp_path_factory.mktemp("rank-shortcut") / "wide12"
    LlamaConfig(
        hidden_size=1024, intermediate_size=8192, num_hidden_layers=12, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
    ).save_pretrained(path)  # fmt: skip
    return str(path)


VELORA = {"placement": "paper", "num_groups": 8}
CASES = [
    # parallel, world size, strategy, the method the shortcut must give (prefix)
    # FSDP2 on the 10-block llama
    pytest.param("fsdp", 2, {}, "extrapolated from 2, 3, 4", id="fsdp-2"),
    pytest.param("fsdp", 4, {"gc": True}, "extrapolated from 2, 3, 4",
                 id="fsdp-4-gc", marks=pytest.mark.slow),
    pytest.param("fsdp", 2, VELORA, "extrapolated from 2, 3, 4",
                 id="fsdp-2-velora", marks=pytest.mark.slow),
    pytest.param("fsdp-no-reshard", 4, {**VELORA, "gc": True}, "extrapolated",
                 id="fsdp-no-reshard-4-velora-gc", marks=pytest.mark.slow),
    # one bucket over many blocks: DDP ranks at full depth, the same rows either way
    pytest.param("ddp", 2, {}, "full depth (DDP's gradient buckets", id="ddp-2",
                 marks=pytest.mark.slow),
    pytest.param("ddp", 4, {**VELORA, "gc": True}, "full depth (DDP's gradient buckets",
                 id="ddp-4-velora-gc", marks=pytest.mark.slow),
    # buckets that repeat by block (`wide12`): from 2, 3 and 4 blocks
    pytest.param("ddp", 2, {}, "extrapolated from 2, 3, 4", id="wide-ddp-2"),
    pytest.param("ddp", 4, {"gc": True}, "extrapolated from 2, 3, 4", id="wide-ddp-4-gc",
                 marks=pytest.mark.slow),
    # VeLoRA's vectors are block buffers, which DDP copies into one flat tensor at each forward
    # (its bytes grow with depth, `rank_shortcut.check_broadcast`): 4,608 bytes a block here,
    # and 2,304 with 16 groups (not a multiple of the tracker's 512: `grown_logs`)
    pytest.param("ddp", 2, VELORA, "extrapolated from 2, 3, 4", id="wide-ddp-2-velora",
                 marks=pytest.mark.slow),
    pytest.param("ddp", 2, {**VELORA, "num_groups": 16, "gc": True}, "extrapolated from 2, 3, 4",
                 id="wide-ddp-2-velora-g16-gc"),
]  # fmt: skip


@pytest.mark.parametrize(("parallel", "world", "strategy", "expected"), CASES)
def test_rank_rows_equal_the_reference_byte_for_byte(request, parallel, world, strategy,
                                                      expected):  # fmt: skip
    case = request.node.callspec.id
    model = request.getfixturevalue(
        "wide12" if "wide" in case else "llama10" if case.startswith("fsdp") else "llama20"
    )
    spec = StepSpec(
        model=model, batch_size=2, seq_len=32, world_size=world, parallel=parallel,
        strategy=Strategy(**strategy),
    )  # fmt: skip
    # the default ranks: 0 and N − 1 under FSDP2 (the extremes), 0 under DDP; the fast path
    # steps rank 0 alone where rank N − 1 is the same (every dim0 here a multiple of 2 and 4:
    # `estimate.uniform_shards`, tests/test_fsdp_uniform_shards.py), and says so
    fast = ParallelEstimateBackend(expandable=False)
    reference = ParallelEstimateBackend(expandable=False, shortcuts=False)
    row, ref = fast.measure(spec), reference.measure(spec)
    assert row["status"] == ref["status"] == "ok", (row.get("error"), ref.get("error"))
    if parallel != "ddp":
        assert row.pop("estimated_ranks") == [0]
        assert ref.pop("estimated_ranks") == [0, world - 1]
        assert row.pop("ranks_note").startswith(f"rank 0 of {world} estimated; rank {world - 1}")
        ref.pop("ranks_note", None)
    method = row.pop("estimate_method")
    assert ref.pop("estimate_method").startswith("full depth (reference")
    differ = {k: (row.get(k), ref.get(k)) for k in row.keys() | ref.keys()
              if row.get(k) != ref.get(k)}  # fmt: skip
    assert not differ, f"{method}: {differ}"
    assert list(row) == list(ref)  # same fields, same order
    assert method.startswith(expected), method
    shortcut = fast.shortcut()
    assert (shortcut.extrapolated > 0) == method.startswith("extrapolated")


def test_fsdp_checkpointing_every_2_blocks_takes_units_of_2_blocks_exactly(llama20):
    # An FSDP2 rank's units are the checkpointing interval, 2 blocks: from 4, 6 and 8 blocks
    # (units of 4, two periods, would step 8, 12 and 16: more than the real 20, refused), the
    # row the real depth's, byte for byte (rank 0 of 4, as a tune asks for it)
    spec = StepSpec(
        model=llama20, batch_size=2, seq_len=32, world_size=4,
        parallel="fsdp", strategy=Strategy(gc=2),
    )  # fmt: skip
    row = ParallelEstimateBackend(ranks=(0,), expandable=False).measure(spec)
    ref = ParallelEstimateBackend(ranks=(0,), expandable=False, shortcuts=False).measure(spec)
    assert row.pop("estimate_method") == "extrapolated from 4, 6, 8 blocks"
    ref.pop("estimate_method")
    assert row == ref
    assert list(row) == list(ref)


def test_the_reference_environment_turns_the_rank_shortcut_off(monkeypatch):
    monkeypatch.setenv("VELORA_ESTIMATE_REFERENCE", "1")
    assert ParallelEstimateBackend().shortcut() is None
    monkeypatch.delenv("VELORA_ESTIMATE_REFERENCE")
    assert ParallelEstimateBackend().shortcut() is not None


# -- the extrapolation with a last unit of its own, on a made-up memory curve -------------------


def _curve(depth: int) -> PositionLog:
    """A step over ``depth`` blocks whose backward frees the previous block's buffer before
    making its own (so the first block it runs, the top one, has one point fewer)."""
    live = {"params": 1000 * depth, "activations": 0, "temporaries": 0}
    points, events = [], []

    def point(label, phases, category=None, delta=0):
        if category is not None:
            live[category] += delta
            events.append((category, delta))
        points.append((label, phases, sum(live.values()), len(events)))

    fb = ("forward_backward",)
    point(("phase", "forward_backward"), fb)
    for j in range(depth):
        point(("fwd", j), fb, "activations", 300)
        point(("fwd", j), fb, "temporaries", 50)
        point(("fwd", j), fb, "temporaries", -50)
    point(("fwd_after", depth - 1), fb, "temporaries", 2500)  # the loss
    point(("fwd_after", depth - 1), fb, "temporaries", -2500)
    for j in reversed(range(depth)):
        if j != depth - 1:
            point(("bwd", j), fb, "temporaries", -400)  # the previous block's buffer
        point(("bwd", j), fb, "temporaries", 400)
        point(("bwd", j), fb, "temporaries", 120)
        point(("bwd", j), fb, "temporaries", -120)
        point(("bwd", j), fb, "activations", -300)
    point(("bwd_after",), fb, "temporaries", -400)
    initial = {"params": 1000 * depth}

    def breakdown(n: int) -> dict[str, int]:
        out = {"params": initial["params"], "activations": 0, "temporaries": 0}
        for category, delta in events[:n]:
            out[category] += delta
        return out

    return PositionLog(depth, points, breakdown)


@pytest.mark.parametrize("depth", [5, 8, 32])
def test_a_different_last_unit_is_extrapolated_exactly_with_edges(depth):
    logs = [_curve(d) for d in (2, 3, 4)]
    with pytest.raises(NotExtrapolable, match="different op counts"):
        memory_at_depth(logs, depth, 1)
    assert memory_at_depth(logs, depth, 1, edges=True) == memory_of_log(_curve(depth))


def _prefetch_curve(depth: int) -> PositionLog:
    """A step over ``depth`` blocks as an FSDP2 rank's, marked as the shortcut marks it: each
    block's backward prefetches the all-gather of the block below (the top block all-gathers
    its own first, the bottom one prefetches nothing) and keeps its gradient, so memory rises
    down the backward and peaks inside the last middle block, whose neighbours, the first and
    last blocks of the pass, have other points."""
    live = {"params": 1000 * depth, "gradients": 0, "activations": 0, "comm": 0, "temps": 0}
    initial = dict(live)
    points, events = [], []

    def point(label, phases, category=None, delta=0):
        if category is not None:
            live[category] += delta
            events.append((category, delta))
        points.append((label, phases, sum(live.values()), len(events)))

    fb = ("forward_backward",)
    point(("phase", "forward_backward"), fb)
    for j in range(depth):
        point(("fwd", j), fb, "comm", 200)  # the block's all-gather
        point(("fwd", j), fb, "activations", 300)
        point(("fwd", j), fb, "comm", -200)  # its reshard
    point(("fwd_after", depth - 1), fb, "temps", 100)  # the loss
    point(("fwd_after", depth - 1), fb, "temps", -100)
    for j in reversed(range(depth)):
        if j == depth - 1:
            point(("bwd", j), fb, "comm", 200)  # the top block's own all-gather
        if j > 0:
            point(("bwd", j), fb, "comm", 200)  # the prefetch of block j - 1's
        point(("bwd", j), fb, "gradients", 400)
        point(("bwd", j), fb, "temps", 120)
        point(("bwd", j), fb, "temps", -120)
        point(("bwd", j), fb, "activations", -300)
        point(("bwd", j), fb, "comm", -200)  # its reshard

    def breakdown(n: int) -> dict[str, int]:
        out = dict(initial)
        for category, delta in events[:n]:
            out[category] += delta
        return out

    return PositionLog(depth, points, breakdown)


@pytest.mark.parametrize("depth", [5, 8, 32])
def test_a_peak_between_edges_takes_its_breakdown_from_the_middle_blocks(depth):
    # The peak is in block 1, a middle block at every depth but 2 blocks, where block 1 is the
    # top one (one point more: its own all-gather): its breakdown comes from the middle blocks
    # of 3 and 4 blocks (at 2, 3 and 4 blocks' block 1 it was refused: not affine)
    logs = [_prefetch_curve(d) for d in (2, 3, 4)]
    top = max(
        memory_points(logs, depth, 1, edges=True), key=lambda pt: (pt.value, [-t for t in pt.time])
    )
    assert top.where[:3] == ("unit", 3, "first")
    assert memory_at_depth(logs, depth, 1, edges=True) == memory_of_log(_prefetch_curve(depth))


@pytest.mark.slow
def test_a_7b_fsdp_rank_equals_the_reference():
    # Llama-2-7b's real shapes (32 blocks, from 2, 3 and 4), rank 0 of 4 as a tune asks for it
    spec = StepSpec(
        model="meta-llama/Llama-2-7b", batch_size=1, seq_len=512, dtype="bf16", mode="full",
        world_size=4, parallel="fsdp", strategy=Strategy(gc=True),
    )  # fmt: skip
    row = ParallelEstimateBackend(ranks=(0,), expandable=False).measure(spec)
    ref = ParallelEstimateBackend(ranks=(0,), expandable=False, shortcuts=False).measure(spec)
    assert row.pop("estimate_method") == "extrapolated from 2, 3, 4 blocks"
    ref.pop("estimate_method")
    assert row == ref


@pytest.mark.slow
@pytest.mark.parametrize(
    ("optimizer", "strategy"),
    [("adamw", {"gc": True}), ("galore", {"gc": True}),
     ("adamw_torch_fused", {"placement": "paper", "num_groups": 32, "gc": True})],
)  # fmt: skip
def test_a_7b_ddp_rank_equals_the_reference(optimizer, strategy):
    # Llama-2-7b's real shapes and DDP's default buckets (every matrix ≥ 32 MiB in bf16, so a
    # bucket each; the norms join the next matrix's), from 2, 3 and 4 blocks; galore's tracked
    # step is a refresh (its optimizer peak, 50.36 GB, is the rank's peak); VeLoRA's vectors
    # (1,888 bytes a block with 32 groups) are copied into one flat tensor at each forward
    spec = StepSpec(
        model="meta-llama/Llama-2-7b", batch_size=2, seq_len=512, dtype="bf16", mode="full",
        grad_accum_steps=2, world_size=2, parallel="ddp", optimizer=optimizer,
        strategy=Strategy(**strategy),
    )  # fmt: skip
    row = ParallelEstimateBackend(ranks=(0,), expandable=False).measure(spec)
    ref = ParallelEstimateBackend(ranks=(0,), expandable=False, shortcuts=False).measure(spec)
    assert row.pop("estimate_method") == "extrapolated from 2, 3, 4 blocks"
    ref.pop("estimate_method")
    assert row == ref


# -- the fake ranks' warm-up: one step with the fewest forwards (rank_step.warm_up) ---------------

WARMUPS = [
    # model, parallel, optimizer, accumulation, strategy
    pytest.param("wide12", "ddp", "galore", 2, {"gc": True}, id="ddp-galore-accum2"),
    pytest.param("llama20", "ddp", "adamw", 1, VELORA, id="ddp-velora-accum1",
                 marks=pytest.mark.slow),
    pytest.param("llama20", "fsdp", "adamw_torch_fused", 2, {**VELORA, "gc": True},
                 id="fsdp-velora-gc-accum2"),
    pytest.param("llama20", "fsdp-no-reshard", "adamw", 4, {}, id="fsdp-no-reshard-accum4",
                 marks=pytest.mark.slow),
]  # fmt: skip


@pytest.mark.parametrize(("model", "parallel", "optimizer", "accum", "strategy"), WARMUPS)
def test_the_fewest_warm_up_forwards_give_the_same_rank_rows(
    request, monkeypatch, model, parallel, optimizer, accum, strategy
):
    # The estimate warms a fake rank up with one step of one forward (two under DDP, whose
    # buckets are rebuilt at the second); a real rank's warm-up is one step over all its
    # micro-batches (two steps under DDP). The tracked step after either must be the same:
    # optimizer state, VeLoRA's v, FSDP2's lazy init, DDP's rebuilt buckets, a low-rank
    # optimizer's projections (its tracked step is a forced refresh).
    from velora_cli.parallel import fake

    spec = StepSpec(
        model=request.getfixturevalue(model), batch_size=2 * accum, seq_len=32,
        grad_accum_steps=accum, world_size=2, parallel=parallel, optimizer=optimizer,
        strategy=Strategy(**strategy),
    )  # fmt: skip
    fewest = ParallelEstimateBackend(expandable=False, shortcuts=False).measure(spec)
    monkeypatch.setattr(fake, "FEWEST_WARMUP", False)
    steps = ParallelEstimateBackend(expandable=False, shortcuts=False).measure(spec)
    assert fewest["status"] == "ok", fewest.get("error")
    differ = {k: (fewest.get(k), steps.get(k)) for k in fewest.keys() | steps.keys()
              if fewest.get(k) != steps.get(k)}  # fmt: skip
    assert not differ
    assert list(fewest) == list(steps)


@pytest.mark.parametrize(
    "optimizer",
    [
        "sgd",
        pytest.param("paged_adamw_32bit", marks=pytest.mark.slow),
        "galore",
        pytest.param("adarankgrad", marks=pytest.mark.slow),
        pytest.param("adafactor", marks=pytest.mark.slow),
    ],
)
def test_ddp_ranks_with_other_optimizers_equal_the_reference(wide12, optimizer):
    # DDP ranks take the shortcut with the optimizers checked here (`DDP_CHECKED_OPTIMIZERS`).
    # galore's and adarankgrad's tracked step is a forced refresh, which frees every block's old
    # basis (72 MiB here); the shortcut missed those frees while the recording tracker kept the
    # fake rank's storages alive (the recorder test below)
    spec = StepSpec(
        model=wide12, batch_size=4, seq_len=32, grad_accum_steps=2, world_size=2,
        parallel="ddp", optimizer=optimizer, strategy=Strategy(gc=True),
    )  # fmt: skip
    row = ParallelEstimateBackend(expandable=False).measure(spec)
    ref = ParallelEstimateBackend(expandable=False, shortcuts=False).measure(spec)
    method = row.pop("estimate_method")
    ref.pop("estimate_method")
    assert row == ref, method
    assert method.startswith("extrapolated from 2, 3, 4"), method


@pytest.mark.parametrize("recording", [True, False])
def test_the_recorder_keeps_no_fake_rank_storage_alive(recording):
    # A per-rank step runs on fake CPU tensors, whose storages are on meta: the recording
    # tracker must still let the step free a block's state it replaces (a low-rank optimizer's
    # refreshed basis), as a plain tracker sees it freed. It kept them alive once, and the
    # shallow steps, the synthesis and the extrapolation agreed on a step without those frees.
    import torch
    from torch import nn

    from velora_cli.measure.tracker import MemoryTracker
    from velora_cli.parallel.fake import fake_tensors
    from velora_cli.shortcut.record import RecordingTracker, block_storages

    with fake_tensors():
        stack = nn.ModuleList([nn.Linear(16, 16, bias=False) for _ in range(2)])
        model = nn.Sequential(*stack)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for p in model.parameters():
            optimizer.state[p]["basis"] = torch.zeros(16, 8)
        if recording:
            owned = block_storages(stack, optimizer)
            tracker = RecordingTracker(model, optimizer, op_cache=None, owned=owned)
            del owned
        else:
            tracker = MemoryTracker(model, optimizer, trace=True)
        with tracker:
            for p in model.parameters():
                optimizer.state[p]["basis"] = torch.ones(16, 8)  # a refresh
    trace = tracker.trace
    frees = [(trace.op_names[op - 1], nbytes) for op, _, nbytes in trace.events if nbytes < 0]
    # each new basis (16 × 8 fp32, 512 bytes rounded), then the old one freed at its op
    assert frees == [("aten::ones", -512), ("aten::ones", -512)], trace.events


# -- a DDP rank is the same at every world size (parallel/estimate.py `DdpRows`) -----------------


@pytest.mark.parametrize(
    ("optimizer", "strategy"),
    [
        pytest.param("galore", {"gc": True}, id="galore-gc"),
        pytest.param("adamw", VELORA, id="adamw-velora", marks=pytest.mark.slow),
    ],
)
def test_a_ddp_rank_row_does_not_depend_on_the_world_size(wide12, optimizer, strategy):
    # What lets a GPU-count tune step a DDP rank once for every N: on the reference path (every
    # rank stepped at its real depth), rank 0's row at N = 4 and 8 is N = 2's, every field
    def rank_row(world: int) -> dict:
        spec = StepSpec(
            model=wide12, batch_size=4, seq_len=32, grad_accum_steps=2, world_size=world,
            parallel="ddp", optimizer=optimizer, strategy=Strategy(**strategy),
        )  # fmt: skip
        row = ParallelEstimateBackend(expandable=False, shortcuts=False).measure(spec)
        assert row["status"] == "ok", row.get("error")
        return row["ranks"][0]

    two = rank_row(2)
    for world in (4, 8):
        assert rank_row(world) == two, world


def test_a_ddp_rank_is_stepped_once_for_every_world_size(monkeypatch, wide12):
    from velora_cli.parallel import estimate

    calls = []
    stepped = estimate.estimate_rank
    monkeypatch.setattr(
        estimate, "estimate_rank", lambda *a, **k: calls.append(a[0].world_size) or stepped(*a, **k)
    )

    def spec(world: int) -> StepSpec:
        return StepSpec(
            model=wide12, batch_size=2, seq_len=32, world_size=world, parallel="ddp",
            optimizer="sgd", strategy=Strategy(gc=True),
        )  # fmt: skip

    backend = ParallelEstimateBackend(expandable=False)
    first, again = backend.measure(spec(2)), backend.measure(spec(4))
    assert calls == [2]  # the second world size reused the first's rank row
    assert again["estimate_method"].endswith("the same at every world size")
    # the reused rank row and the job row are the reference's at N = 4
    ref = ParallelEstimateBackend(expandable=False, shortcuts=False).measure(spec(4))
    for row in (again, ref):
        row.pop("estimate_method")
    assert again == ref
    assert first["estimate_method"] == "extrapolated from 2, 3, 4 blocks"


# -- DDP's flat copy of the module buffers (rank_shortcut.check_broadcast, grown_logs) ----------


def _buffered_stack(blocks: int, per_block: int):
    import torch
    from torch import nn

    stack = nn.ModuleList()
    for _ in range(blocks):
        block = nn.Module()
        block.register_buffer("v", torch.empty(per_block, device="meta"))
        stack.append(block)
    return stack


def test_the_buffer_broadcast_is_refused_where_a_dtype_splits_over_buckets():
    # torch's own assignment (`dist._compute_bucket_assignment_by_size`, as the C++
    # broadcast_coalesced calls it) over the buffers written out at the real depth: 4 blocks of
    # 1 KiB fit one bucket of 250 MiB (DDP's broadcast_bucket_size), not one of 3 KiB
    from types import SimpleNamespace

    import torch

    from velora_cli.parallel.rank_shortcut import check_broadcast

    stack = _buffered_stack(2, 256)
    outside = torch.empty(64, device="meta")
    ddp = SimpleNamespace(modules_buffers=[*stack.buffers(), outside],
                          broadcast_bucket_size=250 * 1024 * 1024)  # fmt: skip
    check_broadcast(ddp, stack, 4)
    ddp.broadcast_bucket_size = 3 * 1024
    check_broadcast(ddp, stack, 2)  # 2 KiB and the outside buffer: one bucket
    with pytest.raises(NotExtrapolable, match="splits a dtype's buffers"):
        check_broadcast(ddp, stack, 4)
    ddp.modules_buffers = [outside, *reversed(list(stack.buffers()))]
    with pytest.raises(NotExtrapolable, match="not in block order"):
        check_broadcast(ddp, stack, 4)


def test_a_storage_outside_the_blocks_grows_only_when_asked_and_only_on_a_line():
    from velora_cli.shortcut.synthesis import _same_events

    grown = [("+", 4288, "activations"), ("+", 6176, "activations"), ("+", 8064, "activations")]
    with pytest.raises(NotExtrapolable, match="differs between depths"):
        _same_events(grown)  # the single-process synthesis: the same at every depth
    assert _same_events(grown, ([2, 3, 4], 32)) == ("+", 4288 + 30 * 1888, "activations")
    bent = [*grown[:2], ("+", 8065, "activations")]
    with pytest.raises(NotExtrapolable, match="not affine"):
        _same_events(bent, ([2, 3, 4], 32))


@pytest.mark.slow
def test_without_the_stand_in_a_rounded_copy_is_refused_and_the_reference_answers(
    monkeypatch, wide12
):
    # 2,304 bytes of VeLoRA vectors a block: the flat copy rounds to 5,632, 8,192, 10,240 bytes
    # at 2, 3 and 4 blocks, not a line; without `grown_logs` the curve is refused, and the row
    # is the real depth's
    from velora_cli.parallel import rank_shortcut

    monkeypatch.setattr(rank_shortcut, "grown_logs", lambda logs, *a: logs)
    spec = StepSpec(
        model=wide12, batch_size=2, seq_len=32, world_size=2, parallel="ddp",
        strategy=Strategy(**{**VELORA, "num_groups": 16}),
    )  # fmt: skip
    row = ParallelEstimateBackend(expandable=False).measure(spec)
    ref = ParallelEstimateBackend(expandable=False, shortcuts=False).measure(spec)
    method = row.pop("estimate_method")
    ref.pop("estimate_method")
    assert method.startswith("full depth (the memory at a point outside blocks"), method
    assert row == ref


def test_a_ddp_rank_row_from_another_process_is_reused(monkeypatch, wide12):
    # The tune's helper process returns job rows: the rank row is read back from one
    # (`rank_of_job`) and serves the other world sizes, as if this process had stepped it; one
    # `DdpRows` is shared by the rounds (`search.world_sizes`)
    from velora_cli.parallel import estimate

    def spec(world: int) -> StepSpec:
        return StepSpec(
            model=wide12, batch_size=2, seq_len=32, world_size=world, parallel="ddp",
            optimizer="sgd", strategy=Strategy(gc=True),
        )  # fmt: skip

    helper = ParallelEstimateBackend(expandable=False, ranks=(0,))
    made = helper.measure(spec(2))
    rank_row = next(iter(helper.ddp_rows.rows.values()))
    assert estimate.rank_of_job(made) == rank_row  # every field, in order
    shared = estimate.DdpRows()
    first = ParallelEstimateBackend(expandable=False, ranks=(0,), ddp_rows=shared)
    first.learn(spec(2), made)
    monkeypatch.setattr(estimate, "estimate_rank", lambda *a, **k: pytest.fail("stepped"))
    later = ParallelEstimateBackend(expandable=False, ranks=(0,), ddp_rows=shared)
    again = later.measure(spec(4))
    assert again["estimate_method"].endswith("the same at every world size")
    monkeypatch.undo()
    ref = ParallelEstimateBackend(expandable=False, ranks=(0,), shortcuts=False).measure(spec(4))
    for row in (again, ref):
        row.pop("estimate_method")
    assert again == ref


# -- warmed ranks shared by candidates differing in micro-batch size (fake.WarmRanks) ------------


def test_warmed_ranks_shared_across_micro_batch_sizes_give_the_reference_rows(llama20):
    # A tune asks for FSDP2 jobs interleaved, each at several micro-batch sizes (batch 4 as 4x1,
    # 2x2, 1x4): the fast path keeps each shallow rank warmed and steps it again at the next
    # size. Every row must be the reference path's (fresh ranks at the real depth), byte for
    # byte, and the kept ranks must have been used (else this checks nothing).
    from velora_cli.parallel.fake import WarmRanks

    def spec(parallel, accum, strategy):
        return StepSpec(
            model=llama20, batch_size=4, seq_len=32, grad_accum_steps=accum, world_size=2,
            parallel=parallel, strategy=Strategy(**strategy),
        )  # fmt: skip

    specs = [spec("fsdp", 1, {**VELORA, "gc": True}), spec("fsdp-no-reshard", 2, {}),
             spec("fsdp", 4, {**VELORA, "gc": True})]  # fmt: skip
    fast = ParallelEstimateBackend(expandable=False, ranks=(0,))  # rank 0, as the tune asks
    fast.keep_warm()
    rows = [fast.measure(s) for s in specs]
    kept = fast.shortcut().warm
    assert kept.reused == 3  # the second fsdp job: its three shallow ranks
    # the reference path opens its own fake world: the kept one is closed first
    reference = ParallelEstimateBackend(expandable=False, ranks=(0,), shortcuts=False)
    refs = [reference.measure(s) for s in specs]
    assert WarmRanks._held is None and not kept.entries
    for row, ref in zip(rows, refs, strict=True):
        assert row["status"] == "ok", row.get("error")
        assert row.pop("estimate_method").startswith("extrapolated from 2, 3, 4")
        ref.pop("estimate_method")
        assert row == ref and list(row) == list(ref)
    fast.release()
    assert fast.shortcut().warm is None
