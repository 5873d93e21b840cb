"""Exports state exactly what was measured, or refuse with the nearest that they can state.

Round trips: the layers velora's tune path measures (built on meta, as `velora tune` records
them) -> the export -> ``peft.LoraConfig(**d)`` -> ``get_peft_model`` on a tiny model (a real
bitsandbytes 4-bit one for QLoRA) -> the VeLoRA layers PEFT built and their sub-token sizes,
read here from PEFT's own attributes (``lora_velora_num_groups``, ``ceil(D / G)``).
"""

import dataclasses
import importlib.util
import json

import pytest
import torch

from velora_cli.configs import VeloraConfig, load_config
from velora_cli.exports import NotExpressible, export
from velora_cli.exports.peft import lora_kwargs, to_peft
from velora_cli.methods.placement import PRESETS, FrozenPlacementError
from velora_cli.search import autotune

GROUPS = 4  # divides every llama-tiny width (64, 128) and every LoRA A input
TARGETS = ("all-linear", "q_proj,v_proj")


def measured(mode: str, placement: str | None, targets: str) -> dict | None:
    """What `velora tune` records for a recommendation (None: the placement compresses no
    layer that trains, so the tune never measures it)."""
    settings = autotune.TuneSettings("llama-tiny", budget_bytes=10**9, backend="estimate",
                                     lora_targets=targets)  # fmt: skip
    rec = dict(mode=mode, placement=placement, num_groups=GROUPS if placement else None,
               gc=False, micro_batch_size=2, grad_accum_steps=2, optimizer="adamw")  # fmt: skip
    try:
        return autotune._layers_of(settings, rec)
    except FrozenPlacementError:
        return None


def plan(mode: str, placement: str | None, targets: str, found: dict) -> VeloraConfig:
    return VeloraConfig(
        model="llama-tiny", mode=mode, placement=placement,
        num_groups=GROUPS if placement else None, layers=found["velora_layers"] or None,
        lora_layers=found["lora_layers"], lora_rank=8, lora_targets=targets, task="causal-lm",
        micro_batch_size=2, grad_accum_steps=2, seq_len=32, budget_bytes=10**9,
        backend="estimate",
    )  # fmt: skip


def tiny(mode: str):
    from velora_cli.models import build_model, resolve_model

    model = build_model(resolve_model("llama-tiny"), device="cpu", dtype=torch.float32)
    if mode == "qlora":
        from velora_cli.methods.quant import quantize_base

        quantize_base(model, "cpu")  # real bitsandbytes Linear4bit layers
    return model


def peft_built(d: dict, mode: str):
    """The model ``get_peft_model`` builds from the export, and its VeLoRA layers."""
    import peft

    model = peft.get_peft_model(tiny(mode), peft.LoraConfig(**json.loads(json.dumps(d))))
    layers = {}
    for name, module in model.named_modules():
        for adapter, groups in (getattr(module, "lora_velora_num_groups", None) or {}).items():
            width = module.in_features
            layers[f"{name}.lora_A.{adapter}"] = {
                "in_features": width,
                "sub_token_size": -(-width // groups),  # peft: ceil(in_features / num_groups)
            }
    return model, layers


def lora_names(model) -> set[str]:
    return {
        n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m.lora_A, "items")
    }


@pytest.mark.parametrize("targets", TARGETS)
@pytest.mark.parametrize("placement", list(PRESETS))
def test_lora_round_trip_builds_what_was_measured(placement, targets):
    found = measured("lora", placement, targets)
    if found is None:  # e.g. mlp on q/v adapters: nothing that trains, nothing to export
        assert placement in ("mlp", "down") and targets != "all-linear"
        return
    config = plan("lora", placement, targets, found)
    try:
        d = to_peft(config)
    except NotExpressible as refused:
        # the refusal is true: PEFT given this LoRA and a velora_config builds other layers
        forced = {**lora_kwargs(config, "CAUSAL_LM"), "velora_config": {"num_groups": GROUPS}}
        assert peft_built(forced, "lora")[1] != found["velora_layers"]
        nearest = refused.nearest.config
        assert "velora tune llama-tiny" in refused.nearest.command
        assert f"--placements {nearest.placement}" in refused.nearest.command
        again = measured("lora", nearest.placement, nearest.lora_targets)
        d = to_peft(plan("lora", nearest.placement, nearest.lora_targets, again))
        found = again
    model, layers = peft_built(d, "lora")
    assert type(model).__name__ == "PeftModelForCausalLM"  # task_type from the architecture
    assert layers == found["velora_layers"]  # the same layers, the same sub-token sizes
    assert len(lora_names(model)) == found["lora_layers"]


