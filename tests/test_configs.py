"""The exported config: validation, loading, and the velora / peft / trainer round trips."""

import dataclasses
import json

import pytest

from velora_cli.configs import (
    ConfigError,
    VeloraConfig,
    apply_config,
    from_tune_document,
    load_config,
    make_optimizer,
)
from velora_cli.exports import NotExpressible
from velora_cli.exports.peft import to_peft
from velora_cli.exports.trainer import to_trainer, trainer_notes, trainer_snippet


def fresh_tiny(mode="full", rank=8):
    """llama-tiny with random weights on CPU, wrapped with LoRA as the tune wraps it."""
    import torch

    from velora_cli.measure.train_step import StepSpec, _apply_lora
    from velora_cli.models import build_model, resolve_model

    model = build_model(resolve_model("llama-tiny"), device="cpu", dtype=torch.float32)
    if mode == "lora":
        model = _apply_lora(model, StepSpec("llama-tiny", mode="lora", lora_rank=rank))
    return model


def tuned_layers(mode: str, placement: str, num_groups: int) -> tuple[dict, int]:
    """What `velora tune` records for a recommendation: its layers, built on meta."""
    from velora_cli.search import autotune

    settings = autotune.TuneSettings("llama-tiny", budget_bytes=10**9, backend="estimate")
    rec = dict(mode=mode, placement=placement, num_groups=num_groups, gc=False,
               micro_batch_size=2, grad_accum_steps=2, optimizer="adamw")  # fmt: skip
    found = autotune._layers_of(settings, rec)
    return found["velora_layers"], found["lora_layers"]


def config(**overrides) -> VeloraConfig:
    layers, _ = tuned_layers("full", "paper", 32)
    fields = dict(model="llama-tiny", placement="paper", num_groups=32, layers=layers, gc=2,
                  micro_batch_size=2, grad_accum_steps=4, budget_bytes=10**9,
                  peak_bytes=5 * 10**8, backend="cpu")  # fmt: skip
    fields.update(overrides)
    return VeloraConfig(**fields)


# -- validation and loading ---------------------------------------------------------------------


def test_every_error_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        VeloraConfig(model="m", mode="int8", init="zeros", gc=-1, micro_batch_size=0)
    message = str(info.value)
    for part in ("mode must be one of full, lora, qlora", "init must be one of", "gc must be",
                 "micro_batch_size must be a positive integer"):  # fmt: skip
        assert part in message


def test_layers_must_divide_and_need_a_placement():
    with pytest.raises(ConfigError, match="does not divide in_features 64"):
        config(layers={"model.layers.0.mlp.down_proj": {"in_features": 64, "sub_token_size": 3}})
    with pytest.raises(ConfigError, match="need a placement"):
        VeloraConfig(model="m", num_groups=32)


def test_gc_one_means_every_layer():
    assert config(gc=1).gc is True and config(gc=1).gc_every == 1


