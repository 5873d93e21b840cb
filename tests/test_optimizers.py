"""Optimizers as the HF Trainer names them: the estimate's state and step temporaries against a real
CPU step (the cpu backend's tracker) where the CPU runs the optimizer, and against counts written
from the kernels' source where only a GPU decides (fused AdamW's kernel, paged state)."""

import math
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from velora_cli.cli import app
from velora_cli.estimate.backend import EstimateBackend
from velora_cli.measure.cpu import CpuBackend
from velora_cli.measure.tracker import MemoryTracker
from velora_cli.measure.train_step import SpecError, StepSpec, check_device
from velora_cli.methods import optimizers
from velora_cli.methods.optimizer_names import TRAINER_DEFAULT, optimizer_info

runner = CliRunner()
ROUND = 512  # the CUDA caching allocator's block (both backends' trackers round to it)


def _blocks(nbytes: int) -> int:
    return -(-nbytes // ROUND) * ROUND


@pytest.fixture
def wide_vocab_dir(tmp_path):
    """A tiny Llama whose embedding and lm_head have >= 1e5 values (bitsandbytes pages those)."""
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=2048,
        max_position_embeddings=256,
    ).save_pretrained(tmp_path / "wide")
    return str(tmp_path / "wide")


@pytest.mark.parametrize(
    "name", ["adamw_torch_fused", "adamw_torch_forloop", "adamw", "adafactor", "adamw_bnb_8bit"]
)
def test_estimate_matches_the_cpu_step_of_each_optimizer(mha_dir, name):
    if optimizer_info(name).family == "bnb":
        pytest.importorskip("bitsandbytes")
    spec = StepSpec(model=mha_dir, batch_size=2, seq_len=32, optimizer=name)
    est = EstimateBackend(trace_fields=False, step_time=False).measure(spec)
    cpu = CpuBackend(warmup=1, steps=1).measure(spec)
    assert est["status"] == cpu["status"] == "ok", (est.get("error"), cpu.get("error"))
    assert est["optimizer_bytes"] == cpu["optimizer_bytes"], name
    # (the CPU's SDPA saves a few bytes more or less than the GPU kernel the estimate models)
    assert est["activation_bytes"] == pytest.approx(cpu["activation_bytes"], rel=1e-3)
    # foreach and for-loop AdamW keep `step` as a host scalar: on the CPU it is a tracked
    # tensor (one 512 B block per parameter), on a GPU host memory, which the estimate leaves
    # out. Fused AdamW keeps it on the device on both; bitsandbytes and Adafactor in a Python int.
    host_steps = optimizer_info(name).impl in ("foreach", "forloop")
    extra = cpu["optimizer_peak_bytes"] - est["optimizer_peak_bytes"]
    if host_steps:
        n_params = 2 * 9 + 3  # per layer q, k, v, o, gate, up, down, 2 norms; embed, norm, head
        assert extra == n_params * ROUND, name
    else:
        assert extra == 0, name
    assert est["peak_breakdown"]["temporaries"] == cpu["peak_breakdown"]["temporaries"]


def _params(shapes, dtype=torch.float32, device="meta"):
    params = [nn.Parameter(torch.empty(s, dtype=dtype, device=device)) for s in shapes]
    for p in params:
        p.grad = torch.empty_like(p)
    return params


def _step_extra(optimizer, params) -> tuple[int, int]:
    """(optimizer state bytes after the first step, bytes the step allocates beyond its state)."""
    model = nn.Module()
    model.params = nn.ParameterList(params)
    tracker = MemoryTracker(model, optimizer, round_to=ROUND)
    with tracker, tracker.phase("optimizer"):
        optimizer.step()
    peak = tracker.phase_peaks["optimizer"]
    breakdown = tracker.peak_breakdown
    resident = breakdown["params"] + breakdown["grads"] + breakdown["buffers"]
    return breakdown["optimizer"], peak - resident - breakdown["optimizer"]


SHAPES = [(256, 64), (64,), (300, 77)]


