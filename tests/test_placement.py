"""Placement presets on every supported architecture, and what they really free."""

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from velora_cli import apply_velora, remove_velora, saved_activation_bytes, velora_layers
from velora_cli.methods.placement import PlacementError, layer_role
from velora_cli.methods.velora import SubTokenSizeError, VeLoRAConv1D, VeLoRALinear

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _build(kind):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "llama":
        return tiny_llama()
    if kind == "mistral":
        return tf.MistralForCausalLM(
            tf.MistralConfig(**SMALL, num_key_value_heads=2, vocab_size=128)
        )
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**SMALL, num_key_value_heads=2, vocab_size=128))
    if kind == "bert":
        return tf.BertForMaskedLM(tf.BertConfig(**SMALL, **NO_DROPOUT, vocab_size=128))
    if kind == "roberta":
        return tf.RobertaForMaskedLM(tf.RobertaConfig(**SMALL, **NO_DROPOUT, vocab_size=128))
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(
            tf.GPT2Config(
                n_embd=64,
                n_layer=2,
                n_head=4,
                vocab_size=128,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
        )
    if kind == "vit":
        return tf.ViTForImageClassification(
            tf.ViTConfig(**SMALL, **NO_DROPOUT, image_size=32, patch_size=8, num_labels=3)
        )
    raise AssertionError(kind)


def _leaf_set(names):
    return {n.split(".", n.count(".") - 1)[-1] if n.count(".") else n for n in names}


EXPECTED_PAPER = {
    "llama": {"self_attn.v_proj", "mlp.down_proj"},
    "mistral": {"self_attn.v_proj", "mlp.down_proj"},
    "qwen2": {"self_attn.v_proj", "mlp.down_proj"},
    "bert": {"self.value", "output.dense"},
    "roberta": {"self.value", "output.dense"},
    "gpt2": {"attn.c_attn", "mlp.c_proj"},
    "vit": {"attention.v_proj", "mlp.fc2"},  # transformers 5 names
}


@pytest.mark.parametrize("kind", sorted(EXPECTED_PAPER))
def test_paper_preset_resolves(kind):
    model = _build(kind)
    names = apply_velora(model, "paper", num_groups=4)
    assert _leaf_set(names) == EXPECTED_PAPER[kind]
    n_layers = 2
    assert len(names) == 2 * n_layers
    assert not any("attention.output" in n for n in names)  # BERT's o projection is not "down"
    assert all(".lora" not in n and "head" not in n and "classifier" not in n for n in names)


@pytest.mark.parametrize("kind", sorted(EXPECTED_PAPER))
def test_all_linear_never_touches_embeddings_or_heads(kind):
    model = _build(kind)
    names = apply_velora(model, "all-linear", num_groups=2)
    assert names and all(("layers." in n or "layer." in n or ".h." in n) for n in names)
    assert not any(n.startswith(("lm_head", "classifier", "cls")) for n in names)


@pytest.mark.parametrize("kind", sorted(EXPECTED_PAPER))
def test_wrapping_keeps_outputs_and_weight_keys_and_remove_restores(kind):
    model = _build(kind).eval()
    before_keys = set(model.state_dict())
    if kind == "vit":
        inputs = {"pixel_values": torch.randn(2, 3, 32, 32)}
    else:
        inputs = {"input_ids": torch.randint(0, 128, (2, 12))}
    expected = model(**inputs).logits
    names = apply_velora(model, "all-linear", num_groups=4)
    model.train()
    out = model(**inputs).logits
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # forward is exact (no dropout)
    after_keys = set(model.state_dict())
    assert before_keys <= after_keys
    assert after_keys - before_keys == {f"{n}.v" for n in names}
    params_before = {n: p for n, p in model.named_parameters()}
    assert remove_velora(model) == names
    assert not velora_layers(model)
    assert set(model.state_dict()) == before_keys
    assert all(p is params_before[n] for n, p in model.named_parameters())
    cls = (nn.Linear,) if kind != "gpt2" else (type(model.transformer.h[0].attn.c_attn),)
    assert all(isinstance(model.get_submodule(n), cls) for n in names)


def test_qwen2_biases_are_kept_and_exact():
    model = _build("qwen2")
    names = apply_velora(model, "qkv", num_groups=4)
    q = model.get_submodule(names[0])
    assert q.bias is not None and isinstance(q, VeLoRALinear)


def test_gpt2_uses_conv1d_wrapper():
    model = _build("gpt2")
    names = apply_velora(model, "mlp", num_groups=4)
    assert all(isinstance(model.get_submodule(n), VeLoRAConv1D) for n in names)
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(model.get_submodule(n).weight.grad is not None for n in names)


def test_print_shows_sub_token_size_and_init(llama):
    apply_velora(llama, "down", sub_token_size=16, init="random")
    text = str(llama)
    assert "sub_token_size=16, init=random" in text


def test_patterns_and_per_layer_sizes(llama):
    names = apply_velora(
        llama, ["*.mlp.down_proj", "v_proj"], num_groups={"*.down_proj": 8, "*": 4}
    )
    sizes = {n: llama.get_submodule(n).sub_token_size for n in names}
    assert sizes["model.layers.0.mlp.down_proj"] == 128 // 8
    assert sizes["model.layers.0.self_attn.v_proj"] == 64 // 4


def test_substring_pattern(llama):
    names = apply_velora(llama, ["proj"], num_groups=2)
    assert len(names) == 2 * 7  # q k v o gate up down


def test_default_is_paper_with_32_groups(llama):
    names = apply_velora(llama)
    layer = llama.get_submodule(names[0])
    assert layer.sub_token_size == layer.in_features // 32 and layer.init == "batch_average_once"


def test_bad_inputs_are_clear_errors(llama):
    with pytest.raises(PlacementError, match="unknown placement 'nope'"):
        apply_velora(llama, "nope")
    with pytest.raises(PlacementError, match="matched no linear layer"):
        apply_velora(llama, ["*.does_not_exist"])
    with pytest.raises(SubTokenSizeError, match="down_proj.*in_features=128"):
        apply_velora(llama, "down", sub_token_size=7)
    assert not velora_layers(llama)  # validation happens before anything is wrapped


def test_roles():
    assert layer_role("model.layers.0.self_attn.v_proj") == "v"
    assert layer_role("roberta.encoder.layer.1.attention.output.dense") == "o"
    assert layer_role("roberta.encoder.layer.1.output.dense") == "down"
    assert layer_role("roberta.encoder.layer.1.intermediate.dense") == "up"
    assert layer_role("transformer.h.0.mlp.c_proj") == "down"
    assert layer_role("transformer.h.0.attn.c_proj") == "o"


# ---- memory truth (REFERENCE.md §2) --------------------------------------------------------


def _saved(model, ids):
    return saved_activation_bytes(model, lambda: model(input_ids=ids, labels=ids).loss)


def test_paper_frees_down_proj_input_but_not_v_proj_input(llama, tokens):
    base = _saved(llama, tokens)
    apply_velora(llama, "paper", num_groups=4)
    after = _saved(llama, tokens)
    batch_tokens = tokens.numel()
    down_input = batch_tokens * 128 * 4  # (T, intermediate) fp32 per layer
    z_down = batch_tokens * 4 * 4  # (T, 4 groups) fp32
    z_v = batch_tokens * 4 * 4
    # per layer: down's input leaves, two z's arrive; v_proj's input stays (q/k save it)
    assert base.total_bytes - after.total_bytes == 2 * (down_input - z_down - z_v)
    assert (
        after.by_pattern()["model.layers.*.input_layernorm"]
        == (base.by_pattern()["model.layers.*.input_layernorm"])
    )


def test_qkv_frees_the_shared_attention_input(llama, tokens):
    base = _saved(llama, tokens)
    apply_velora(llama, "qkv", num_groups=4)
    after = _saved(llama, tokens)
    t = tokens.numel()
    shared_input = t * 64 * 4
    three_z = 3 * t * 4 * 4
    assert base.total_bytes - after.total_bytes == 2 * (shared_input - three_z)


def test_gradients_outside_wrapped_weights_are_exact(tokens):
    plain, wrapped = tiny_llama(), tiny_llama()
    names = apply_velora(wrapped, "down", num_groups=4)
    for model in (plain, wrapped):
        model(input_ids=tokens, labels=tokens).loss.backward()
    wrapped_params = {f"{n}.weight" for n in names}
    # Layers after the last wrapped layer, and all input grads, flow exactly; a weight whose
    # gradient depends on another wrapped layer's weight gradient does not exist (grad_input is
    # exact), so every non-wrapped parameter matches.
    for (name, p), q in zip(plain.named_parameters(), wrapped.parameters(), strict=True):
        if name in wrapped_params:
            assert not torch.allclose(p.grad, q.grad)
        else:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_same_gradients_with_non_reentrant_checkpointing(tokens):
    a, b = tiny_llama(), tiny_llama()
    apply_velora(a, "paper", num_groups=4)
    apply_velora(b, "paper", num_groups=4)
    b.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    b.train()
    for model in (a, b):
        model(input_ids=tokens, labels=tokens).loss.backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_peft_lora_wraps_adapter_a_projections(tokens):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    names = apply_velora(model, "paper", num_groups=4)
    assert names and all(n.endswith("lora_A.default") for n in names)
    assert all(".v_proj." in n or ".down_proj." in n for n in names)
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert all(model.get_submodule(n).weight.grad is not None for n in names)


def test_shared_input_note_says_which_compressions_free_nothing(llama):
    from velora_cli.methods.placement import select_layers, shared_input_note

    note = shared_input_note(llama, select_layers(llama, "paper"))
    assert (
        note
        == "v_proj's input is still saved by k_proj, q_proj: compressing it frees nothing there"
    )
    assert shared_input_note(llama, select_layers(llama, "qkv+down")) is None
    assert "gate_proj" in shared_input_note(llama, select_layers(llama, ["up_proj"]))


def test_applying_again_to_wrapped_layers_says_so(llama):
    apply_velora(llama, "paper", num_groups=4)
    for again in ("paper", "all-linear", ["*.mlp.down_proj"]):
        with pytest.raises(PlacementError, match=r"VeLoRA layers already .*remove_velora"):
            apply_velora(llama, again, num_groups=8)
    assert llama.model.layers[0].mlp.down_proj.sub_token_size == 128 // 4  # untouched
    assert apply_velora(llama, ["*.q_proj"], num_groups=8)[0].endswith("q_proj")  # not yet wrapped
    remove_velora(llama)
    assert len(apply_velora(llama, "paper", num_groups=8)) == 4  # re-applied on purpose


def test_applying_again_to_wrapped_lora_adapters_says_so():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["v_proj"]))
    apply_velora(model, "paper", num_groups=4)  # v_proj's adapters and the plain down_proj
    with pytest.raises(PlacementError, match=r"lora_A\.default, sub_token_size 16"):
        apply_velora(model, ["*.v_proj"], num_groups=4)


