"""The op counter against FLOP and byte counts derived by hand: a linear layer, a VeLoRA layer
(factorized weight gradient), fused attention, an AdamW step, and the rules for views, ``out=``,
broadcasts and host-side ops."""

import pytest
import torch
from torch import nn

from velora_cli.timing.opcount import OpCounter, StepCounts, op_cost, tensor_bytes

T, D, OUT, M = 64, 32, 48, 8  # tokens, in features, out features, sub-token size
F32 = 4


def counted(fn) -> StepCounts:
    counter = OpCounter("meta")
    with counter:
        fn(counter)
    return counter.counts()


def ops_of(counts: StepCounts, phase: str | None = None) -> list:
    """[(op, count)] of a phase (all phases when None), in dispatch order."""
    return [
        (op, n) for s in counts.segments if phase is None or s.phase == phase for op, n in s.ops
    ]


def meta(*shape, dtype=torch.float32, grad=False):
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


def test_linear_forward_and_backward():
    with torch.device("meta"):
        layer = nn.Linear(D, OUT)
    x, g = meta(T, D), meta(T, OUT)

    def step(c):
        with c.phase("forward"):
            y = layer(x)
        with c.phase("backward"):
            y.backward(g)

    counts = counted(step)
    (fwd, n), = ops_of(counts, "forward")  # fmt: skip
    # y = addmm(b, x, Wᵀ): 2·T·D·OUT FLOPs; reads b, x, W, writes y
    assert (fwd.op, fwd.kind, n) == ("addmm", "gemm", 1)
    assert fwd.flops == 2 * T * D * OUT
    assert fwd.bytes == F32 * (OUT + T * D + OUT * D + T * OUT)
    assert fwd.gemm == (1, T, OUT, D)
    back = {op.op: op for op, _ in ops_of(counts, "backward")}
    assert set(back) == {"mm", "sum"}  # x needs no gradient: no grad_input GEMM
    # grad_W = gᵀ·x (as xᵀ·g, then a transposed view): reads g and x, writes (OUT, D)
    assert back["mm"].flops == 2 * T * D * OUT
    assert back["mm"].bytes == F32 * (T * OUT + T * D + OUT * D)
    # grad_b = Σ_t g: reads g, writes (OUT,); a reduction counts a FLOP per element read
    assert back["sum"].kind == "reduction"
    assert back["sum"].bytes == F32 * (T * OUT + OUT) and back["sum"].flops == T * OUT
    assert counts.flops == 4 * T * D * OUT + T * OUT