def test_velora_format_round_trips_through_a_file(tmp_path):
    cfg = config()
    path = tmp_path / "velora.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert load_config(path) == dataclasses.replace(cfg, source=None)
    assert load_config(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", r"is not valid JSON \(line 1"),
        ("[1, 2]", "expected a JSON object"),
        ('{"r": 8, "target_modules": "all-linear"}', "not a velora config"),
        ('{"format": "trainer", "training_arguments": {}}', "it is a trainer export"),
        ('{"format": "velora-config", "version": 1, "model": "m", "colour": 1}', "unknown fields"),
        ('{"format": "velora-config", "version": 9, "model": "m"}', "version 9"),
        ('{"format": "velora-config", "version": 1, "model": "m", "mode": "x"}', "mode must be"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_file_and_empty_tune_document(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config file"):
        load_config(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="nothing to export"):
        load_config({"recommendation": None, "candidates": []})


def test_tune_document_recommendation_becomes_a_config():
    layers, _ = tuned_layers("full", "paper", 32)
    document = {
        "model": "llama-tiny", "seq_len": 128, "dtype": "fp32", "amp": None, "backend": "cpu",
        "settings": {"init": "batch_average_once", "lora_rank": 8, "lora_targets": "all-linear"},
        "environment": {"torch": "2.x", "transformers": "5.x", "peft": "0.21"},
        "candidates": [],
        "recommendation": {
            "mode": "full", "placement": "paper", "num_groups": 32, "gc": True,
            "micro_batch_size": 4, "grad_accum_steps": 2, "optimizer": "adamw",
            "budget_bytes": 10**7, "peak_bytes": 9 * 10**6, "step_seconds": 0.5,
            "tokens_per_second": 1000.0, "velora_layers": layers, "backend": "cpu",
        },
    }  # fmt: skip
    cfg = from_tune_document(document, "tune.json")
    assert (cfg.gc, cfg.micro_batch_size, cfg.grad_accum_steps) == (True, 4, 2)
    assert cfg.peak_bytes == 9 * 10**6 and cfg.versions["torch"] == "2.x"
    assert load_config(document) == dataclasses.replace(cfg, source=None)


# -- apply_config --------------------------------------------------------------------------------


def test_apply_config_wraps_the_tuned_layers_with_their_sizes():
    import velora_cli
    from velora_cli.methods.placement import velora_layers

    assert velora_cli.apply_config is apply_config  # the public, lazily imported name
    cfg = config(gc=False)
    model = fresh_tiny()
    names = apply_config(model, cfg.to_dict())
    assert names == list(cfg.layers)
    wrapped = velora_layers(model)
    assert {n: m.sub_token_size for n, m in wrapped.items()} == {
        n: e["sub_token_size"] for n, e in cfg.layers.items()
    }
    assert all(m.init == "batch_average_once" for m in wrapped.values())


def test_apply_config_enables_checkpointing_unless_asked_not_to():
    model = fresh_tiny()
    apply_config(model, config(gc=True))
    assert model.is_activation_checkpointing
    model = fresh_tiny()
    apply_config(model, config(gc=True), checkpointing=False)
    assert not model.is_activation_checkpointing


def test_apply_config_refuses_a_model_that_does_not_match():
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=96, intermediate_size=192,
                             num_hidden_layers=2, num_attention_heads=4, vocab_size=128))  # fmt: skip
    with pytest.raises(ConfigError, match="has in_features 96, the config 64"):
        apply_config(other, config())
    deeper = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=192,
                              num_hidden_layers=3, num_attention_heads=4, vocab_size=128))  # fmt: skip
    with pytest.raises(ConfigError, match="model layers were not tuned"):
        apply_config(deeper, config())
    with pytest.raises(ConfigError, match="wrap the model with peft.get_peft_model first"):
        apply_config(fresh_tiny(), config(mode="lora", lora_rank=8))


# -- peft -------------------------------------------------------------------------------------


def lora_config(placement="all-linear", **overrides):
    layers, lora_layers = tuned_layers("lora", placement, 32)
    fields = dict(mode="lora", placement=placement, layers=layers, lora_layers=lora_layers,
                  lora_rank=8, lora_targets="all-linear", gc=False)  # fmt: skip
    return config(**{**fields, **overrides})


def test_peft_export_round_trips_and_refuses_what_peft_would_build_otherwise():
    import peft

    d = json.loads(json.dumps(to_peft(lora_config())))  # what export-config writes
    model = peft.get_peft_model(fresh_tiny(), peft.LoraConfig(**d))
    velora = [n for n, m in model.named_modules() if getattr(m, "lora_velora_num_groups", None)]
    assert len(velora) == lora_config().lora_layers and d["task_type"] == "CAUSAL_LM"
    with pytest.raises(NotExpressible, match="PEFT's VeloraConfig applies to every LoRA target"):
        to_peft(lora_config("paper"))
    with pytest.raises(NotExpressible, match="mode full"):
        to_peft(config())


def test_lora_without_velora_is_plain_lora():
    import peft

    cfg = config(mode="lora", placement=None, num_groups=None, layers=None, lora_rank=4, gc=False)
    d = to_peft(cfg)
    assert "velora_config" not in d and peft.LoraConfig(**d).r == 4


