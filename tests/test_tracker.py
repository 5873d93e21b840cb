"""MemoryTracker against independent counts: hand sums, saved tensors, meta vs CPU, MemTracker."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from velora_cli.measure.tracker import CATEGORIES, MemoryTracker

BATCH, SEQ = 2, 16


def tiny_mlp(device: str) -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))


def tiny_llama(device: str) -> nn.Module:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    with torch.device(device):
        # eager attention runs the same ops on CPU and meta (sdpa would not: see test_attention.py)
        return LlamaForCausalLM._from_config(config, attn_implementation="eager")


MODELS = {"mlp": tiny_mlp, "llama": tiny_llama}


def forward(kind: str, model: nn.Module, device: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and the tensors the caller still holds (input, output), which are activations too."""
    if kind == "mlp":
        x = torch.ones(32, 64, device=device)
        out = model(x)
        loss = out.pow(2).mean()
        return loss, [x, out, loss]
    ids = torch.zeros(BATCH, SEQ, dtype=torch.long, device=device)
    output = model(input_ids=ids, labels=ids)
    return output.loss, [ids, output.logits, output.loss]


def storage_bytes(tensors, round_to: int = 1) -> int:
    """Bytes of the distinct storages behind `tensors`, each rounded up to `round_to`."""
    storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}
    return sum(-(-n // round_to) * round_to for n in storages.values())


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def tracked_step(kind: str, device: str, round_to: int, **adamw) -> dict:
    """One AdamW step under a tracker, with snapshots and hand counts taken along the way."""
    model = MODELS[kind](device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, **adamw)
    with MemoryTracker(model, optimizer, round_to=round_to) as tracker:
        with tracker.phase("forward"):
            loss, held = forward(kind, model, device)
        after_forward = tracker.snapshot()
        with tracker.phase("backward"):
            loss.backward()
        with tracker.phase("optimizer"):
            optimizer.step()
        after_step = tracker.snapshot()
        on_device = [t for t in state_tensors(optimizer) if t.device.type == device]
        hand = {
            "params": storage_bytes(model.parameters(), round_to),
            "buffers": storage_bytes(model.buffers(), round_to),
            "grads": storage_bytes([p.grad for p in model.parameters()], round_to),
            "optimizer": storage_bytes(on_device, round_to),
        }
        with tracker.phase("zero_grad"):
            optimizer.zero_grad(set_to_none=True)
        after_zero = tracker.snapshot()
        del loss, held
    return {
        "tracker": tracker,
        "after_forward": after_forward,
        "after_step": after_step,
        "after_zero": after_zero,
        "hand": hand,
        "n_params": len(list(model.parameters())),
    }


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_end_of_step_matches_hand_count(kind):
    run = tracked_step(kind, "cpu", round_to=1)
    for category, expected in run["hand"].items():
        assert run["after_step"][category] == expected, (category, run["after_step"], expected)
    # A tiny model peaks inside optimizer.step(): params, grads and both AdamW moments are alive.
    peak = run["tracker"].peak_breakdown
    for category in ("params", "grads", "optimizer"):
        assert peak[category] == run["hand"][category], (category, peak, run["hand"])


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_zero_grad_set_to_none_frees_grads(kind):
    run = tracked_step(kind, "cpu", round_to=512)
    assert run["after_step"]["grads"] > 0
    assert run["after_zero"]["grads"] == 0
    assert run["after_zero"]["optimizer"] == run["after_step"]["optimizer"]


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_breakdowns_sum_to_their_peaks(kind):
    tracker = tracked_step(kind, "cpu", round_to=512)["tracker"]
    assert set(tracker.peak_breakdown) == set(CATEGORIES)
    assert sum(tracker.peak_breakdown.values()) == tracker.peak_bytes
    assert max(tracker.phase_peaks.values()) == tracker.peak_bytes
    for name, peak in tracker.phase_peaks.items():
        assert sum(tracker.phase_breakdown(name).values()) == peak, name
    assert tracker.phase_peaks["forward"] < tracker.phase_peaks["optimizer"]


@pytest.mark.parametrize("kind", ["mlp", "llama"])
@pytest.mark.parametrize("round_to", [1, 512])
def test_forward_activations_equal_saved_tensors(kind, round_to):
    model = MODELS[kind]("cpu")
    params = {id(p.untyped_storage()) for p in model.parameters()}
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t.untyped_storage()) not in params:
            saved.append(t)
        return t

    with MemoryTracker(model, round_to=round_to) as tracker:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, held = forward(kind, model, "cpu")
        activations = tracker.snapshot()["activations"]
    expected = storage_bytes(saved + held, round_to)
    assert activations == pytest.approx(expected, rel=0.01), (activations, expected)
    assert activations == expected  # exact in practice; the 1% is the contract


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_meta_matches_cpu(kind):
    cpu = tracked_step(kind, "cpu", round_to=512)
    meta = tracked_step(kind, "meta", round_to=512)
    cpu_peak, meta_peak = cpu["tracker"].peak_breakdown, meta["tracker"].peak_breakdown
    assert meta["tracker"].peak_bytes == pytest.approx(cpu["tracker"].peak_bytes, rel=0.01)
    # The only difference: AdamW's state["step"] scalars live on the CPU even for a meta model
    # (as on a GPU), so only the CPU run counts them, one 512-byte block per parameter.
    step_scalars = cpu["n_params"] * 512
    assert cpu_peak["optimizer"] - meta_peak["optimizer"] == step_scalars
    for category in CATEGORIES:
        if category != "optimizer":
            assert cpu_peak[category] == meta_peak[category], category
    assert meta["after_forward"] == cpu["after_forward"]
    assert meta["tracker"].phase_peaks["backward"] == cpu["tracker"].phase_peaks["backward"]


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_total_matches_torch_memtracker(kind):
    """torch's private MemTracker is a second implementation; on CPU it does not round."""
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    ours = tracked_step(kind, "cpu", round_to=1, foreach=False)["tracker"].peak_bytes
    model = MODELS[kind]("cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    theirs = mem_tracker.MemTracker()
    theirs.track_external(model, optimizer)
    with theirs:
        loss, held = forward(kind, model, "cpu")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss, held
    assert ours == theirs.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def test_adamw_foreach_runs_on_meta():
    run = tracked_step("llama", "meta", round_to=1, foreach=True)
    # exp_avg and exp_avg_sq per parameter; the step counters are CPU scalars, not counted.
    assert run["after_step"]["optimizer"] == 2 * run["hand"]["params"]
    assert run["tracker"].peak_breakdown["temporaries"] > 0  # foreach sqrt of all moments


def test_views_count_once_and_allocations_round_up():
    model = tiny_mlp("cpu")
    for round_to, expected in [(1, 40), (512, 512)]:
        with MemoryTracker(model, round_to=round_to) as tracker:
            x = torch.empty(10)  # 40 bytes
            views = [x.view(2, 5), x[3:], x.unsqueeze(0)]
            empty = torch.empty(0)
            assert tracker.snapshot()["activations"] == expected
        del x, views, empty


def test_resize_in_place_is_tracked():
    model = tiny_mlp("cpu")
    with MemoryTracker(model, round_to=1) as tracker:
        t = torch.empty(4)
        t.resize_(256)
        assert tracker.snapshot()["activations"] == 1024
        assert tracker.peak_breakdown["activations"] == 1024
        del t
        assert tracker.snapshot()["activations"] == 0


def test_storages_on_other_devices_are_ignored():
    model = tiny_mlp("meta")
    with MemoryTracker(model, round_to=1) as tracker:
        on_cpu = torch.ones(1000)
        on_meta = torch.ones(1000, device="meta")
        assert tracker.snapshot()["activations"] == 4000
    del on_cpu, on_meta


def test_checkpoint_recompute_counts_as_activations():
    model = tiny_mlp("cpu")
    seen: list[dict[str, int]] = []
    with MemoryTracker(model, round_to=1) as tracker:
        model[1].register_forward_hook(lambda *_: seen.append(tracker.snapshot()))
        x = torch.ones(32, 64, requires_grad=True)
        out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
        out.pow(2).mean().backward()
    _, recompute = seen
    # Inside backward, the recomputed Linear and GELU outputs (32x256 fp32 each) are activations.
    assert recompute["activations"] >= 2 * 32 * 256 * 4
    assert recompute["temporaries"] < 32 * 256 * 4


def test_invalid_round_to_and_reentry():
    model = tiny_mlp("cpu")
    with pytest.raises(ValueError, match="round_to"):
        MemoryTracker(model, round_to=0)
    tracker = MemoryTracker(model)
    with tracker, pytest.raises(RuntimeError, match="re-entrant"):
        tracker.__enter__()
    with pytest.raises(KeyError, match="no phase"):
        tracker.phase_breakdown("forward")


# -- the allocation trace ---------------------------------------------------------------------


class _Checked(MemoryTracker):
    """A tracker that records its live total after every op, to compare with the trace."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.totals: list[tuple[int, int]] = []  # (events so far, live bytes)

    def _record_op_outputs(self, out, *, same_op=False):
        super()._record_op_outputs(out, same_op=same_op)
        self.totals.append((len(self._events), self.current_bytes))


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("round_to", [1, 512])
def test_trace_is_complete_live_bytes_match_the_tracker_at_every_op(device, round_to):
    model = tiny_llama(device)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
    for _ in range(2):  # the traced step is the third: optimizer state exists
        loss, _held = forward("llama", model, device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss, _held
    with _Checked(model, optimizer, round_to=round_to, trace=True) as tracker:
        with tracker.phase("forward_backward"):
            loss, held = forward("llama", model, device)
            loss.backward()
            del loss, held
        with tracker.phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    trace = tracker.trace
    live = trace.live_bytes()
    assert tracker.totals, "no op was recorded"
    for events, total in tracker.totals:
        assert live[events] == total
    assert max(live) == tracker.peak_bytes
    # everything the step allocated it freed again (activations, gradients, temporaries)
    assert live[-1] == live[0]
    assert [name for name, _, _ in trace.phases] == ["forward_backward", "optimizer"]
    assert trace.phases[0][2] == trace.phases[1][1] and trace.phases[1][2] == len(trace.events)
    # gradients are allocated in backward as temporaries and end up as grads
    grads = {sid for _, sid, n in trace.events if n > 0 and trace.categories[sid] == "grads"}
    assert len(grads) == sum(1 for p in model.parameters() if p.requires_grad)
    initial = {trace.categories[sid] for sid, _ in trace.initial}
    assert initial == {"params", "buffers", "optimizer"}  # buffers: RoPE inv_freq
    # every op is named (where the allocator model puts kernel scratch), events count ops from 1
    assert len(trace.op_names) == trace.ops and all("::" in n for n in trace.op_names)
    assert all(1 <= op <= trace.ops for op, _, _ in trace.events)
    assert "aten::embedding_dense_backward" in trace.op_names


def test_trace_is_refused_without_trace_true():
    model = tiny_mlp("cpu")
    with MemoryTracker(model) as tracker:
        model(torch.ones(2, 64)).sum()
    with pytest.raises(RuntimeError, match="trace=True"):
        _ = tracker.trace


def test_storage_resize_is_a_free_and_an_allocation_with_track_resize():
    """FSDP2 frees unsharded parameters with UntypedStorage.resize_(0), not a dispatched op."""
    model = tiny_mlp("cpu")
    original = torch.UntypedStorage.resize_
    with MemoryTracker(model, round_to=1, trace=True, track_resize=True) as tracker:
        t = torch.empty(256)  # 1024 B
        start = tracker.current_bytes
        t.untyped_storage().resize_(0)
        assert tracker.current_bytes == start - 1024
        t.untyped_storage().resize_(2048)
        assert tracker.current_bytes == start + 1024
        trace = tracker.trace
    assert torch.UntypedStorage.resize_ is original  # restored on exit
    assert [n for _, _, n in trace.events[-2:]] == [-1024, 2048]
    assert trace.live_bytes()[-1] == tracker.current_bytes
    with MemoryTracker(model, round_to=1) as plain:  # without it the free goes unseen
        u = torch.empty(256)
        u.untyped_storage().resize_(0)
        assert plain.snapshot()["activations"] == 1024
    del t, u


def test_roles_give_storages_the_tracker_cannot_see_their_category():
    model = tiny_mlp("cpu")
    bucket = torch.empty(512)  # made before tracking, like DDP's gradient buckets
    gathered = torch.empty(128)
    gathered.untyped_storage().resize_(0)  # freed until re-allocated, like FSDP2's
    roles = lambda: [(bucket, "comm"), (gathered, "unsharded")]  # noqa: E731
    tracker = MemoryTracker(
        model, round_to=1, extra_categories=("unsharded", "comm"), roles=roles, track_resize=True
    )
    with tracker:
        gathered.untyped_storage().resize_(512)
        scratch = torch.ones(64)
        tracker.assign(scratch, "comm")
        tracker.assign(model[0].weight, "comm")  # a parameter stays a parameter
    at_peak = tracker.peak_breakdown
    assert list(at_peak) == ["params", "buffers", "grads", "optimizer", "unsharded", "comm",
                             "activations", "temporaries"]  # fmt: skip
    assert at_peak["comm"] == 2048 + 256 and at_peak["unsharded"] == 512
    assert at_peak["params"] == sum(p.numel() * 4 for p in model.parameters())
    with pytest.raises(ValueError, match="unknown category"):
        tracker.assign(scratch, "gathered")
    with pytest.raises(ValueError, match="repeat built-in"):
        MemoryTracker(model, extra_categories=("grads",))
