"""Selective checkpointing and activation offload: real CPU steps, hand-worked bytes, the roofline.

The model is llama-tiny (2 layers, hidden 64, 4 heads of 16, 2 KV heads, MLP 192) in bf16 at
batch 2 × 64 tokens (T = 128), so every saved tensor's size can be written down from the config.
"""

from __future__ import annotations

import pytest
import torch

from velora_cli.estimate.backend import EstimateBackend
from velora_cli.measure.cpu import CpuBackend
from velora_cli.measure.train_step import SpecError, StepSpec, Strategy

SPEC = StepSpec(model="llama-tiny", batch_size=2, seq_len=64, dtype="bf16")
T, H, HEADS, KV, D, MLP, LAYERS, S = 128, 64, 4, 2, 16, 192, 2, 2  # tokens, shapes, bf16 bytes

# What each policy keeps per layer beyond plain checkpointing, from the shapes (bytes):
Q, K, V, OUT = T * HEADS * D * S, T * KV * D * S, T * KV * D * S, T * H * S
GATE = UP = T * MLP * S
DOWN = T * H * S
# attention: the CPU flash kernel's output [B, heads, L, D] and its fp32 logsumexp [B, heads, L]
# (the estimate on meta runs the CUDA flash op: the same two, plus two rng tensors of 16 and 8
# bytes, emulation/attention.py); the saved-tensor counter counts each storage's nbytes
ATTN = T * HEADS * D * S + T * HEADS * 4
KEPT = {
    # torchtitan op: q, v, gate, down (the 1st, 3rd, 5th, 7th mm of q, k, v, o, gate, up,
    # down) and the attention's outputs
    "op": Q + V + GATE + DOWN + ATTN,
    "attn": GATE + UP + DOWN,  # attention recomputed: the MLP's three matmuls kept
    "mlp": Q + K + V + OUT + ATTN,  # MLP recomputed: the attention's matmuls and output kept
}


@pytest.fixture(scope="module")
def cpu_rows():
    backend = CpuBackend(warmup=1, steps=1)
    strategies = [Strategy(gc=True)] + [Strategy(gc=True, sac=k) for k in KEPT]
    strategies += [Strategy(gc=True, offload="inputs"), Strategy(offload="all"), Strategy()]
    return {s.label: backend.measure(SPEC.with_strategy(s)) for s in strategies}


@pytest.fixture(scope="module")
def estimate_rows():
    backend = EstimateBackend()
    strategies = [Strategy(gc=True)] + [Strategy(gc=True, sac=k) for k in KEPT]
    strategies += [Strategy(gc=True, offload="inputs"), Strategy(offload="all"), Strategy()]
    return {s.label: backend.measure(SPEC.with_strategy(s)) for s in strategies}


@pytest.mark.parametrize("kind", list(KEPT))
def test_sac_keeps_the_policy_outputs_on_a_real_cpu_step(cpu_rows, kind):
    row, gc = cpu_rows[f"sac {kind}"], cpu_rows["gc"]
    assert row["status"] == "ok", row.get("error")
    kept = row["activation_bytes"] - gc["activation_bytes"]
    assert kept == LAYERS * KEPT[kind], (kind, kept, LAYERS * KEPT[kind])
    # the tracker sees the kept outputs alive: the peak grows over plain checkpointing (by at
    # most what is kept, as the cache is consumed while the backward runs)
    grown = row["fwd_bwd_peak_bytes"] - gc["fwd_bwd_peak_bytes"]
    assert 0 < grown <= LAYERS * KEPT[kind] + 512 * 16, (kind, grown)
    assert row["peak_bytes"] < cpu_rows["baseline"]["peak_bytes"]


@pytest.mark.parametrize("label", ["sac op", "sac attn", "sac mlp", "gc + offload inputs",
                                   "offload all"])  # fmt: skip
def test_estimate_matches_the_cpu_step(cpu_rows, estimate_rows, label):
    cpu, est = cpu_rows[label], estimate_rows[label]
    assert est["status"] == "ok", est.get("error")
    # the same saved bytes, but for the GPU flash kernel's two rng tensors per layer
    assert 0 <= est["activation_bytes"] - cpu["activation_bytes"] <= LAYERS * 24, label
    assert abs(est["peak_bytes"] - cpu["peak_bytes"]) <= 0.01 * cpu["peak_bytes"], label
    assert est.get("host_bytes") == cpu.get("host_bytes"), label