def test_apply_config_on_a_peft_model_wraps_the_lora_a_projections():
    cfg = lora_config("paper")
    names = apply_config(fresh_tiny("lora"), cfg)
    assert names == list(cfg.layers) and all(".lora_A.default" in n for n in names)


# -- trainer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("gc", [False, True, 2])
def test_trainer_kwargs_construct_training_arguments(tmp_path, gc):
    from transformers import TrainingArguments

    cfg = config(gc=gc)
    kwargs = json.loads(json.dumps(to_trainer(cfg)))
    args = TrainingArguments(output_dir=str(tmp_path), **kwargs)
    assert args.per_device_train_batch_size == 2 and args.gradient_accumulation_steps == 4
    assert args.activation_checkpointing is bool(gc)
    if gc:
        ckpt = args.activation_checkpointing_kwargs
        assert ckpt["use_reentrant"] is False
        assert ckpt.get("every_n_layers", 1) == (1 if gc is True else gc)


def test_trainer_snippet_applies_velora_without_checkpointing_twice():
    snippet = trainer_snippet(config(gc=2), "cfg.json")
    assert 'export = json.load(open("cfg.json"))' in snippet
    assert 'apply_config(model, export["velora"], checkpointing=False)' in snippet
    assert 'TrainingArguments(output_dir="out", **export["training_arguments"])' in snippet
    compile(snippet, "snippet", "exec")


# -- optimizers ----------------------------------------------------------------------------------


def lowrank_config(optimizer="galore", **overrides):
    fields = dict(optimizer=optimizer, rank=8, update_gap=50, eta=0.8,
                  optimizer_targets=["down_proj", "o_proj", "q_proj"])  # fmt: skip
    return config(**{**fields, **overrides})


def test_optimizer_settings_are_validated_together():
    with pytest.raises(ConfigError) as info:
        VeloraConfig(model="m", mode="lora", lora_rank=8, optimizer="galore", rank=0,
                     update_gap=0, eta=1.5)  # fmt: skip
    message = str(info.value)
    for part in ("optimizer galore needs mode full", "rank must be a positive integer",
                 "update_gap must be", "eta must be a number in (0, 1]"):  # fmt: skip
        assert part in message
    with pytest.raises(ConfigError, match="optimizer must be one of adamw, sgd, galore"):
        VeloraConfig(model="m", optimizer="adam")


@pytest.mark.parametrize("optimizer", ["galore", "adafactor", "adamw_8bit", "paged_adamw_32bit"])
def test_a_config_refuses_an_optimizer_fsdp2_cannot_step(optimizer):
    # the same refusal as StepSpec's (measure.layout), for a hand-written config file
    with pytest.raises(ConfigError, match=f"optimizer {optimizer} does not run under FSDP2"):
        VeloraConfig(model="m", world_size=2, parallel="fsdp", optimizer=optimizer)
    VeloraConfig(model="m", world_size=2, parallel="ddp", optimizer=optimizer)


def test_optimizer_constants_match_the_optimizers():
    from velora_cli import configs
    from velora_cli.measure.train_step import LOWRANK_OPTIMIZERS, OPTIMIZERS
    from velora_cli.methods import lowrank

    assert configs.OPTIMIZERS == OPTIMIZERS and configs.LOWRANK_OPTIMIZERS == LOWRANK_OPTIMIZERS
    assert configs.DEFAULT_UPDATE_GAP == lowrank.DEFAULT_UPDATE_GAP
    assert configs.DEFAULT_ETA == lowrank.DEFAULT_ETA
    assert configs.GALORE_SCALE == lowrank.DEFAULT_SCALE