# ---- layers that train (issue 14) -----------------------------------------------------------


def _lora(model, targets):
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets))


def test_on_a_lora_model_only_the_adapters_are_wrapped(llama):
    # targets q and v: k_proj is frozen, has no adapter, and is left a plain linear
    model = _lora(llama, ["q_proj", "v_proj"])
    names = apply_velora(model, "qkv", num_groups=4)
    assert len(names) == 2 * 2 and all(n.endswith(("q_proj.lora_A.default",
                                                   "v_proj.lora_A.default")) for n in names)  # fmt: skip
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("k_proj"))


def test_a_placement_with_only_frozen_layers_says_so(llama):
    from velora_cli.methods.placement import FrozenPlacementError

    model = _lora(llama, ["q_proj", "v_proj"])
    with pytest.raises(FrozenPlacementError, match="'mlp' selects only layers that do not train"):
        apply_velora(model, "mlp", num_groups=4)
    with pytest.raises(FrozenPlacementError, match="6 frozen"):  # frozen by hand, no LoRA
        apply_velora(tiny_llama().requires_grad_(False), "mlp", num_groups=4)


def test_profile_reports_a_frozen_placement_as_an_error_row():
    from velora_cli.measure.train_step import StepSpec
    from velora_cli.profiling.profiler import plan_strategies, validate_strategies

    spec = StepSpec("llama-tiny", batch_size=2, seq_len=16, mode="lora",
                    lora_targets="q_proj,v_proj")  # fmt: skip
    strategies = plan_strategies(["qkv", "mlp"], num_groups=[4], velora_gc=False)
    invalid = validate_strategies(spec, strategies)
    assert {s.placement for s in invalid} == {"mlp"}
    assert "selects only layers that do not train" in next(iter(invalid.values()))