def test_the_issue_case_counts_only_adapters():
    # LoRA on q and v, VeLoRA qkv: k_proj has no adapter, so qkv compresses exactly q and v's
    found = measured("lora", "qkv", "q_proj,v_proj")
    assert len(found["velora_layers"]) == found["lora_layers"] == 4
    assert to_peft(plan("lora", "qkv", "q_proj,v_proj", found))["velora_config"]["num_groups"] == 4


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes")
@pytest.mark.parametrize("placement", list(PRESETS))
def test_qlora_velora_is_refused_because_peft_refuses_it(placement):
    import peft

    found = measured("qlora", placement, "all-linear")
    config = plan("qlora", placement, "all-linear", found)
    with pytest.raises(NotExpressible, match="refuses VeLoRA on bitsandbytes 4-bit") as info:
        to_peft(config)
    # what PEFT 0.21 really does with VeLoRA on a 4-bit base
    forced = {**lora_kwargs(config, "CAUSAL_LM"), "velora_config": {"num_groups": GROUPS}}
    with pytest.raises(ValueError, match="does not support VeLoRA"):
        peft.get_peft_model(tiny("qlora"), peft.LoraConfig(**forced))
    # the nearest PEFT can state, the same QLoRA without VeLoRA, round-trips
    nearest = info.value.nearest.config
    assert nearest.placement is None and "--placements none" in info.value.nearest.command
    again = measured("qlora", None, "all-linear")
    model, layers = peft_built(to_peft(plan("qlora", None, "all-linear", again)), "qlora")
    assert layers == {} and len(lora_names(model)) == again["lora_layers"]
    assert all("Linear4bit" in type(m.base_layer).__name__ for m in model.modules()
               if hasattr(m, "lora_A") and hasattr(m.lora_A, "items"))  # fmt: skip


def test_full_fine_tuning_is_refused_with_a_lora_to_measure():
    found = measured("full", "paper", "all-linear")
    config = dataclasses.replace(plan("full", "paper", "all-linear", found), lora_rank=None,
                                 lora_targets=None, lora_layers=None)  # fmt: skip
    with pytest.raises(NotExpressible, match="mode full: a LoraConfig trains adapters") as info:
        to_peft(config)
    assert "--mode lora" in info.value.nearest.command
    assert "--format trainer or trl" in str(info.value)


def test_the_peft_export_notes_what_a_lora_config_does_not_hold():
    found = measured("lora", "all-linear", "all-linear")
    config = dataclasses.replace(plan("lora", "all-linear", "all-linear", found), gc=2)
    result = export("peft", config)
    assert result.data["velora_config"] == {"num_groups": 4, "scale": 1.0,
                                            "init_type": "batch_average_once"}  # fmt: skip
    said = " ".join(result.notes)
    assert "the measured run used 1.0" in said
    assert "checkpointing every 2 layers" in said and "micro-batch 2 × 2" in said


def test_task_type_follows_the_head():
    masked = VeloraConfig(model="roberta-base", mode="lora", lora_rank=4)
    result = export("peft", masked)
    assert "task_type" not in result.data and any("no task_type" in n for n in result.notes)
    assert export("peft", dataclasses.replace(masked, model="llama-tiny")).data["task_type"] == (
        "CAUSAL_LM"
    )


# -- trl ---------------------------------------------------------------------------------------

needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL")


