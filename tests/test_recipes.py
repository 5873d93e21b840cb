"""The recipes people run: reentrant checkpointing, QLoRA's BitsAndBytesConfig and peft's
prepare_model_for_kbit_training, precisions the GPU has, and the exports that carry them. The
estimate is checked against real CPU steps (real bitsandbytes 4-bit layers, peft's own
prepare_model_for_kbit_training)."""

import ast
import dataclasses
import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from velora_cli.cli import app
from velora_cli.configs import VeloraConfig, load_config
from velora_cli.estimate.backend import EstimateBackend
from velora_cli.exports import peft as peft_export
from velora_cli.exports import trainer as trainer_export
from velora_cli.exports import trl as trl_export
from velora_cli.exports.accelerate import accelerate_notes, to_accelerate
from velora_cli.exports.torchrun import to_script
from velora_cli.gpus import get_gpu
from velora_cli.measure.cpu import CpuBackend
from velora_cli.measure.recipe import check_precision, recipe_fields
from velora_cli.measure.train_step import StepSpec, Strategy, prepare, train_step
from velora_cli.methods.quant import MetaLinear4bit, QuantConfig, bnb_linear4bit

runner = CliRunner()
STEP_COUNTER = 512  # AdamW's host step scalar: a tracked block on the CPU, host memory on a GPU


def _bnb():
    return pytest.importorskip("bitsandbytes", reason="real 4-bit layers need bitsandbytes")


def _compare(spec: StepSpec):
    est = EstimateBackend(trace_fields=False, step_time=False).measure(spec)
    cpu = CpuBackend(warmup=1, steps=1).measure(spec)
    assert est["status"] == cpu["status"] == "ok", (est.get("error"), cpu.get("error"))
    return est, cpu


# -- checkpointing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, amp", [("full", None), ("lora", None), ("lora", "bf16")]
)  # lora: frozen embeddings, where reentrant checkpointing needs enable_input_require_grads
def test_reentrant_checkpointing_estimate_matches_the_cpu_step(mha_dir, mode, amp):
    spec = StepSpec(
        model=mha_dir, batch_size=2, seq_len=32, mode=mode, amp=amp,
        strategy=Strategy(gc=True), gc_reentrant=True,
    )  # fmt: skip
    est, cpu = _compare(spec)
    assert est["activation_bytes"] == cpu["activation_bytes"]
    assert est["trainable_params"] == cpu["trainable_params"]
    # the tracked peak differs by AdamW's host step counters alone (one block per trained tensor)
    extra = cpu["peak_bytes"] - est["peak_bytes"]
    assert extra % STEP_COUNTER == 0 and 0 <= extra <= STEP_COUNTER * 64, extra
    assert est["peak_breakdown"]["activations"] == pytest.approx(
        cpu["peak_breakdown"]["activations"], abs=STEP_COUNTER * 2
    )


def test_reentrant_and_non_reentrant_differ_where_torch_says(mha_dir):
    """Reentrant recomputes the whole layer under grad in backward (CheckpointFunction.backward);
    non-reentrant recomputes until the tensors needed exist and frees them as they are used:
    its backward holds less of a layer at once."""
    rows = {}
    for reentrant in (True, False):
        spec = StepSpec(
            model=mha_dir, batch_size=2, seq_len=32, mode="lora",
            strategy=Strategy(gc=True), gc_reentrant=reentrant,
        )  # fmt: skip
        rows[reentrant] = EstimateBackend(trace_fields=False, step_time=False).measure(spec)
    assert rows[True]["activation_bytes"] == rows[False]["activation_bytes"]  # one input per layer
    assert rows[True]["peak_bytes"] > rows[False]["peak_bytes"]


