"""Tests for velora_cli.models: built-ins, hub fallback, local directories, building.

Hermetic: HF_HUB_OFFLINE=1 for every test, CPU or meta only, tiny models saved into tmp_path.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import errors as hub_errors
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from velora_cli.models import (
    DEFAULT_MODEL,
    ModelError,
    ModelSpec,
    build_model,
    list_builtins,
    resolve_model,
)
from velora_cli.models import spec as models

# Exact parameter counts (tied embeddings counted once). Published figures: Llama-2-7B 6.74B,
# Llama-2-13B 13.0B, Llama-2-70B 69.0B (80·855_654_400 per block + 2·32000·8192 + 8192 =
# 68_976_648_192), Llama-3-8B 8.03B, Llama-3.2-3B 3.21B (tied embeddings), Mistral-7B 7.24B,
# Qwen2.5-0.5B 0.49B, GPT-2 124M,
# RoBERTa-base 125M with its LM head, ViT-B/16 86,567,656 with its 1000-class head (196 + 1
# positions, a 16x16x3 patch conv, 12 blocks of 7,087,872, no pooler). LLaMA 60M / 130M: GaLore's configs, counted by hand, e.g.
# 60M = 2·32000·512 (embed + head) + 8·(4·512² + 3·512·1376 + 2·512) + 512 = 58_073_600.
EXPECTED_PARAMS = {
    "llama-tiny": 229_696,
    "llama-60m": 58_073_600,
    "llama-130m": 134_105_856,
    "llama-1b": 1_345_423_360,
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3.2-3b": 3_212_749_824,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "roberta-base": 124_697_433,
    "gpt2": 124_439_808,
    "vit-base": 86_567_656,
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub traffic: each failed lookup would otherwise retry for ~25 s."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny_llama_dir(tmp_path):
    """A 1-layer Llama saved with save_pretrained, and the model that was saved."""
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=1,
        vocab_size=128,
    )
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path)
    return tmp_path, model


def assert_one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


# -- built-ins ------------------------------------------------------------------------------------


def test_import_does_not_load_torch_or_transformers():
    code = (
        "import sys, velora_cli.models; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_expected_params_cover_every_builtin():
    assert set(EXPECTED_PARAMS) == {row["name"] for row in list_builtins()}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_builtin_resolves_and_builds_on_meta(name):
    spec = resolve_model(name)
    assert (spec.source, spec.builtin, spec.weights_path, spec.notice) == (
        "builtin",
        name,
        None,
        None,
    )
    use_cache = getattr(spec.config, "use_cache", None)  # a ViT config has none

    model = build_model(spec, device="meta", dtype=torch.bfloat16)

    params = list(model.parameters())
    assert {p.device.type for p in params} == {"meta"}
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert sum(p.numel() for p in params) == EXPECTED_PARAMS[name]
    assert model.config.use_cache is False
    assert model.training
    assert getattr(spec.config, "use_cache", None) == use_cache, "build_model must not mutate"


def test_builtin_names_are_case_insensitive():
    spec = resolve_model("Llama-2-7B")
    assert spec.builtin == "llama-2-7b" and spec.name == "Llama-2-7B"


def test_default_model_is_a_small_builtin():
    spec = resolve_model(None)
    assert spec.builtin == DEFAULT_MODEL == "llama-60m"
    assert resolve_model("").builtin == DEFAULT_MODEL


def test_builtin_configs_use_published_values():
    llama3 = resolve_model("llama-3-8b").config
    assert (llama3.num_key_value_heads, llama3.vocab_size) == (8, 128256)
    assert llama3.rope_parameters["rope_theta"] == 500000.0
    small = resolve_model("llama-3.2-3b").config
    assert (small.hidden_size, small.intermediate_size, small.num_hidden_layers) == (3072, 8192, 28)
    assert (small.num_attention_heads, small.num_key_value_heads, small.head_dim) == (24, 8, 128)
    assert small.tie_word_embeddings and small.max_position_embeddings == 131072
    assert small.rope_parameters["rope_type"] == "llama3"
    assert small.rope_parameters["factor"] == 32.0 and small.rope_parameters["rope_theta"] == 5e5
    qwen = resolve_model("qwen2.5-0.5b").config
    assert (qwen.num_attention_heads, qwen.num_key_value_heads, qwen.tie_word_embeddings) == (
        14,
        2,
        True,
    )
    assert type(resolve_model("mistral-7b").config).__name__ == "MistralConfig"
    assert resolve_model("roberta-base").task == "masked-lm"


def test_list_builtins_rows():
    rows = list_builtins()
    assert [row["params"] for row in rows] == sorted(row["params"] for row in rows)
    by_name = {row["name"]: row for row in rows}
    assert by_name["llama-2-7b"]["params"] == EXPECTED_PARAMS["llama-2-7b"]
    assert (by_name["llama-130m"]["layers"], by_name["llama-130m"]["hidden"]) == (12, 768)
    assert by_name["gpt2"]["max_seq"] == 1024
    assert by_name["roberta-base"]["max_seq"] == 512
    assert by_name["llama-60m"]["max_seq"] is None  # RoPE: no position table
    assert "synthetic" in by_name["llama-1b"]["description"]
    assert all(row["description"] and row["model_type"] for row in rows)


def test_random_build_is_reproducible_and_keeps_caller_rng():
    spec = resolve_model("llama-tiny")
    torch.manual_seed(123)
    state = torch.get_rng_state()

    first, second = build_model(spec), build_model(spec)

    assert torch.equal(torch.get_rng_state(), state)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name} differs between two builds"


def test_dtype_by_name_and_attention_implementation():
    model = build_model(resolve_model("llama-tiny"), dtype="bf16", attn_implementation="eager")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"


def test_unknown_dtype():
    with pytest.raises(ModelError) as exc_info:
        build_model(resolve_model("llama-tiny"), dtype="float8")
    assert "float8" in assert_one_line(exc_info)


def test_unknown_attention_implementation():
    with pytest.raises(ModelError) as exc_info:
        build_model(resolve_model("llama-tiny"), attn_implementation="no-such-attention")
    assert "attn_implementation=no-such-attention" in assert_one_line(exc_info)


def test_builtin_with_weights_is_an_error():
    with pytest.raises(ModelError) as exc_info:
        build_model(resolve_model("gpt2"), weights=True)
    message = assert_one_line(exc_info)
    assert "built-in architectures have no weights" in message
    assert "openai-community/gpt2" in message


# -- hub ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hub_id", "builtin"),
    [
        ("meta-llama/Llama-2-7b", "llama-2-7b"),
        ("meta-llama/llama-2-7b-hf", "llama-2-7b"),
        ("meta-llama/Llama-3.1-8B", "llama-3-8b"),
        ("FacebookAI/roberta-base", "roberta-base"),
    ],
)
def test_well_known_hub_id_falls_back_to_builtin_offline(hub_id, builtin):
    spec = resolve_model(hub_id)

    assert (spec.name, spec.source, spec.builtin, spec.weights_path) == (
        hub_id,
        "builtin",
        builtin,
        None,
    )
    assert spec.notice == (
        f"hub unreachable for {hub_id} (offline); using built-in architecture {builtin} "
        "(same shapes, random weights)"
    )


def test_hub_fallback_with_weights_says_why():
    with pytest.raises(ModelError) as exc_info:
        build_model(resolve_model("meta-llama/Llama-2-7b"), weights=True)
    assert "hub was not usable" in assert_one_line(exc_info)


def test_unknown_hub_id_offline():
    with pytest.raises(ModelError) as exc_info:
        resolve_model("nobody/no-such-model")
    message = assert_one_line(exc_info)
    assert "'nobody/no-such-model'" in message
    assert "HF_HUB_OFFLINE" in message and "velora models" in message


def test_invalid_hub_id():
    with pytest.raises(ModelError) as exc_info:
        resolve_model("not a model")
    assert "not a valid hub id" in assert_one_line(exc_info)


def _raise_from(cause: Exception):
    def from_pretrained(*args, **kwargs):
        raise OSError("transformers' wrapper message\nsecond line") from cause

    return from_pretrained


def _gated() -> Exception:
    exc = hub_errors.GatedRepoError.__new__(hub_errors.GatedRepoError)  # needs no HTTP response
    Exception.__init__(exc, "403 gated")
    return exc


def test_gated_unknown_repo_names_login(monkeypatch):
    monkeypatch.setattr(AutoConfig, "from_pretrained", _raise_from(_gated()))
    with pytest.raises(ModelError) as exc_info:
        resolve_model("someone/gated-model")
    message = assert_one_line(exc_info)
    assert "gated" in message and "huggingface-cli login" in message


def test_gated_well_known_repo_falls_back(monkeypatch):
    monkeypatch.setattr(AutoConfig, "from_pretrained", _raise_from(_gated()))
    spec = resolve_model("meta-llama/Llama-2-13b-hf")
    assert spec.builtin == "llama-2-13b"
    assert "(gated repo, no access)" in spec.notice


def test_network_error_is_named(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    cause = hub_errors.LocalEntryNotFoundError("connection failed")
    monkeypatch.setattr(AutoConfig, "from_pretrained", _raise_from(cause))
    monkeypatch.setattr(models, "_hub_offline", lambda: False)
    with pytest.raises(ModelError) as exc_info:
        resolve_model("someone/model")
    assert "hub unreachable" in assert_one_line(exc_info)


def test_hub_config_is_used_when_available(monkeypatch):
    config = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda *a, **k: config)
    spec = resolve_model("meta-llama/Llama-2-7b-hf")
    assert (spec.source, spec.builtin, spec.weights_path, spec.tokenizer_path) == (
        "hub",
        None,
        "meta-llama/Llama-2-7b-hf",
        "meta-llama/Llama-2-7b-hf",
    )
    assert spec.config is config and spec.task == "causal-lm"


# -- local directories ----------------------------------------------------------------------------


def test_local_directory_builds_random_and_with_weights(tiny_llama_dir):
    path, saved = tiny_llama_dir
    spec = resolve_model(str(path))
    assert (spec.source, spec.task, spec.weights_path, spec.builtin) == (
        "local",
        "causal-lm",
        str(path),
        None,
    )
    assert spec.tokenizer_path is None  # only a model was saved

    random = build_model(spec)
    loaded = build_model(spec, weights=True)

    assert isinstance(random, LlamaForCausalLM) and loaded.training
    assert loaded.config.use_cache is False
    expected = saved.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), f"{name} not loaded from the checkpoint"
    assert not torch.equal(random.lm_head.weight, saved.lm_head.weight)


def test_local_directory_with_tokenizer_files(tiny_llama_dir):
    path, _ = tiny_llama_dir
    (path / "tokenizer_config.json").write_text("{}")
    assert resolve_model(str(path)).tokenizer_path == str(path)


def test_local_directory_without_config(tmp_path):
    with pytest.raises(ModelError) as exc_info:
        resolve_model(str(tmp_path))
    assert "has no config.json" in assert_one_line(exc_info)


def test_local_directory_without_weights(tmp_path):
    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(
        tmp_path
    )
    spec = resolve_model(str(tmp_path))
    with pytest.raises(ModelError) as exc_info:
        build_model(spec, weights=True)
    assert "cannot load weights" in assert_one_line(exc_info)


def test_weights_on_meta_is_an_error(tiny_llama_dir):
    path, _ = tiny_llama_dir
    with pytest.raises(ModelError) as exc_info:
        build_model(resolve_model(str(path)), device="meta", weights=True)
    assert "meta device" in assert_one_line(exc_info)


def test_missing_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(ModelError) as exc_info:
        resolve_model(str(tmp_path / "missing"))
    assert "no such directory" in assert_one_line(exc_info)


def test_file_instead_of_directory(tmp_path):
    file = tmp_path / "config.json"
    file.write_text("{}")
    with pytest.raises(ModelError) as exc_info:
        resolve_model(str(file))
    assert "is a file" in assert_one_line(exc_info)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"model_type": "no-such-architecture"}, "check the file"),
        (
            {"model_type": "foo", "auto_map": {"AutoConfig": "configuration_foo.FooConfig"}},
            "--trust-remote-code",
        ),
        ({"model_type": "t5"}, "no causal-LM or masked-LM head"),
    ],
)
def test_unusable_local_config(tmp_path, config, expected):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError) as exc_info:
        resolve_model(str(tmp_path))
    assert expected in assert_one_line(exc_info)


def test_masked_lm_task_from_model_type(tmp_path):
    AutoConfig.for_model(
        "bert", hidden_size=32, num_attention_heads=4, num_hidden_layers=1
    ).save_pretrained(tmp_path)
    spec = resolve_model(str(tmp_path))
    assert spec.task == "masked-lm"
    assert type(build_model(spec, device="meta")).__name__ == "BertForMaskedLM"


def test_spec_is_frozen():
    spec = resolve_model("llama-tiny")
    assert isinstance(spec, ModelSpec)
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]


def test_a_mistyped_built_in_gets_did_you_mean(monkeypatch):
    """Issue 28: lama-60m got no hint (offline: the hub lookup fails, then the hint)."""
    from velora_cli.models import ModelError, resolve_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"did you mean llama-60m\?$"):
        resolve_model("lama-60m")
    with pytest.raises(ModelError) as info:
        resolve_model("qwerty-model")
    assert "did you mean" not in str(info.value)
