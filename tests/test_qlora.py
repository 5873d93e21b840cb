"""QLoRA mode: the meta stand-in stores what bitsandbytes stores, the estimate matches real 4-bit
steps on the CPU, and VeLoRA on the adapters is exact where the maths says exact."""

import json
import math
import re
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from velora_cli.cli import app
from velora_cli.estimate.backend import EstimateBackend
from velora_cli.measure.cpu import CpuBackend
from velora_cli.measure.train_step import SpecError, StepSpec, Strategy, prepare
from velora_cli.methods.quant import (
    INSTALL_HINT,
    MetaLinear4bit,
    QuantConfig,
    QuantizationUnavailable,
    bnb_linear4bit,
    quantize_base,
    quantized_storage,
)

runner = CliRunner()


def _bnb():
    return pytest.importorskip("bitsandbytes", reason="real 4-bit layers need bitsandbytes")


def _storages(module: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype, int]]:
    tensors = {"weight": module.weight, **dict(module.named_buffers(recurse=False))}
    return {
        name: (tuple(t.shape), t.dtype, t.untyped_storage().nbytes()) for name, t in tensors.items()
    }


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize(
    "shape", [(64, 128), (96, 40), (300, 77)]
)  # 77·300 and 40·96: partial blocks
def test_storage_formula_and_meta_stand_in_match_a_real_quantized_weight(shape, double_quant):
    _bnb()
    config = QuantConfig(double_quant=double_quant)
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0], bias=False).to(torch.bfloat16)
    real = bnb_linear4bit(linear, config, "cpu")
    with torch.device("meta"):
        meta = MetaLinear4bit.from_linear(nn.Linear(shape[1], shape[0], bias=False), config)
    state = real.weight.quant_state
    held = [real.weight, state.absmax, state.code]
    if double_quant:
        held += [state.state2.absmax, state.state2.code, state.offset]
    real_bytes = sum(t.untyped_storage().nbytes() for t in held)

    formula = config.storage(math.prod(shape))
    assert sum(formula.values()) == real_bytes, (formula, _storages(real))
    assert _storages(meta) == _storages(real)
    assert quantized_storage(nn.Sequential(real)) == {
        "quantized_params": math.prod(shape),
        "quantized_bytes": real_bytes,
    }


def test_bits_per_value_of_qlora_defaults():
    # 4 bits + one 8-bit scale per 64 values + one fp32 scale per 64·256 values (+ 1092 B tables)
    n = 4096 * 4096
    expected = 8 * (n / 2 + n / 64 + 4 * n / 16384 + 1092) / n
    assert QuantConfig().bits_per_value(n) == pytest.approx(expected)
    assert 4.12 < expected < 4.13