def test_reentrant_lora_trains_its_adapters(mha_dir):
    """Without enable_input_require_grads, reentrant checkpoints of a LoRA model with frozen
    embeddings would pass no gradient to the adapters."""
    spec = StepSpec(
        model=mha_dir, batch_size=1, seq_len=8, mode="lora",
        strategy=Strategy(gc=True), gc_reentrant=True,
    )  # fmt: skip
    prepared = prepare(spec, "cpu")
    prepared.optimizer.step = lambda *a, **k: None  # keep the gradients to look at them
    prepared.optimizer.zero_grad = lambda *a, **k: None
    train_step(prepared)
    # lora_B: lora_A's gradient is B^T-weighted and B starts at zero
    lora = [p for n, p in prepared.model.named_parameters() if "lora_B" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


# -- QLoRA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [True, False])
def test_quant_storage_bytes_match_bitsandbytes(storage, double_quant):
    _bnb()
    config = QuantConfig(double_quant=double_quant, quant_storage=storage)
    linear = nn.Linear(77, 300, bias=False).to(torch.bfloat16)
    real = bnb_linear4bit(linear, config, "cpu")
    with torch.device("meta"):
        meta = MetaLinear4bit.from_linear(nn.Linear(77, 300, bias=False), config)
    assert real.weight.dtype == meta.weight.dtype == storage
    assert real.weight.shape == meta.weight.shape
    state = real.weight.quant_state
    held = [real.weight, state.absmax, state.code]
    if double_quant:
        held += [state.state2.absmax, state.state2.code, state.offset]
    assert sum(config.storage(300 * 77).values()) == sum(t.untyped_storage().nbytes() for t in held)


def test_bytes_per_weight_with_and_without_double_quant():
    # kernels.md C.2: 0.5 + 4/64 = 0.5625 B without; 0.5 + 1/64 + 4/16384 ≈ 0.516 B with
    n = 4096 * 11008
    without = sum(QuantConfig(double_quant=False).storage(n).values()) - 64  # less the code
    assert without / n == pytest.approx(0.5625)
    with_dq = sum(QuantConfig().storage(n).values()) - 64 - 1024 - 4
    assert with_dq / n == pytest.approx(0.5 + 1 / 64 + 4 / 16384)


@pytest.mark.parametrize(
    "settings",
    [
        dict(dtype="bf16", kbit_prepare=True),
        dict(dtype="bf16", kbit_prepare=True, double_quant=False, quant_storage="bf16"),
        dict(dtype="fp16", compute_dtype="fp16", kbit_prepare=True, strategy=Strategy(gc=True),
             gc_reentrant=True),
    ],
)  # fmt: skip
def test_qlora_recipe_estimate_matches_real_4bit_steps(mha_dir, settings):
    _bnb()
    spec = StepSpec(model=mha_dir, batch_size=2, seq_len=32, mode="qlora", **settings)
    est, cpu = _compare(spec)
    for key in ("param_bytes", "grad_bytes", "optimizer_bytes", "quantized_bytes"):
        assert est[key] == cpu[key], key
    assert est["activation_bytes"] == pytest.approx(cpu["activation_bytes"], rel=1e-3)
    assert est["peak_bytes"] == pytest.approx(cpu["peak_bytes"], rel=0.03)


def test_prepare_for_kbit_training_upcasts_what_peft_upcasts(mha_dir):
    """The meta stand-in of prepare_model_for_kbit_training against peft's own (cpu)."""
    _bnb()
    spec = StepSpec(model=mha_dir, batch_size=1, seq_len=8, dtype="bf16", mode="qlora",
                    kbit_prepare=True)  # fmt: skip
    dtypes = {}
    for device in ("meta", "cpu"):
        model = prepare(spec, device).model
        dtypes[device] = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["meta"] == dtypes["cpu"]
    base = {n: d for n, d in dtypes["cpu"].items() if "lora_" not in n}
    assert base["base_model.model.model.embed_tokens.weight"] == torch.float32
    assert base["base_model.model.lm_head.weight"] == torch.float32
    assert base["base_model.model.model.norm.weight"] == torch.float32
    # the residual stream turns fp32: more activation memory than without the upcast
    plain = EstimateBackend(trace_fields=False, step_time=False).measure(
        StepSpec(model=mha_dir, batch_size=2, seq_len=32, dtype="bf16", mode="qlora")
    )
    upcast = EstimateBackend(trace_fields=False, step_time=False).measure(
        StepSpec(
            model=mha_dir, batch_size=2, seq_len=32, dtype="bf16", mode="qlora", kbit_prepare=True
        )  # fmt: skip
    )
    assert upcast["activation_bytes"] > plain["activation_bytes"]
    assert upcast["param_bytes"] > plain["param_bytes"]


def test_cli_defaults_are_the_peft_qlora_recipe_and_the_header_says_so(tmp_path):
    out = tmp_path / "p.json"
    result = runner.invoke(
        app,
        ["profile", "llama-tiny", "--mode", "qlora", "--dtype", "bf16", "-b", "1", "-s", "8",
         "--backend", "estimate", "--placements", "paper", "--gc-every", "2", "--format",
         "json", "--output", str(out), "--no-save"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["settings"]["kbit_prepare"] is True
    assert "double_quant" not in document["settings"]  # the default: on, as QLoRA's recipe
    assert "prepare_model_for_kbit_training" in document["precision"]
    assert "double quant" in document["precision"] and "compute bf16" in document["precision"]
    full = runner.invoke(
        app,
        ["profile", "llama-tiny", "-b", "1", "-s", "8", "--backend", "estimate", "--placements",
         "paper", "--format", "json", "--output", str(out), "--no-save"],
    )  # fmt: skip
    assert full.exit_code == 0
    settings = json.loads(out.read_text())["settings"]
    assert not {"kbit_prepare", "gc_reentrant", "double_quant"} & set(settings)  # as before


# -- precisions the GPU has ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dtype", "bf16", "--gpu", "t4"], "--dtype bf16: NVIDIA T4"),
        (["--amp", "bf16", "--gpu", "v100-16gb"], "--amp bf16: NVIDIA Tesla V100"),
        (["--mode", "qlora", "--compute-dtype", "bf16", "--gpu", "t4"], "--compute-dtype bf16"),
    ],
)
@pytest.mark.parametrize("command", [["profile"], ["tune", "--budget", "1GB"]])
def test_bf16_on_a_t4_or_v100_is_one_line(command, args, message):
    result = runner.invoke(app, [*command, "llama-tiny", "--backend", "estimate", *args])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines


def test_qlora_compute_dtype_follows_the_gpu():
    assert recipe_fields(modes=["qlora"], gpu=get_gpu("t4"))["compute_dtype"] == "fp16"
    assert recipe_fields(modes=["qlora"], gpu=get_gpu("a100-80gb"))["compute_dtype"] == "bf16"
    assert recipe_fields(modes=["full"])["kbit_prepare"] is False
    spec = StepSpec(model="llama-tiny", mode="qlora", dtype="fp16", compute_dtype="fp16")
    check_precision(get_gpu("t4"), spec)  # fp16 everywhere: the T4 runs it


# -- exports -------------------------------------------------------------------------------------


def _config(**kw):
    base = dict(model="org/llama", micro_batch_size=2, grad_accum_steps=2, seq_len=64)
    return VeloraConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "optimizer, optim",
    [("adamw", "adamw_torch"), ("adamw_torch_fused", "adamw_torch_fused"),
     ("paged_adamw_8bit", "paged_adamw_8bit"), ("adamw_bnb_8bit", "adamw_bnb_8bit"),
     ("paged_adamw_32bit", "paged_adamw_32bit"), ("adafactor", "adafactor"),
     ("adamw_torch_forloop", None)],
)  # fmt: skip
def test_trainer_export_names_the_optimizer_as_the_trainer_does(optimizer, optim):
    args = trainer_export.to_trainer(_config(optimizer=optimizer))
    assert args.get("optim") == optim
    if optim is None:
        assert any("foreach=False" in n for n in trainer_export.trainer_notes(_config(
            optimizer=optimizer)))  # fmt: skip
        assert "make_optimizer" in trainer_export.trainer_snippet(_config(optimizer=optimizer))
    if optim is not None and optim.startswith("paged"):
        notes = trainer_export.trainer_notes(_config(optimizer=optimizer))
        assert any("cudaMallocManaged" in n for n in notes)