def _gemm_flops(strategy: Strategy) -> int:
    from velora_cli.emulation.attention import register_estimate_attention
    from velora_cli.emulation.step import cuda_emulation
    from velora_cli.measure.train_step import prepare, train_step
    from velora_cli.timing.step_time import count_step

    spec = SPEC.with_strategy(strategy)
    prepared = prepare(spec, "meta", attn_implementation=register_estimate_attention())
    with cuda_emulation(None):
        train_step(prepared)
        counts = count_step(prepared)
    return sum(op.flops * n for op, n in counts.ops().items() if op.kind == "gemm")


def test_recomputed_matmuls_are_counted_in_the_roofline():
    base = _gemm_flops(Strategy())
    # per layer (2·T·in·out each): gc recomputes six projections (not down: non-reentrant
    # checkpoint stops recomputing once every saved tensor exists, and no backward needs down's
    # output; torch/utils/checkpoint.py "early stop"); sac op only k, o and up
    all_mms = 2 * T * (H * HEADS * D + 2 * H * KV * D + HEADS * D * H + 2 * H * MLP)
    op_mms = 2 * T * (H * KV * D + HEADS * D * H + H * MLP)
    assert _gemm_flops(Strategy(gc=True)) - base == LAYERS * all_mms
    assert _gemm_flops(Strategy(gc=True, sac="op")) - base == LAYERS * op_mms


def test_offload_inputs_splits_device_and_host_by_hand(cpu_rows, estimate_rows):
    # transformers' offload=True: each checkpointed layer's input [B, L, H] goes to pinned host
    # memory (a power-of-two block each: CachingHostAllocator's PowerOf2Ceil)
    per_layer = T * H * S
    for rows in (cpu_rows, estimate_rows):
        row, gc = rows["gc + offload inputs"], rows["gc"]
        assert row["host_tensor_bytes"] == LAYERS * per_layer
        assert row["host_bytes"] == LAYERS * (1 << (per_layer - 1).bit_length())
        assert row["offloaded_bytes"] == row["restored_bytes"] == LAYERS * per_layer
        # the device no longer holds the inputs: saved bytes and the peak drop by exactly them
        assert gc["activation_bytes"] - row["activation_bytes"] == LAYERS * per_layer
        assert gc["fwd_bwd_peak_bytes"] - row["fwd_bwd_peak_bytes"] == LAYERS * per_layer


def test_offload_all_moves_every_saved_activation(cpu_rows):
    # an independent count from save_on_cpu's pack (a full copy of each saved tensor's size, no
    # sharing) with TRL's filter: not a parameter, at least 1024 bytes
    from velora_cli.emulation.attention import register_estimate_attention
    from velora_cli.measure.train_step import prepare

    prepared = prepare(SPEC, "cpu", attn_implementation=register_estimate_attention())
    params = {p.untyped_storage()._cdata for p in prepared.model.parameters()}
    moved = []

    def pack(t):
        nbytes = t.numel() * t.element_size()
        if t.untyped_storage()._cdata not in params and nbytes >= 1024:
            moved.append(nbytes)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        prepared.model(**prepared.micro_batches[0]).loss.backward()
    row = cpu_rows["offload all"]
    assert row["host_tensor_bytes"] == sum(moved)
    assert row["activation_bytes"] < 1024 * 16  # only tensors under 1024 bytes stay
    assert row["fwd_bwd_peak_bytes"] < cpu_rows["baseline"]["fwd_bwd_peak_bytes"]