def test_every_linear_but_lm_head_is_quantized_on_meta():
    spec = StepSpec(model="llama-tiny", mode="qlora", batch_size=1, seq_len=8)
    model = prepare(spec, "meta").model
    base = model.get_base_model()
    assert type(base.lm_head) is nn.Linear and base.lm_head.weight.dtype == torch.float32
    four_bit = [n for n, m in base.named_modules() if isinstance(m, MetaLinear4bit)]
    assert len(four_bit) == 2 * 7  # q, k, v, o, gate, up, down per layer
    layer = base.model.layers[0].self_attn.q_proj
    assert hasattr(layer, "lora_A") and isinstance(layer.base_layer, MetaLinear4bit)
    assert "nf4" in repr(layer.base_layer) and "double_quant=True" in repr(layer.base_layer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize(
    "dtype, strategy",
    [
        ("bf16", Strategy()),
        ("bf16", Strategy(placement="all-linear", num_groups=4)),
        ("fp32", Strategy(gc=True)),
    ],
)
def test_estimate_matches_cpu_tracked_memory_of_real_4bit_steps(mha_dir, dtype, strategy):
    _bnb()
    spec = StepSpec(
        model=mha_dir, batch_size=2, seq_len=32, dtype=dtype, mode="qlora", strategy=strategy
    )
    est = EstimateBackend().measure(spec)
    cpu = CpuBackend(warmup=1, steps=1).measure(spec)
    assert est["status"] == cpu["status"] == "ok", (est.get("error"), cpu.get("error"))
    for key in ("param_bytes", "grad_bytes", "optimizer_bytes", "quantized_bytes"):
        assert est[key] == cpu[key], key
    assert est["peak_breakdown"]["buffers"] == cpu["peak_breakdown"]["buffers"]
    assert est["activation_bytes"] == pytest.approx(cpu["activation_bytes"], rel=0.01)
    # The cpu tracker cannot see inside bitsandbytes' gemm op (its dequantized weight); the
    # estimate charges it, as CUDA's dequantize+linear path allocates it.
    assert est["peak_bytes"] == pytest.approx(cpu["peak_bytes"], rel=0.03), (
        est["peak_breakdown"],
        cpu["peak_breakdown"],
    )


def test_estimate_under_amp_follows_peft_on_a_gpu(mha_dir, monkeypatch):
    """peft's 4-bit LoRA forward skips its adapter casts when ``torch.is_autocast_enabled()``,
    which asks about CUDA: on a GPU under autocast it is True, on this CPU False. The estimate
    models the GPU; made to ask about the CPU's autocast, the cpu step agrees with it."""
    _bnb()
    spec = StepSpec(model=mha_dir, batch_size=2, seq_len=32, amp="bf16", mode="qlora")
    est = EstimateBackend().measure(spec)
    enabled = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: enabled(*(a or ("cpu",))))
    cpu = CpuBackend(warmup=1, steps=1).measure(spec)
    assert est["activation_bytes"] == pytest.approx(cpu["activation_bytes"], rel=0.001)
    assert est["peak_bytes"] == pytest.approx(cpu["peak_bytes"], rel=0.02)