def test_exports_carry_checkpointing_kind_attention_and_the_bnb_config():
    config = _config(
        mode="qlora", lora_rank=8, lora_targets="all-linear", gc=True, gc_reentrant=True,
        double_quant=False, compute_dtype="fp16", quant_storage="bf16", kbit_prepare=True,
        attn_implementation="eager", optimizer="paged_adamw_8bit",
    )  # fmt: skip
    args = trainer_export.to_trainer(config)
    kwargs = args.get("activation_checkpointing_kwargs", args.get("gradient_checkpointing_kwargs"))
    assert kwargs == {"use_reentrant": True}
    snippet = trainer_export.trainer_snippet(config)
    ast.parse(snippet)
    assert 'attn_implementation="eager"' in snippet
    assert "bnb_4bit_use_double_quant=False" in snippet
    assert "bnb_4bit_compute_dtype=torch.float16" in snippet
    assert "bnb_4bit_quant_storage=torch.bfloat16" in snippet
    assert (
        "model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, "
        "gradient_checkpointing_kwargs={'use_reentrant': True})" in snippet
    )
    assert snippet.index("prepare_model_for_kbit_training") < snippet.index("get_peft_model")
    assert any(
        "bnb_4bit_quant_storage=torch.bfloat16" in n for n in peft_export.notes(config, "CAUSAL_LM")
    )
    if trl_export.trl_version() is not None:
        config = dataclasses.replace(config, trainer="trl")  # the TRL export takes a TRL plan
        data = trl_export.export(config).data
        ast.parse(data["snippet"])
        assert 'attn_implementation="eager"' in data["snippet"]
        assert "prepare_model_for_kbit_training" in data["snippet"]
        assert data["sft_config"]["optim"] == "paged_adamw_8bit"
        assert load_config(data["velora"]) == config  # the velora part round-trips