def test_offload_copies_are_charged_at_the_host_link():
    from velora_cli.gpus import get_gpu
    from velora_cli.timing.offload import offload_fields

    link = get_gpu("h100").host_link_bandwidth
    row = {
        "offloaded_bytes": int(link),  # one second each way per micro-batch
        "restored_bytes": int(link),
        "predicted_step_seconds": 3.0,
        "predicted_seconds_by_phase": {"forward": 1.0, "backward": 2.0},
    }
    fields = offload_fields(row, "h100", micro_batches=2)
    assert fields["predicted_offload_seconds"] == pytest.approx(4.0)
    assert fields["predicted_step_seconds"] == pytest.approx(7.0)  # on the compute stream
    assert fields["offload_hidden_with_streams"] is False  # 2 s of copies vs a 1 s forward
    small = {**row, "offloaded_bytes": int(link) // 4, "restored_bytes": int(link) // 4}
    assert offload_fields(small, "h100", micro_batches=2)["offload_hidden_with_streams"] is True
    assert offload_fields({"predicted_step_seconds": 1.0}, "h100", 1) == {}


def test_strategy_settings_are_checked():
    with pytest.raises(SpecError, match="needs checkpointing"):
        Strategy(sac="op")
    with pytest.raises(SpecError, match="needs checkpointing"):
        Strategy(offload="inputs")
    with pytest.raises(SpecError, match="choose op, attn, mlp"):
        Strategy(gc=True, sac="everything")
    assert Strategy(gc=2, sac="mlp", offload="inputs").label == "sac mlp every 2 + offload inputs"
    assert Strategy(offload="all").kind == "offload"


def test_velora_and_lora_combine_with_sac_and_offload():
    backend = EstimateBackend()
    for spec in (
        SPEC.with_strategy(Strategy(placement="all-linear", num_groups=4, gc=True, sac="op")),
        StepSpec(model="llama-tiny", batch_size=2, seq_len=64, dtype="bf16", mode="lora")
        .with_strategy(Strategy(gc=True, sac="attn", offload="inputs")),
        StepSpec(model="llama-tiny", batch_size=2, seq_len=64, amp="bf16", mode="qlora")
        .with_strategy(Strategy(gc=True, sac="op", offload="inputs")),
        StepSpec(model="llama-tiny", batch_size=2, seq_len=64, dtype="bf16", optimizer="galore")
        .with_strategy(Strategy(placement="all-linear", num_groups=4, gc=True, sac="mlp")),
    ):  # fmt: skip
        row = backend.measure(spec)
        assert row["status"] == "ok", row.get("error")


def test_tune_candidates_with_sac_and_offload():
    from velora_cli.search.candidates import Candidate, cost_rank, search_space

    space = search_space(batch_size=2, modes=["full"], placements=[None], num_groups=[],
                         gc_options=[False, True, 2], micro_batches=[2], sac_options=["op"],
                         offload_options=["inputs", "all"])  # fmt: skip
    keys = [c.key for c in space]
    assert keys == [
        "full|none|g-|gc=off|mb2x1|adamw",
        "full|none|g-|gc=off|mb2x1|adamw|offload=all",  # all: without checkpointing
        "full|none|g-|gc=all|mb2x1|adamw",
        "full|none|g-|gc=all|mb2x1|adamw|offload=inputs",  # inputs: with every layer's
        "full|none|g-|gc=all|mb2x1|adamw|sac=op",
        "full|none|g-|gc=all|mb2x1|adamw|sac=op|offload=inputs",
        "full|none|g-|gc=2|mb2x1|adamw",
    ]
    plain, sac, offloaded = (Candidate(gc=True), Candidate(gc=True, sac="op"),
                             Candidate(gc=True, offload="inputs"))  # fmt: skip
    assert cost_rank(sac) < cost_rank(plain) < cost_rank(offloaded)
    with pytest.raises(ValueError, match="needs checkpointing"):
        Candidate(sac="op")


def test_tune_runs_sac_and_offload_candidates(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from velora_cli.cli import app

    monkeypatch.setenv("VELORA_PROFILES_DIR", str(tmp_path))
    args = ["tune", "llama-tiny", "--batch-size", "4", "--seq-len", "128", "--backend",
            "estimate", "--micro-batches", "4", "--placements", "none", "--gc-every", "1",
            "--mode", "full", "--optimizer", "adamw", "--sac", "op", "--offload", "inputs",
            "--budget", "2GB", "--objective", "memory", "--probe-steps", "0", "--format",
            "json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = {r["key"]: r for r in json.loads(result.stdout)["candidates"]}
    sac = rows["full|none|g-|gc=all|mb4x1|adamw|sac=op"]
    both = rows["full|none|g-|gc=all|mb4x1|adamw|sac=op|offload=inputs"]
    assert {sac["status"], both["status"]} <= {"feasible", "chosen"}, (sac, both)


def _tiny_model():
    from velora_cli.models import build_model, resolve_model

    model = build_model(resolve_model("llama-tiny"), device="cpu", dtype=torch.float32)
    model.train()
    return model


def test_plan_check_sees_the_checkpointing_kind_and_offload():
    from velora_cli.configs import VeloraConfig, apply_config
    from velora_cli.runs.plan_check import memory_setup, mismatches, observe

    planned = VeloraConfig(model="llama-tiny", gc=True, sac="op", offload="inputs")
    model = _tiny_model()
    apply_config(model, planned)
    seen = observe(model)
    assert (seen["sac"], seen["offload"]) == ("op", "inputs")
    assert not [m for m in mismatches(planned, seen) if "offload" in m or "kind" in m]
    plain = _tiny_model()  # transformers' own offload=True and plain checkpointing
    plain.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}, offload=True
    )
    assert memory_setup(plain) == {"sac": None, "offload": "inputs"}
    lines = mismatches(planned, observe(plain))
    assert any("the plan has selective checkpointing (op), the run has plain" in m for m in lines)
    lines = mismatches(VeloraConfig(model="llama-tiny", gc=True), observe(plain))
    assert any("the plan has no activation offload, the run has offload inputs" in m
               for m in lines)  # fmt: skip


def test_exports_state_sac_and_offload():
    from velora_cli.configs import VeloraConfig
    from velora_cli.exports import trainer

    offload = trainer.to_trainer(VeloraConfig(model="m", gc=True, offload="inputs"))
    assert offload["activation_checkpointing_kwargs"] == {"use_reentrant": False, "offload": True}
    sac = VeloraConfig(model="m", gc=True, sac="op")
    assert "activation_checkpointing" not in trainer.to_trainer(sac)  # it would replace the policy
    document = trainer.export(sac).data
    assert "apply_config(model" in document["snippet"]
    # the PyTorch snippet runs and recomputes what velora's op policy recomputes: the matmuls
    # the backward runs (its own and the recomputed ones), counted by a dispatch mode
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulCount(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.mms = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.mms += func == torch.ops.aten.mm.default
            return func(*args, **(kwargs or {}))

    def backward_mms(setup) -> int:
        model = _tiny_model()
        setup(model)
        ids = torch.randint(0, 1024, (2, 64))
        loss = model(input_ids=ids, labels=ids).loss
        with MatmulCount() as count:
            loss.backward()
        return count.mms

    def from_snippet(model):
        exec(document["sac_snippet"], {"model": model})

    def from_velora(model):
        from velora_cli.configs import apply_config

        apply_config(model, sac)

    def plain(model):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )

    # op recomputes k, o, up per layer; plain checkpointing all but down (early stop)
    snippet, velora, full = (
        backward_mms(from_snippet),
        backward_mms(from_velora),
        backward_mms(plain),
    )
    assert snippet == velora == full - 3 * 2, (snippet, velora, full)


def test_docs_commands_parse():
    """docs/activation-memory.md's velora commands, parsed by the real commands."""
    import re
    import shlex
    from pathlib import Path

    import typer

    from velora_cli.cli import app

    text = (Path(__file__).resolve().parents[1] / "docs" / "activation-memory.md").read_text()
    lines = [
        line.strip()
        for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
        for line in block.splitlines()
        if line.strip().startswith("velora")
    ]
    assert len(lines) == 2
    group = typer.main.get_command(app)
    for line in lines:
        name, *args = shlex.split(line)[1:]
        with group.make_context("velora", [], resilient_parsing=False) as ctx:
            group.get_command(ctx, name).make_context(name, args, parent=ctx)


def test_a_tune_recommendation_carries_sac_and_offload():
    from velora_cli.configs import ConfigError, VeloraConfig, from_tune_document

    document = {"model": "m", "recommendation": {"mode": "full", "gc": True, "sac": "op",
                                                 "offload": "inputs"}}  # fmt: skip
    config = from_tune_document(document)
    assert (config.sac, config.offload) == ("op", "inputs")
    with pytest.raises(ConfigError, match="sac .* needs gc"):
        VeloraConfig(model="m", sac="op")