def test_velora_layer_factorized_weight_gradient():
    from velora_cli.methods.velora import VeLoRALinear

    with torch.device("meta"):
        layer = VeLoRALinear.from_linear(nn.Linear(D, OUT, bias=False), sub_token_size=M)
    layer.train()
    layer._v_ready = True  # v is set: the step does not average the batch (the first one does)
    x, g = meta(T, D, grad=True), meta(T, OUT)

    def step(c):
        with c.phase("forward"):
            y = layer(x)
        with c.phase("backward"):
            y.backward(g)

    counts = counted(step)
    fwd = {op.op: op for op, _ in ops_of(counts, "forward")}
    # y = x·Wᵀ; compress z = group(x)·v: (T·D/M, M)·(M,) = one multiply-add per element of x
    assert fwd["mm"].flops == 2 * T * D * OUT
    assert fwd["mv"].flops == 2 * T * D
    assert fwd["mv"].bytes == F32 * (T * D + M + T * D // M)  # reads x and v, writes z
    back = [op for op, _ in ops_of(counts, "backward")]
    grad_x, factors, expand = back
    assert grad_x.flops == 2 * T * OUT * D  # exact grad_input = g·W
    # grad_W factorized: gᵀ·Z, (OUT, T)·(T, D/M): T·OUT·D/M multiply-adds (M times fewer than gᵀ·x)
    assert factors.op == "mm" and factors.flops == 2 * T * OUT * D // M
    assert factors.bytes == F32 * (T * OUT + T * D // M + OUT * D // M)  # x̂ is never built
    # grad_W[o, k·M + m] = v[m]·G[o, k]: an elementwise product written into (OUT, D) (mul out=)
    assert (expand.op, expand.kind) == ("mul", "elementwise")
    assert expand.bytes == F32 * (OUT * D // M + M + OUT * D)  # out= is written, not read


def test_fused_attention_counts_only_unmasked_pairs():
    from torch.utils.flop_counter import flop_registry

    b, h, n, d = 2, 4, 16, 8
    q, k, v = (meta(b, h, n, d, dtype=torch.bfloat16) for _ in range(3))
    flash = torch.ops.aten._scaled_dot_product_flash_attention

    def step(c, causal):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # no .grad to accumulate into
        out = flash(*leaves, 0.0, causal, False)[0]
        out.backward(torch.empty_like(out))

    full = counted(lambda c: step(c, False))
    causal = counted(lambda c: step(c, True))
    (fwd, _), (bwd, _) = ops_of(full)
    # without masking: torch's own formulas (Q·Kᵀ and P·V forward, 5 products backward)
    assert fwd.kind == "attention" and fwd.precision == "bf16"
    assert fwd.flops == flop_registry[flash](q, k, v)
    assert fwd.flops == 4 * b * h * n * n * d
    assert bwd.flops == 10 * b * h * n * n * d
    pairs = n * (n + 1) // 2  # causal: query i sees keys 0..i
    (cfwd, _), (cbwd, _) = ops_of(causal)
    assert cfwd.flops == 4 * b * h * pairs * d and cbwd.flops == 10 * b * h * pairs * d
    # bytes: q, k, v read; out (bf16), logsumexp (fp32, per query row) and the rng state written
    qkv = 2 * b * h * n * d
    assert fwd.bytes == 3 * qkv + qkv + 4 * b * h * n + 16 + 8


def test_adamw_step_is_twenty_passes_over_the_parameters():
    params = [nn.Parameter(meta(300, 7)), nn.Parameter(meta(5))]
    for p in params:
        p.grad = torch.empty_like(p)
    opt = torch.optim.AdamW(params, foreach=True)
    opt.step()  # creates the state (first step)

    counts = counted(lambda c: opt.step())
    ops = [op for op, n in ops_of(counts) for _ in range(n)]
    assert {op.kind for op in ops} == {"foreach"}
    # the step counters live on the host (as on a GPU, capturable=False): not counted
    total = sum(p.numel() for p in params) * F32
    # decay p·(1 − lr·λ) (read + write: 2), lerp m←g (3), v·β₂ (2), v += g² (v, g once, v: 3),
    # denom = sqrt(v) (2), ÷ bias correction (2), + eps (2), p −= m/denom (4): 20 passes
    assert sum(op.bytes for op in ops) == 20 * total
    addcdiv = next(op for op in ops if op.op == "_foreach_addcdiv_")
    assert (addcdiv.tensors, addcdiv.lists) == (2, 3)  # p, m, denom lists
    assert addcdiv.chunks == 1 + 1  # each tensor is under one 65536-element chunk


def test_views_allocations_and_host_ops_move_nothing():
    x = meta(4, 8)
    view = torch.ops.aten.view.default
    assert op_cost(view, (x, [8, 4]), {}, view(x, [8, 4]), "meta") is None
    unsafe = torch.ops.aten._unsafe_view.default
    assert op_cost(unsafe, (x, [32]), {}, unsafe(x, [32]), "meta") is None
    empty = torch.ops.aten.empty.memory_format
    assert op_cost(empty, ([4],), {"device": "meta"}, meta(4), "meta") is None
    cpu = torch.zeros(3)
    add = torch.ops.aten.add.Tensor
    assert op_cost(add, (cpu, cpu), {}, cpu + cpu, "meta") is None  # host tensor on a meta step


def test_broadcast_is_read_once_and_in_place_reads_and_writes():
    x, bias = meta(T, OUT), meta(OUT)
    add = torch.ops.aten.add.Tensor
    cost = op_cost(add, (x, bias.expand(T, OUT)), {}, x + bias, "meta")
    assert cost.bytes == F32 * (T * OUT + OUT + T * OUT)  # the expanded bias is OUT distinct values
    assert tensor_bytes(bias.expand(T, OUT)) == F32 * OUT
    add_ = torch.ops.aten.add_.Tensor
    cost = op_cost(add_, (x, x), {}, x, "meta")
    assert cost.bytes == F32 * (
        T * OUT + T * OUT
    )  # self read once (the same tensor twice), written
    zero_ = torch.ops.aten.zero_.default
    assert op_cost(zero_, (x,), {}, x, "meta").bytes == F32 * T * OUT  # written, never read


def test_embedding_reads_only_the_rows_it_gathers():
    weight, ids = meta(32000, 64), torch.empty(2, 16, dtype=torch.long, device="meta")
    embedding = torch.ops.aten.embedding.default
    out = embedding(weight, ids)
    cost = op_cost(embedding, (weight, ids), {}, out, "meta")
    assert cost.bytes == 2 * 16 * 8 + 2 * (2 * 16 * 64 * F32)  # ids + rows read + rows written


@pytest.mark.parametrize(("rows", "cols"), [(64, 16), (16, 64)])
def test_svd_and_qr_flops_follow_golub_van_loan(rows, cols):
    a = meta(rows, cols)
    big, small = max(rows, cols), min(rows, cols)

    def step(c):
        torch.linalg.svd(a, full_matrices=False)
        torch.linalg.qr(a)

    svd, qr = (op for op, _ in ops_of(counted(step)))
    assert (svd.op, svd.kind) == ("_linalg_svd", "linalg")
    assert svd.flops == 6 * big * small**2 + 20 * small**3
    assert qr.flops == 4 * small**2 * (big - small // 3)


def test_phases_and_micro_batches_are_kept_apart():
    x = meta(4, 4)

    def step(c):
        for _ in range(2):
            with c.phase("forward"):
                x.mul(2)
            with c.phase("backward"):
                x.add(1)
        with c.phase("optimizer"):
            x.sqrt()

    counts = counted(step)
    assert [(s.phase, s.micro) for s in counts.segments] == [
        ("forward", 0),
        ("backward", 0),
        ("forward", 1),
        ("backward", 1),
        ("optimizer", None),
    ]
    assert counts.micro_batches == 2


def test_large_new_outputs_are_marked_fresh():
    from velora_cli.timing.opcount import FRESH_ALLOCATION

    big, small = meta(FRESH_ALLOCATION // F32), meta(1024)
    sqrt, sqrt_ = torch.ops.aten.sqrt.default, torch.ops.aten.sqrt_.default
    assert op_cost(sqrt, (big,), {}, big.sqrt(), "meta").fresh_bytes == FRESH_ALLOCATION
    assert op_cost(sqrt, (small,), {}, small.sqrt(), "meta").fresh_bytes == 0
    assert op_cost(sqrt_, (big,), {}, big, "meta").fresh_bytes == 0  # in place: no new memory


def test_counters_sharing_a_cost_table_count_what_each_op_costs_afresh(monkeypatch):
    """`OpCosts` shared by counters (the estimate's fast path: one table for every row) gives
    each step the counts of every op's cost worked out afresh (no table at all), across
    different models and aliasing (x + x reads one tensor, x + y two of the same shape), and
    answers ops of earlier steps from it; the views it skips (`_never_counted`) cost nothing."""
    from velora_cli.timing import opcount
    from velora_cli.timing.opcount import OpCosts

    def steps():
        with torch.device("meta"):
            small, wide = nn.Linear(D, OUT), nn.Linear(D, 2 * OUT)
        x, y = meta(T, D, grad=True), meta(T, D)

        def linear(layer):
            def step(c):
                with c.phase("forward"):
                    loss = layer(x).sum()
                with c.phase("backward"):
                    loss.backward()
                with c.phase("optimizer"):
                    torch.optim.AdamW(layer.parameters(), foreach=True).step()

            return step

        def adds(c):
            with c.phase("forward"):
                (x.detach() + x.detach()).sum()
                (x.detach() + y).sum()
                x.detach().add_(y)

        return [linear(small), linear(wide), adds, linear(small), adds]

    with monkeypatch.context() as patch:
        # no key and no op skipped: op_cost for every op, views included
        patch.setattr(opcount, "_cost_key", lambda *args: None)
        patch.setattr(opcount, "_never_counted", lambda func: False)
        fresh = [counted(step) for step in steps()]
    costs = OpCosts()
    counters = [OpCounter("meta", costs) for _ in fresh]
    shared = []
    for counter, step in zip(counters, steps(), strict=True):
        with counter:
            step(counter)
        shared.append(counter.counts())
    assert shared == fresh
    alone = OpCounter("meta")
    with alone:
        steps()[3](alone)
    assert counters[3].cost_hits > alone.cost_hits  # earlier steps' ops found in the table
    assert costs.table("cpu") == {}  # one table per device type


@pytest.mark.parametrize("cached", [False, True])
def test_a_tracker_counting_inside_its_mode_counts_what_a_stacked_counter_counts(cached):
    """`MemoryTracker.counting` (the estimate's fast path: the counter called inside the
    tracker's mode) gives the counts, the op sequence and the trace of the counter entered as a
    mode of its own above the tracker (the reference path), through a checkpointed block's
    recomputation in backward and a foreach AdamW step, with and without the meta-kernel cache."""
    from torch.utils.checkpoint import checkpoint

    from velora_cli.measure.meta_ops import CachedTracker, MetaOpCache

    def run(fused: bool) -> list:
        with torch.device("meta"):
            model = nn.Sequential(nn.Linear(D, OUT), nn.GELU(), nn.Linear(OUT, OUT))
        optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
        cache = MetaOpCache() if cached else None
        x = meta(T, D)
        steps = []
        for _ in range(2):  # the second with optimizer state (and the cache's entries)
            tracker = CachedTracker(model, optimizer, op_cache=cache, trace=True)
            counter = OpCounter("meta")
            counter.sequence = []
            with tracker, tracker.counting(counter) if fused else counter:
                with counter.phase("forward"):
                    loss = checkpoint(model, x, use_reentrant=False).sum()
                with counter.phase("backward"):
                    loss.backward()
                with counter.phase("optimizer"):
                    optimizer.step()
                    optimizer.zero_grad()
            assert tracker.counter is None  # counting ended with the step
            steps.append((counter.counts(), counter.sequence, tracker.trace, tracker.peak_bytes))
        return steps

    fused, stacked = run(True), run(False)
    assert [s.phase for s in fused[1][0].segments] == ["forward", "backward", "optimizer"]
    assert fused == stacked


def test_cost_keys_from_the_meta_kernel_cache_equal_the_keys_worked_out_afresh(monkeypatch):
    """A tracker answering ops from a `MetaOpCache` hands the cache's argument keys (and, for a
    replay, the outputs' key) to its counter (`meta_ops.OpKey`): every op's cost key built so
    must equal `_cost_key` worked out from the op's arguments and outputs alone (the reference
    path), on ops that differ only in strides, dtype or aliasing (x + x reads one storage, x + y
    two), multi-output and in-place ops, views, an ``out=`` op that resizes its output (keyed as
    it is after the op), and a foreach AdamW step whose step sizes change (the cache keys those
    floats by type, the cost key by value)."""
    from velora_cli.measure.meta_ops import CachedTracker, MetaOpCache
    from velora_cli.timing import opcount

    reference = opcount._cost_key
    shared = []

    def checked(func, args, kwargs, out, known=None):
        key = reference(func, args, kwargs, out, known)
        assert key == reference(func, args, kwargs, out), func
        shared.append(known is not None and known.out is not None)
        return key

    monkeypatch.setattr(opcount, "_cost_key", checked)
    with torch.device("meta"):
        layer = nn.Linear(D, OUT)
    optimizer = torch.optim.AdamW(layer.parameters(), foreach=True)
    cache = MetaOpCache()
    x, y = meta(T, D), meta(T, D)
    for _ in range(2):  # the second step answered from the cache
        tracker = CachedTracker(layer, optimizer, op_cache=cache)
        counter = OpCounter("meta")
        with tracker, tracker.counting(counter):
            with counter.phase("forward"):
                loss = layer(x).sum() + layer(x.t().contiguous().t()).sum()  # other strides
                loss = loss + (x + x).sum() + (x + y).sum() + x.bfloat16().sum()
                loss = loss + x.max(dim=1).values.sum() + x.view(D, T).sum()
            with counter.phase("backward"):
                loss.backward()
            with counter.phase("optimizer"):
                optimizer.step()
                x.add_(y)
                torch.add(x, y, out=meta(0))  # resizes its out= argument: keyed after the op
    assert any(shared)  # replayed outputs keyed from the cache's record