def test_plain_configs_load_as_before_and_default_to_sdpa():
    old = {"format": "velora-config", "version": 1, "model": "org/llama", "mode": "qlora",
           "lora_rank": 8, "gc": True}  # fmt: skip
    config = load_config(old)  # written before the recipe fields existed
    assert (config.gc_reentrant, config.double_quant, config.compute_dtype) == (False, True, "bf16")
    assert (config.quant_storage, config.kbit_prepare, config.attn_implementation) == (
        "uint8",
        False,
        None,
    )
    snippet = trainer_export.trainer_snippet(config)
    assert 'attn_implementation="sdpa"' in snippet and "prepare_model_for_kbit_training" not in (
        snippet
    )
    assert "bnb_4bit_use_double_quant=True" in snippet
    assert trainer_export.to_trainer(config)["optim"] == "adamw_torch"


def test_multi_gpu_exports_carry_attention_and_reentrant_checkpointing():
    config = _config(world_size=2, parallel="fsdp", gc=True, gc_reentrant=True,
                     attn_implementation="flash_attention_2")  # fmt: skip
    script = to_script(config)
    ast.parse(script)
    assert 'ATTN = "flash_attention_2"' in script and "attn_implementation=ATTN" in script
    assert "'gc_reentrant': True" in script  # apply_config reads it
    assert to_accelerate(config)["fsdp_config"]["fsdp_activation_checkpointing"] is False
    assert any("use_reentrant" in n for n in accelerate_notes(config))


def test_tune_document_recipe_reaches_the_config():
    from velora_cli.configs import from_tune_document

    document = {
        "model": "org/llama",
        "settings": {"lora_rank": 8, "gc_reentrant": True, "double_quant": False, "kbit_prepare": True,
                     "compute_dtype": "fp16", "quant_storage": "bf16"},
        "recommendation": {"mode": "qlora", "gc": True, "micro_batch_size": 1,
                           "optimizer": "paged_adamw_8bit"},
        "candidates": [],
    }  # fmt: skip
    config = from_tune_document(document)
    assert config.gc_reentrant and not config.double_quant and config.kbit_prepare
    assert (config.compute_dtype, config.quant_storage) == ("fp16", "bf16")
    document["recommendation"]["mode"] = "lora"
    assert from_tune_document(document).kbit_prepare is False  # a qlora-only step


def test_the_run_check_tells_the_optimizer_implementations_apart():
    from velora_cli.runs.plan_check import mismatches, observe

    params = [nn.Parameter(torch.zeros(4, 4))]
    model = nn.Linear(2, 2)
    fused = observe(model, optimizer=torch.optim.AdamW(params, fused=True))
    foreach = observe(model, optimizer=torch.optim.AdamW(params, foreach=True))

    def optimizer_lines(planned, seen):
        return [line for line in mismatches(_config(optimizer=planned), seen) if "optim" in line]

    assert optimizer_lines("adamw_torch_fused", fused) == []
    assert optimizer_lines("adamw_torch_fused", foreach)  # foreach is not what was planned
    assert optimizer_lines("adamw", foreach) == [] and optimizer_lines("adamw", fused)
    bnb = pytest.importorskip("bitsandbytes")
    paged = observe(model, optimizer=bnb.optim.AdamW(params, optim_bits=8, is_paged=True))
    assert optimizer_lines("paged_adamw_8bit", paged) == []
    assert optimizer_lines("adamw_bnb_8bit", paged) and optimizer_lines("paged_adamw_32bit", paged)


def test_a_tune_with_attn_exports_its_attn_implementation():
    """The tune records --attn as settings["attn"] (StepSpec.attn); the exported config carries it
    as HF's attn_implementation, so the run loads the attention that was planned."""
    from velora_cli.configs import _recipe

    assert _recipe({"mode": "full"}, {"attn": "eager"})["attn_implementation"] == "eager"
    assert _recipe({"mode": "full"}, {"attn": "auto"})["attn_implementation"] is None
    assert _recipe({"mode": "full"}, {})["attn_implementation"] is None