class _Block(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.proj(x)


def test_velora_on_qlora_adapters_is_exact_for_inputs_on_span_of_v():
    _bnb()
    import peft

    from velora_cli.methods.placement import apply_velora

    d, m = 64, 8
    torch.manual_seed(0)
    block = _Block(d, 32).to(torch.bfloat16)
    assert quantize_base(block, "cpu") == ["proj"]
    model = peft.get_peft_model(block, peft.LoraConfig(r=4, target_modules=["proj"]))
    layer = model.base_model.model.proj
    assert type(layer).__module__.endswith("lora.bnb")  # peft's 4-bit LoRA layer
    layer.double()  # fp64 adapters (the 4-bit base keeps its packed uint8 weight)
    nn.init.normal_(layer.lora_B["default"].weight)  # B = 0 would make grad_A vanish
    v = torch.nn.functional.normalize(torch.randn(m, dtype=torch.float64), dim=0)
    x = (torch.randn(3, 5, d // m, 1, dtype=torch.float64) * v).reshape(3, 5, d)  # x = c ⊗ v
    g = torch.randn(3, 5, 32, dtype=torch.float64)

    model(x).backward(g)
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    wrapped = apply_velora(model, ["proj"], sub_token_size=m, init="random")
    assert wrapped == ["base_model.model.proj.lora_A.default"]
    velora_a = model.get_submodule(wrapped[0])
    velora_a.v.copy_(v)
    model(x).backward(g)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, plain[name], rtol=1e-12, atol=1e-12, msg=name)


def test_velora_placements_skip_4bit_layers_without_adapters():
    spec = StepSpec(
        model="llama-tiny",
        mode="qlora",
        lora_targets="q_proj,v_proj",
        batch_size=1,
        seq_len=8,
        strategy=Strategy(placement="paper", num_groups=4),
    )
    prepared = prepare(spec, "meta")
    # paper = v + down: down_proj is 4-bit without an adapter, so only v's adapters are wrapped
    assert prepared.wrapped == [
        f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_A.default" for i in range(2)
    ]


def test_without_bitsandbytes_cpu_rows_fail_in_one_line_and_the_estimate_still_works(
    monkeypatch,
):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    spec = StepSpec(model="llama-tiny", mode="qlora", batch_size=1, seq_len=8, dtype="bf16")
    with pytest.raises(SpecError, match="--mode qlora on the cpu backend needs bitsandbytes"):
        CpuBackend(warmup=0, steps=1).measure(spec)
    result = runner.invoke(
        app, ["profile", "llama-tiny", "--mode", "qlora", "--backend", "cpu", "--no-save"]
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: --mode qlora on the cpu backend needs bitsandbytes: pip install "
        "'velora-cli[qlora]', or use --backend estimate"
    ]
    with pytest.raises(QuantizationUnavailable, match=re.escape(INSTALL_HINT)):  # the swap alone
        quantize_base(nn.Sequential(nn.Linear(4, 4)), "cpu")
    est = EstimateBackend().measure(spec)
    # per layer: q 64×64, k and v 64×32 (2 kv heads), o 64×64, gate/up/down 64×192
    assert est["status"] == "ok"
    assert est["quantized_params"] == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 192)


def test_profile_cli_qlora_estimate_reports_quantized_bytes(tmp_path):
    out = tmp_path / "p.json"
    result = runner.invoke(
        app,
        [
            "profile",
            "llama-tiny",
            "--mode",
            "qlora",
            "--backend",
            "estimate",
            "--placements",
            "all-linear",
            "--num-groups",
            "4",
            "--batch-size",
            "1",
            "--seq-len",
            "16",
            "--format",
            "json",
            "--output",
            str(out),
            "--no-save",
        ],
    )
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["mode"] == "qlora"
    assert any("4-bit NF4" in n for n in document["notices"])
    assert {r["status"] for r in document["rows"]} == {"ok"}
    assert len({r["quantized_bytes"] for r in document["rows"]}) == 1


def test_unknown_mode_lists_qlora():
    result = runner.invoke(
        app, ["profile", "llama-tiny", "--mode", "int8", "--backend", "estimate"]
    )
    assert result.exit_code == 1
    assert "full|lora|qlora" in result.output


# -- tune and export ----------------------------------------------------------------------------


def _tune_settings(**overrides):
    from velora_cli.search import autotune

    fields = dict(
        model="llama-tiny", batch_size=4, seq_len=64, budget_bytes=10**9, backend="estimate",
        probe_steps=0, placements=("all-linear",), num_groups=(4,), gc_every=(),
        micro_batches=(4,), modes=("full", "lora", "qlora"),
    )  # fmt: skip
    fields.update(overrides)
    return autotune.TuneSettings(**fields)


def test_estimator_floors_the_candidates_of_a_mode_that_cannot_fit():
    from velora_cli.search import autotune
    from velora_cli.search.tuner import Candidate

    estimator = autotune.Estimator(_tune_settings(budget_bytes=10**6))
    first = estimator(Candidate("full", micro_batch_size=4))
    assert first.peak_bytes > 10**6 and not first.detail.get("lower_bound")
    floor = estimator(Candidate("full", "all-linear", 4, micro_batch_size=4))
    assert estimator.calls == 1 and floor.detail["lower_bound"]
    d = first.detail
    assert floor.peak_bytes == d["param_bytes"] + d["grad_bytes"] + d["optimizer_bytes"]
    assert floor.peak_bytes <= first.peak_bytes
    # the leanest candidates (gc, smallest micro-batch) get the floor too while another planned
    # mode may fit (qlora: no floor yet), and are stepped only when the tuner asks (nothing
    # fits: the answer names the smallest configuration)
    lean = Candidate("full", "all-linear", 4, gc=True, micro_batch_size=4)
    estimator.plan(
        [Candidate("full", micro_batch_size=4), lean, Candidate("qlora", micro_batch_size=4)]
    )
    assert estimator(lean).detail["lower_bound"] and estimator.calls == 1
    assert estimator.refinable(lean) and not estimator.refinable(Candidate("full", gc=False))
    leanest = estimator.refine(lean)
    assert estimator.calls == 2 and not leanest.detail.get("lower_bound")
    assert floor.peak_bytes <= leanest.peak_bytes < first.peak_bytes
    assert estimator(lean) is leanest  # kept
    estimator(Candidate("qlora", micro_batch_size=4))  # another mode: stepped
    assert estimator.calls == 3
    estimator.finish()
    # no other mode planned: nothing can fit, so the leanest is estimated in its turn
    alone = autotune.Estimator(_tune_settings(budget_bytes=10**6))
    alone.plan([Candidate("full", micro_batch_size=4), lean])
    alone(Candidate("full", micro_batch_size=4))
    assert not alone(lean).detail.get("lower_bound") and alone.calls == 2
    alone.finish()


def test_tune_steps_the_floored_leanest_candidates_only_when_nothing_fits():
    from velora_cli.search import autotune

    def run(budget):
        settings = _tune_settings(modes=("full", "qlora"), micro_batches=(2, 4),
                                  budget_bytes=budget)  # fmt: skip
        doc = autotune.run(settings, save_path=None, journal=None,
                           progress=lambda message, done, total: said.append(message))  # fmt: skip
        return doc, {r["key"]: r for r in doc["candidates"]}

    # a budget under every candidate (the CUDA context alone is over it) and under full
    # training's floor, not under QLoRA's: full's leanest ones (gc, micro-batch 2) wait with
    # their floor while QLoRA may fit, and get their real estimates once nothing does; the others
    # keep the floor, and the answer names the smallest configuration
    said: list[str] = []
    doc, rows = run(10**6)
    assert doc["recommendation"] is None
    full = [r for r in rows.values() if r["mode"] == "full"]
    lean = [r for r in full if r["gc"] is True and r["micro_batch_size"] == 2]
    assert lean and not any(r["estimate_lower_bound"] for r in lean)
    others = [r for r in full if r not in lean]
    assert sum(not r["estimate_lower_bound"] for r in others) == 1  # the first: the floor's
    done = said.index("estimate done")
    assert {f"estimate {r['key']}" for r in lean} <= set(said[done + 1 :])  # after the search
    real = [r for r in rows.values() if not r["estimate_lower_bound"]]
    smallest = min(real, key=lambda r: (r["estimate_peak_bytes"], r["key"]))
    assert doc["smallest"]["key"] == smallest["key"]
    assert doc["smallest"]["smallest_peak_bytes"] == smallest["estimate_peak_bytes"]
    assert "the smallest estimate is" in doc["reason"] and smallest["key"] in doc["reason"]
    floor = min(r["estimate_peak_bytes"] for r in others if r["estimate_lower_bound"])
    assert all(floor <= r["estimate_peak_bytes"] for r in lean)


def test_tune_space_leaves_out_qlora_where_bitsandbytes_is_needed_and_missing(monkeypatch):
    from velora_cli.measure.train_step import SpecError
    from velora_cli.search import autotune

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    space, notices = autotune.build_space(_tune_settings(backend="cpu"))
    assert {c.mode for c in space} == {"full", "lora"}
    assert notices == [f"qlora: not tried, {INSTALL_HINT} (or --backend estimate)"]
    space, notices = autotune.build_space(_tune_settings())  # the estimate needs none
    assert {c.mode for c in space} == {"full", "lora", "qlora"} and not notices
    with pytest.raises(SpecError, match="needs bitsandbytes"):
        autotune.build_space(_tune_settings(backend="cpu", modes=("qlora",)))


def test_tune_picks_qlora_when_only_qlora_fits_and_shows_why_the_others_do_not(tmp_path):
    from transformers import LlamaConfig

    from velora_cli import report
    from velora_cli.measure.train_step import Strategy
    from velora_cli.search import autotune

    # The tune compares the budget with the predicted device memory, whose allocator segments
    # (2 and 20 MiB) hide llama-tiny's sub-MiB base weights: a 512-wide model's 25 MB of fp32
    # base weights (about 3 MB in 4-bit) separate qlora from lora.
    model = str(tmp_path / "llama-512")
    LlamaConfig(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=1024, max_position_embeddings=256,
    ).save_pretrained(model)  # fmt: skip

    def peak(mode, **strategy):
        spec = StepSpec(model, batch_size=4, seq_len=64, mode=mode, **strategy)
        return EstimateBackend().measure(spec)["predicted_device_bytes"]

    smallest_lora = peak("lora", strategy=Strategy(placement="all-linear", num_groups=4, gc=True))
    qlora = peak("qlora", strategy=Strategy(placement="all-linear", num_groups=4, gc=True))
    assert qlora < smallest_lora
    settings = _tune_settings(model=model, budget_bytes=(qlora + smallest_lora) // 2, margin=0.0)
    doc = autotune.run(settings, save_path=None, journal=None)
    assert doc["recommendation"]["mode"] == "qlora"
    assert doc["recommendation"]["peak_bytes"] <= settings.budget_bytes
    unfit = {r["mode"]: r for r in report.unfit_modes(doc["candidates"])}
    assert set(unfit) == {"full", "lora"}
    assert not unfit["lora"]["estimate_lower_bound"]  # a real estimate, not the floor
    assert unfit["lora"]["gc"] is True  # the leanest lora candidate
    assert "all 4 full candidates over budget" in unfit["full"]["note"]
    table = report.tune_table(doc)
    assert table.row_count == sum(bool(r.get("measure_status")) for r in doc["candidates"]) + 2


def test_qlora_exports_with_its_quantization_and_without_peft_velora():
    from velora_cli import configs
    from velora_cli.exports import peft as peft_export
    from velora_cli.exports import trainer as trainer_export

    cfg = configs.VeloraConfig(
        model="meta-llama/Llama-2-7b", mode="qlora", lora_rank=8, lora_targets="all-linear",
        placement="all-linear", num_groups=32, gc=True, dtype="bf16",
    )  # fmt: skip
    assert any("refuses VeLoRA on bitsandbytes 4-bit" in why for why in peft_export.check(cfg)[0])
    snippet = trainer_export.trainer_snippet(cfg)
    assert (
        "BitsAndBytesConfig(load_in_4bit=True" in snippet and "quantization_config=bnb" in snippet
    )
    assert "peft.get_peft_model" in snippet
    assert any("QLoRA" in note for note in trainer_export.trainer_notes(cfg))
    plain = configs.VeloraConfig(model="m", mode="qlora", lora_rank=8)
    assert peft_export.to_peft(plain)["r"] == 8
    with pytest.raises(configs.ConfigError, match="mode qlora needs lora_rank"):
        configs.VeloraConfig(model="m", mode="qlora")


def test_profile_footer_shows_the_4bit_base():
    from velora_cli import report

    document = {
        "rows": [{"status": "ok", "quantized_params": 4 * 10**6, "quantized_bytes": 2_063_476}],
        "backend": "estimate",
        "environment": {},
    }
    line = next(x for x in report.profile_footer(document) if x.startswith("4-bit base"))
    assert "4,000,000 weights" in line and "4.127 bits each" in line


def test_tune_leaves_the_floored_leanest_candidates_unstepped_when_something_fits(tmp_path):
    from transformers import LlamaConfig

    from velora_cli import report
    from velora_cli.search import autotune

    # 2 blocks of 2048 wide: ~100M parameters, so full training's params + grads + AdamW state
    # (16 B each, ~1.6 GB) is over a 1 GB budget that QLoRA fits on a T4 (141 MiB context)
    model = str(tmp_path / "llama-2048")
    LlamaConfig(
        hidden_size=2048, intermediate_size=5504, num_hidden_layers=2, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=1024, max_position_embeddings=256,
    ).save_pretrained(model)  # fmt: skip
    settings = _tune_settings(model=model, modes=("full", "qlora"), micro_batches=(2, 4),
                              budget_bytes=10**9, gpu="t4")  # fmt: skip
    doc = autotune.run(settings, save_path=None, journal=None)
    assert doc["recommendation"]["mode"] == "qlora"
    full = [r for r in doc["candidates"] if r["mode"] == "full"]
    assert all(r["status"] == "infeasible-estimate" for r in full)
    stepped = [r for r in full if not r["estimate_lower_bound"]]
    assert len(stepped) == 1 and stepped[0]["micro_batch_size"] == 4  # the floor's, no other
    floor = min(r["estimate_peak_bytes"] for r in full if r["estimate_lower_bound"])
    assert floor > settings.budget_bytes
    # the table's row for full training is its floor, shown as a lower bound
    (unfit,) = report.unfit_modes(doc["candidates"])
    assert unfit["mode"] == "full" and unfit["estimate_lower_bound"]
    assert unfit["estimate_peak_bytes"] == floor
    table = report.tune_table(doc)
    assert any(cell.startswith("≥ ") for cell in table.columns[3]._cells)