def test_adamw_implementations_allocate_what_their_kernels_allocate():
    numels = [math.prod(s) for s in SHAPES]
    # foreach: torch/optim/adam.py _multi_tensor_adam: `exp_avg_sq_sqrt =
    # torch._foreach_sqrt(device_exp_avg_sqs)`, one state-sized tensor per param, all alive
    state, extra = _step_extra(optimizers.make("adamw", params := _params(SHAPES), lr=1e-3), params)
    assert state == sum(2 * _blocks(4 * n) for n in numels)
    assert extra == sum(_blocks(4 * n) for n in numels)
    # fused: _fused_adam calls torch._fused_adamw_ (in place); its only other op is
    # _foreach_add_(state_steps, 1) on the device steps: no temporaries; `step` is an fp32 0-d
    # device tensor per param (Adam._init_group: `torch.zeros((), ..., device=p.device)`)
    state, extra = _step_extra(
        optimizers.make("adamw_torch_fused", params := _params(SHAPES), lr=1e-3), params
    )
    assert state == sum(2 * _blocks(4 * n) + ROUND for n in numels)
    assert extra == 0
    # for-loop: _single_tensor_adam, per param `denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt)
    # .add_(eps)`: the sqrt and the quotient of one param at a time, while the previous param's
    # `denom` is still held by the variable until the assignment completes
    state, extra = _step_extra(
        optimizers.make("adamw_torch_forloop", params := _params(SHAPES), lr=1e-3), params
    )
    sizes = [_blocks(4 * n) for n in numels]
    assert extra == max(2 * b + (sizes[i - 1] if i else 0) for i, b in enumerate(sizes))


def test_bitsandbytes_state_from_init_state_and_paged_state_outside_the_allocator():
    shapes = [(512, 256), (1000, 100), (64,), (16, 16)]  # 131072 and 100000 values: paged
    # bitsandbytes 0.50.2 Optimizer2State.init_state: uint8 state1/state2 and fp32 absmax per
    # 256 values when numel >= min_8bit_size (4096), else fp32 state1/state2; the qmaps are two
    # fp32 (256,) tensors shared by the optimizer; update_step is one in-place kernel per param.
    big = [math.prod(s) for s in shapes if math.prod(s) >= 4096]
    small = [math.prod(s) for s in shapes if math.prod(s) < 4096]
    absmax = sum(2 * _blocks(4 * math.ceil(n / 256)) for n in big)
    state, extra = _step_extra(
        optimizers.make("adamw_bnb_8bit", params := _params(shapes), lr=1e-3), params
    )
    assert state == sum(2 * _blocks(n) for n in big) + absmax + 2 * _blocks(4 * 256) + sum(
        2 * _blocks(4 * n) for n in small
    )
    assert extra == 0
    # get_state_buffer: paged (cudaMallocManaged) when numel >= 1e5: not in the allocator
    opt = optimizers.make("paged_adamw_8bit", params := _params(shapes), lr=1e-3)
    state, extra = _step_extra(opt, params)
    assert optimizers.paged_bytes(opt) == 2 * (131072 + 100000)
    assert state == absmax + 2 * _blocks(4 * 256) + sum(2 * _blocks(4 * n) for n in small)
    opt = optimizers.make("paged_adamw_32bit", params := _params(shapes), lr=1e-3)
    state, extra = _step_extra(opt, params)
    assert optimizers.paged_bytes(opt) == 8 * (131072 + 100000)
    assert state == sum(2 * _blocks(4 * n) for n in small) and extra == 0


def test_adafactor_keeps_factored_second_moments():
    # transformers optimization.py Adafactor: exp_avg_sq_row shape[:-1] and exp_avg_sq_col
    # shape[:-2] + shape[-1:] for ndim >= 2, full fp32 exp_avg_sq for 1-D, RMS a 0-d tensor;
    # no first moment (beta1=None, as the Trainer builds it)
    state, _ = _step_extra(
        optimizers.make("adafactor", params := _params(SHAPES, torch.bfloat16), lr=1e-3), params
    )
    expected = sum(_blocks(4 * s[0]) + _blocks(4 * s[1]) + ROUND for s in SHAPES if len(s) == 2)
    expected += sum(_blocks(4 * s[0]) + ROUND for s in SHAPES if len(s) == 1)
    assert state == expected


def test_paged_state_is_in_the_device_figure_not_the_allocators(wide_vocab_dir):
    base = StepSpec(model=wide_vocab_dir, batch_size=1, seq_len=16, optimizer="adamw_bnb_8bit")
    paged = StepSpec(model=wide_vocab_dir, batch_size=1, seq_len=16, optimizer="paged_adamw_8bit")
    est = EstimateBackend(step_time=False)
    a, b = est.measure(base), est.measure(paged)
    managed = 2 * 2 * 2048 * 64  # embed_tokens and lm_head (131072 values), 2 uint8 states each
    assert b["paged_optimizer_bytes"] == managed and "paged_optimizer_bytes" not in a
    assert a["optimizer_bytes"] - b["optimizer_bytes"] == managed
    assert b["predicted_device_bytes"] - b["predicted_reserved_bytes"] == (
        a["predicted_device_bytes"] - a["predicted_reserved_bytes"] + managed
    )
    assert "cudaMallocManaged" in b["device_memory_notes"]