@needs_trl
@pytest.mark.parametrize("gc", [False, True, 2])
def test_sft_config_states_every_measured_setting(tmp_path, gc):
    from trl import SFTConfig

    found = measured("lora", "all-linear", "all-linear")
    config = dataclasses.replace(
        plan("lora", "all-linear", "all-linear", found), gc=gc, trainer="trl"
    )
    data = export("trl", config).data
    args = SFTConfig(output_dir=str(tmp_path), **json.loads(json.dumps(data["sft_config"])))
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 2)
    # SFTConfig's own defaults would checkpoint and autocast to bf16: the export says no
    assert args.activation_checkpointing is bool(gc) and args.bf16 is False
    if gc:
        assert args.activation_checkpointing_kwargs.get("every_n_layers", 1) == (
            1 if gc is True else gc
        )
    assert args.max_length == 32
    assert data["peft_config"]["velora_config"]["num_groups"] == 4 and not data["apply_velora"]
    assert load_config(data) == config  # VeloraCallback(trl export) reads its velora part
    compile(data["snippet"], "snippet", "exec")


@needs_trl
def test_trl_applies_velora_itself_where_peft_cannot():
    found = measured("qlora", "paper", "all-linear")
    config = dataclasses.replace(plan("qlora", "paper", "all-linear", found), trainer="trl")
    data = export("trl", config).data
    assert data["apply_velora"] and "velora_config" not in data["peft_config"]
    snippet = data["snippet"]
    assert 'peft.get_peft_model(model, peft.LoraConfig(**export["peft_config"]))' in snippet
    assert 'apply_config(model, export["velora"], checkpointing=False)' in snippet
    assert "p.data = p.data.float()" in snippet  # TRL's bf16 cast of 4-bit models' adapters
    assert "peft_config=" not in snippet.split("SFTTrainer(")[1]
    compile(snippet, "snippet", "exec")


def test_trl_missing_is_one_clear_line(monkeypatch):
    from velora_cli.exports import FormatUnavailable
    from velora_cli.exports import trl as trl_export

    monkeypatch.setattr(trl_export, "trl_version", lambda: None)
    with pytest.raises(FormatUnavailable, match="needs TRL.*pip install trl"):
        export("trl", VeloraConfig(model="llama-tiny"))


def test_export_config_never_writes_another_format_where_peft_was_asked(tmp_path):
    from typer.testing import CliRunner

    from velora_cli.cli import app

    found = measured("lora", "paper", "all-linear")
    document = {
        "kind": "velora-tune", "model": "llama-tiny", "task": "causal-lm", "seq_len": 32,
        "dtype": "fp32", "backend": "estimate", "candidates": [],
        "settings": {"lora_rank": 8, "lora_targets": "all-linear"},
        "recommendation": {"mode": "lora", "placement": "paper", "num_groups": GROUPS,
                           "gc": False, "micro_batch_size": 2, "grad_accum_steps": 2,
                           "optimizer": "adamw", "budget_bytes": 10**9, "peak_bytes": 10**6,
                           "velora_layers": found["velora_layers"],
                           "lora_layers": found["lora_layers"]},
    }  # fmt: skip
    tune = tmp_path / "tune.json"
    tune.write_text(json.dumps(document))
    target = tmp_path / "lora.json"
    runner = CliRunner()
    result = runner.invoke(app, ["export-config", "--from", str(tune), "--format", "peft",
                                 "-o", str(target)])  # fmt: skip
    assert result.exit_code == 1 and not target.exists() and result.stdout == ""
    [line] = result.stderr.strip().splitlines()  # one line: the reason, the nearest, the command
    assert line.startswith("error: not expressible as a peft.LoraConfig: placement 'paper'")
    assert "Nearest that is: VeLoRA on all 14 LoRA adapters, g4" in line
    assert "velora tune llama-tiny --budget 1GB --backend estimate --batch-size 4" in line
    assert "--placements all-linear --num-groups 4 && velora export-config --format peft" in line
    # the same plan as TRL: refused (it measured the hf step); planned for TRL's step: exact,
    # with velora's VeLoRA on the peft model
    if importlib.util.find_spec("trl"):
        result = runner.invoke(app, ["export-config", "--from", str(tune), "--format", "trl"])
        assert result.exit_code == 1 and "--trainer trl" in result.stderr
        document["settings"]["trainer"] = "trl"
        tune.write_text(json.dumps(document))
        result = runner.invoke(app, ["export-config", "--from", str(tune), "--format", "trl"])
        assert result.exit_code == 0 and json.loads(result.stdout)["apply_velora"] is True