def test_gradient_probe_on_a_lora_subset_placement():
    # wrapping the frozen k_proj used to break the probe: it has no weight gradient
    from velora_cli.measure.train_step import StepSpec, Strategy
    from velora_cli.search import probes

    spec = StepSpec("llama-tiny", batch_size=2, seq_len=16, mode="lora",
                    lora_targets="q_proj,v_proj", strategy=Strategy("qkv", num_groups=4))  # fmt: skip
    result = probes.gradient_fidelity(spec)
    assert len(result["layers"]) == 4 and 0.0 < result["cosine_min"] <= 1.0


def test_candidates_of_a_lora_model_are_its_lora_layers_and_the_linears_that_train_outside():
    """`candidate_layers` skips the submodules of the LoRA layer met last only (named_modules
    walks depth first): the same layers as skipping whatever lies inside any LoRA layer, with
    trainable linears after and between LoRA layers (down_proj after up_proj, lm_head)."""
    from velora_cli.methods.placement import candidate_layers

    pytest.importorskip("peft")
    model = _lora(tiny_llama(), ["q_proj", "v_proj", "up_proj"])
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name.endswith(("mlp.down_proj", "lm_head")):
            module.weight.requires_grad_(True)
    lora = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    expected = [
        n
        for n, m in model.named_modules()
        if n in lora
        or (
            not any(n.startswith(p + ".") for p in lora)
            and type(m) is nn.Linear
            and m.weight.requires_grad
        )
    ]
    assert any(n.endswith("down_proj") for n in expected)
    assert list(candidate_layers(model)) == expected