def test_names_are_the_trainers_and_unknown_ones_get_a_suggestion():
    from velora_cli.search.settings import DEFAULT_OPTIMIZERS

    assert TRAINER_DEFAULT == "adamw_torch_fused" and TRAINER_DEFAULT in DEFAULT_OPTIMIZERS
    for name in ("adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adafactor"):
        assert optimizer_info(name).trainer_optim == name
    assert optimizer_info("adamw").trainer_optim == "adamw_torch"  # velora's name, unchanged
    with pytest.raises(SpecError, match="did you mean paged_adamw_8bit"):
        StepSpec(model="llama-tiny", optimizer="paged_adamw8bit")
    result = runner.invoke(app, ["profile", "llama-tiny", "--optimizer", "adamw_torch_fuse"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "did you mean adamw_torch_fused?" in result.output


def test_tune_help_default_searches_the_trainer_default():
    import inspect

    from velora_cli.commands.tune import tune
    from velora_cli.search.settings import DEFAULT_OPTIMIZERS

    default = inspect.signature(tune).parameters["optimizer"].default
    assert tuple(default.split(",")) == DEFAULT_OPTIMIZERS


def test_paged_optimizers_are_refused_on_the_cpu_in_one_line():
    with pytest.raises(SpecError, match="cudaMallocManaged"):
        check_device(StepSpec(model="llama-tiny", optimizer="paged_adamw_32bit"), "cpu")
    check_device(StepSpec(model="llama-tiny", optimizer="paged_adamw_32bit"), "meta")
    for command in (["profile"], ["tune", "--budget", "1GB"]):
        result = runner.invoke(
            app, [*command, "llama-tiny", "--backend", "cpu", "--optimizer", "paged_adamw_8bit"]
        )
        assert result.exit_code == 1, result.output
        assert result.output.strip().splitlines() == [
            "error: --optimizer paged_adamw_8bit pages its state with cudaMallocManaged, which "
            "the cpu backend has not: use --backend estimate (or cuda), or adamw_bnb_8bit on "
            "the cpu"
        ]


def test_bitsandbytes_optimizers_without_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    result = runner.invoke(
        app, ["profile", "llama-tiny", "--backend", "cpu", "--optimizer", "adamw_8bit"]
    )
    assert result.exit_code == 1
    assert "--optimizer adamw_8bit on the cpu backend needs bitsandbytes" in result.output
    est = EstimateBackend(trace_fields=False, step_time=False)
    row = est.measure(StepSpec(model="llama-tiny", batch_size=1, seq_len=8, optimizer="adamw_8bit"))
    assert row["status"] == "ok" and row["optimizer_bytes"] > 0  # the estimate needs none


@pytest.mark.parametrize("name", ["adafactor", "adamw_torch_fused", "paged_adamw_8bit"])
def test_depth_shortcut_gives_the_reference_rows(tmp_path, monkeypatch, name):
    """The fast path synthesizes a deep step from shallow ones; Adafactor replaces state of
    parameters outside the layer stack (the final norm's RMS) inside its step, which the
    synthesis must place (it once failed on it). (8 blocks: the shortcut is forced, its cost
    rule would run them in full.)"""
    from transformers import LlamaConfig

    from velora_cli.shortcut import shortcuts

    monkeypatch.setattr(shortcuts, "shallow_runs_pay", lambda *_: True)

    LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=2048, max_position_embeddings=256,
    ).save_pretrained(tmp_path / "deep")  # fmt: skip
    spec = StepSpec(model=str(tmp_path / "deep"), batch_size=1, seq_len=16, optimizer=name)
    fast = EstimateBackend(step_time=False).measure(spec)
    reference = EstimateBackend(step_time=False, shortcuts=False).measure(spec)
    if name != "paged_adamw_8bit":  # (the paged one may fall back to the real depth)
        method = fast["estimate_method"]
        assert "extrapolated" in method or "synth" in method, method
    for key in (
        "peak_bytes",
        "optimizer_bytes",
        "predicted_reserved_bytes",
        "predicted_device_bytes",
    ):
        assert fast[key] == reference[key], key