def test_tune_document_records_the_resolved_rank_and_targets():
    document = {
        "model": "llama-tiny", "seq_len": 128, "candidates": [],
        "settings": {"rank": None, "update_gap": 50, "eta": 0.8},
        "recommendation": {"mode": "full", "optimizer": "adarankgrad", "optimizer_rank_cap": 16,
                           "optimizer_targets": ["q_proj"], "micro_batch_size": 4},
    }  # fmt: skip
    cfg = from_tune_document(document)
    assert (cfg.optimizer, cfg.rank, cfg.update_gap, cfg.eta) == ("adarankgrad", 16, 50, 0.8)
    assert cfg.optimizer_targets == ["q_proj"]
    document["recommendation"]["optimizer"] = "adamw"
    assert from_tune_document(document).rank is None  # no rank for an optimizer without one


def test_trainer_galore_projects_what_velora_projects(tmp_path):
    from torch import nn
    from transformers import TrainingArguments
    from transformers.trainer_utils import check_target_module_exists

    from velora_cli.methods.lowrank import param_groups
    from velora_cli.search import autotune

    settings = autotune.TuneSettings("llama-tiny", budget_bytes=10**9, backend="estimate")
    rec = dict(mode="full", placement=None, num_groups=None, micro_batch_size=4,
               grad_accum_steps=1, optimizer="galore")  # fmt: skip
    targets = autotune._layers_of(settings, rec)["optimizer_targets"]
    kwargs = json.loads(json.dumps(to_trainer(lowrank_config(optimizer_targets=targets))))
    args = TrainingArguments(output_dir=str(tmp_path), **kwargs)
    assert (
        args.optim == "galore_adamw" and args.optim_args == "rank=8,update_proj_gap=50,scale=0.25"
    )
    # transformers' GaLore takes the nn.Linear weights its targets match (trainer_optimizer.py):
    # the same weights velora's GaLore projects
    model = fresh_tiny()
    theirs = {
        id(m.weight)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and check_target_module_exists(args.optim_target_modules, name)
    }
    ours = {id(p) for p in param_groups(model)[0]["params"]}
    assert theirs == ours
    fallback = to_trainer(lowrank_config(optimizer_targets=None))["optim_target_modules"]
    assert fallback == [r".*attn.*", r".*attention.*", r".*mlp.*"]


def test_trainer_adarankgrad_is_built_by_velora_and_passed_to_the_trainer():
    cfg = lowrank_config("adarankgrad")
    assert "optim" not in to_trainer(cfg)
    assert any("optimizers=(optimizer, None)" in note for note in trainer_notes(cfg))
    snippet = trainer_snippet(cfg, "cfg.json")
    assert "from velora_cli import VeloraCallback, apply_config, build_model, make_optimizer" in (
        snippet
    )
    assert 'optimizer = make_optimizer(model, export["velora"], lr=1e-2)' in snippet
    assert "optimizers=(optimizer, None), callbacks=[VeloraCallback(export" in snippet
    compile(snippet, "snippet", "exec")
    sgd = to_trainer(config(optimizer="sgd"))
    assert (sgd["optim"], sgd["optim_args"]) == ("sgd", "momentum=0.9")  # as the tune measured


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "galore", "adarankgrad"])
def test_make_optimizer_round_trips_through_the_exported_config(tmp_path, optimizer):
    import torch

    import velora_cli
    from velora_cli.methods import lowrank

    assert velora_cli.make_optimizer is make_optimizer  # the public, lazily imported name
    rank = None if optimizer == "adarankgrad" else 8  # None: hidden size 64 / 4 = 16
    cfg = config(gc=False, optimizer=optimizer, rank=rank, update_gap=50, eta=0.8)
    path = tmp_path / "velora.json"
    path.write_text(json.dumps(cfg.to_dict()))  # export -> file
    model = fresh_tiny()
    apply_config(model, path)
    opt = make_optimizer(model, path, lr=1e-3)
    expected = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
                "galore": lowrank.GaLoreAdamW, "adarankgrad": lowrank.AdaRankGrad}  # fmt: skip
    assert type(opt) is expected[optimizer]
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)
    if optimizer in ("galore", "adarankgrad"):
        group = opt.param_groups[0]
        assert (group["rank"], group["update_gap"], group["scale"]) == (rank or 16, 50, 0.25)
        assert group.get("eta", 0.8) == 0.8
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in model.parameters()]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
