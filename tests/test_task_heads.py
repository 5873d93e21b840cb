"""Task heads from `config.architectures` (issue 24 part 2): which head, its inputs and labels,
refusals, placements on ViT and RoBERTa, and the estimate against real CPU steps per head."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, RobertaConfig, ViTConfig

from velora_cli.estimate.backend import EstimateBackend
from velora_cli.measure.cpu import CpuBackend
from velora_cli.measure.train_step import StepSpec, Strategy, batch_shape, make_batch, prepare
from velora_cli.models import ModelError, resolve_model

LAYERS, HIDDEN, HEADS, SEQ, BATCH = 2, 32, 4, 32, 2


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def roberta(architecture: str, **extra) -> RobertaConfig:
    return RobertaConfig(
        architectures=[architecture],
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=SEQ + 2 + 8,  # RoBERTa offsets positions by pad_token_id + 1
        hidden_dropout_prob=0.0,  # dropout: CPU keeps noise, a GPU a bool mask (test_dropout.py)
        attention_probs_dropout_prob=0.0,
        **extra,
    )


def vit(**extra) -> ViTConfig:
    return ViTConfig(
        architectures=["ViTForImageClassification"],
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=64,
        image_size=32,
        patch_size=8,  # 16 patches + CLS = 17 tokens
        num_channels=3,
        num_labels=5,
        **extra,
    )


def llama(architecture: str) -> LlamaConfig:
    return LlamaConfig(
        architectures=[architecture],
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        vocab_size=100,
        num_labels=3,
    )


HEADS_BY_TASK = {
    "causal-lm": lambda: llama("LlamaForCausalLM"),
    "masked-lm": lambda: roberta("RobertaForMaskedLM"),
    "sequence-classification": lambda: roberta("RobertaForSequenceClassification", num_labels=3),
    "token-classification": lambda: roberta("RobertaForTokenClassification", num_labels=7),
    "question-answering": lambda: roberta("RobertaForQuestionAnswering"),
    "image-classification": vit,
}


def saved_dir(tmp_path, config) -> str:
    config.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("task", sorted(HEADS_BY_TASK))
def test_the_architecture_names_the_head(tmp_path, task):
    spec = resolve_model(saved_dir(tmp_path, HEADS_BY_TASK[task]()))
    assert spec.task == task
    model = prepare(StepSpec(model=spec.name, batch_size=BATCH, seq_len=SEQ), "meta").model
    expected = spec.config.architectures[0]
    assert type(model).__name__ == expected


def test_roberta_sequence_classification_is_not_profiled_as_masked_lm(tmp_path):
    """The issue's case: a RobertaForSequenceClassification config had a 50k-vocabulary LM head."""
    path = saved_dir(tmp_path, roberta("RobertaForSequenceClassification", num_labels=2))
    model = prepare(StepSpec(model=path, batch_size=BATCH, seq_len=SEQ), "meta").model
    assert not any("lm_head" in name for name, _ in model.named_modules())
    assert model.classifier.out_proj.out_features == 2


@pytest.mark.parametrize(
    "architecture",
    ["T5ForConditionalGeneration", "BertForPreTraining", "BertForNextSentencePrediction"],
)
def test_a_head_velora_cannot_build_is_refused_in_one_line(tmp_path, architecture):
    config = roberta(architecture)
    with pytest.raises(ModelError) as caught:
        resolve_model(saved_dir(tmp_path, config))
    message = str(caught.value)
    assert "\n" not in message and architecture in message and "--task" in message


def test_task_chooses_another_head_of_the_same_config():
    spec = resolve_model("roberta-base", task="sequence-classification")
    assert spec.task == "sequence-classification"
    assert resolve_model("roberta-base").task == "masked-lm"
    with pytest.raises(ModelError, match="--task 'summarization': choose"):
        resolve_model("roberta-base", task="summarization")
    with pytest.raises(ModelError, match="no image-classification head"):
        prepare(StepSpec(model="llama-tiny", task="image-classification"), "meta")


def test_cli_refuses_an_unknown_head_with_exit_1(tmp_path):
    from typer.testing import CliRunner

    from velora_cli.cli import app

    path = saved_dir(tmp_path, roberta("RobertaForPreTraining"))
    result = CliRunner().invoke(app, ["profile", path, "--backend", "estimate"])
    assert result.exit_code == 1
    assert "velora builds no such head" in result.output and "Traceback" not in result.output


# -- inputs and labels ----------------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(HEADS_BY_TASK))
def test_batches_hold_the_labels_of_each_loss(tmp_path, task):
    """The inputs each HF head's forward takes its loss from (modeling_roberta / modeling_vit)."""
    model_spec = resolve_model(saved_dir(tmp_path, HEADS_BY_TASK[task]()))
    inputs = batch_shape(model_spec)
    spec = StepSpec(model=model_spec.name, batch_size=BATCH, seq_len=SEQ)
    (batch,) = make_batch(spec, 100, "cpu", inputs)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in batch.items()}
    ids, labels = (BATCH, SEQ), torch.long
    expected = {
        "causal-lm": {"input_ids": (ids, labels), "attention_mask": (ids, labels),
                      "labels": (ids, labels)},
        "masked-lm": {"input_ids": (ids, labels), "attention_mask": (ids, labels),
                      "labels": (ids, labels)},
        "sequence-classification": {"input_ids": (ids, labels), "attention_mask": (ids, labels),
                                    "labels": ((BATCH,), labels)},
        "token-classification": {"input_ids": (ids, labels), "attention_mask": (ids, labels),
                                 "labels": (ids, labels)},
        "question-answering": {"input_ids": (ids, labels), "attention_mask": (ids, labels),
                               "start_positions": ((BATCH,), labels),
                               "end_positions": ((BATCH,), labels)},
        "image-classification": {"pixel_values": ((BATCH, 3, 32, 32), torch.float32),
                                 "labels": ((BATCH,), labels)},
    }[task]  # fmt: skip
    assert shapes == expected
    if "labels" in batch and task.endswith("classification"):
        assert int(batch["labels"].max()) < inputs.labels  # valid classes
    if task == "image-classification":
        assert inputs.tokens(SEQ) == 16 + 1  # (32 / 8)^2 patches + CLS


def test_vit_base_builtin_tokens_are_patches():
    from velora_cli.measure.train_step import for_task

    spec, note = for_task(StepSpec(model="vit-base", seq_len=256), resolve_model("vit-base"))
    assert spec.seq_len == 197 and "196 patches + CLS = 197 tokens" in note
    unchanged, none = for_task(StepSpec(model="llama-tiny"), resolve_model("llama-tiny"))
    assert unchanged.seq_len == 256 and none is None


# -- placements (the paper's ViT and RoBERTa runs) --------------------------------------------------


@pytest.mark.parametrize(
    ("config", "paper"),
    [
        (vit, {"attention.v_proj", "mlp.fc2"}),  # transformers 5 names ViT's value and fc2
        (
            lambda: roberta("RobertaForSequenceClassification"),
            {"attention.self.value", "output.dense"},
        ),
    ],
    ids=["vit", "roberta-cls"],
)
def test_paper_placement_resolves_on_vit_and_roberta(tmp_path, config, paper):
    """Paper §5.4: value projection and the MLP's down projection (RoBERTa's `output.dense`, ViT's
    `mlp.fc2`); the attention output and the classifier are not selected."""
    spec = StepSpec(model=saved_dir(tmp_path, config()), batch_size=BATCH, seq_len=SEQ)
    wrapped = prepare(spec.with_strategy(Strategy("paper", num_groups=4)), "meta").wrapped
    assert len(wrapped) == 2 * LAYERS
    # what follows the block index: roberta.encoder.layer.0.<suffix>, vit.layers.0.<suffix>
    suffixes = {name.split(".0.", 1)[-1].split(".1.", 1)[-1] for name in wrapped}
    assert suffixes == paper, wrapped
    assert not any("classifier" in name or "attention.output" in name for name in wrapped)


# -- the estimate against real CPU steps ------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(HEADS_BY_TASK))
def test_estimate_equals_cpu_tracker_per_head(tmp_path, task):
    """Eager attention runs the same ops on CPU and meta, no dropout: every head's saved
    activations (its loss included) must agree exactly between the estimate and a real step."""
    spec = StepSpec(
        model=saved_dir(tmp_path, HEADS_BY_TASK[task]()),
        batch_size=BATCH,
        seq_len=SEQ,
        attn="eager",
    )
    cpu = CpuBackend(warmup=0, steps=1).measure(spec)
    estimate = EstimateBackend().measure(spec)
    assert cpu["status"] == estimate["status"] == "ok"
    assert estimate["activation_bytes"] == cpu["activation_bytes"]


def test_document_records_the_task_and_the_title_shows_it(tmp_path):
    from velora_cli.profiling.profiler import run_profile
    from velora_cli.report.profile import profile_table

    path = saved_dir(tmp_path, roberta("RobertaForSequenceClassification", num_labels=2))
    spec = StepSpec(model=path, batch_size=BATCH, seq_len=SEQ)
    document = run_profile(spec, [Strategy()], EstimateBackend(trace_fields=False))
    assert document["task"] == "sequence-classification"
    assert "· sequence-classification ·" in profile_table(document).title


@pytest.mark.parametrize("task", ["sequence-classification", "image-classification"])
def test_lora_trains_the_new_head_whole(tmp_path, task):
    """PEFT's task types (SEQ_CLS: modules_to_save "classifier"/"score") and its ViT recipe train
    the new head fully next to the adapters; the head gets no adapter of its own."""
    spec = StepSpec(
        model=saved_dir(tmp_path, HEADS_BY_TASK[task]()), batch_size=BATCH, seq_len=SEQ, mode="lora"
    )
    model = prepare(spec, "meta").model
    trained = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert trained and all(".classifier.modules_to_save." in n for n in trained), trained
    assert not any("classifier" in n and "lora_" in n for n, _ in model.named_parameters())


def test_tune_settings_carry_task_attention_and_padding():
    """Into every candidate's step, and into the journal's context only when set (journals
    written before these options existed stay resumable)."""
    from velora_cli.search.settings import TuneSettings

    plain = TuneSettings(model="roberta-base", budget_bytes=10**9, backend="estimate")
    assert not {"task", "attn", "padding"} & set(plain.context())
    chosen = TuneSettings(
        model="roberta-base",
        budget_bytes=10**9,
        backend="estimate",
        task="sequence-classification",
        attn="eager",
        padding=True,
    )
    spec = chosen.base_spec()
    assert (spec.task, spec.attn, spec.padding) == ("sequence-classification", "eager", True)
    assert {k: chosen.context()[k] for k in ("task", "attn", "padding")} == {
        "task": "sequence-classification",
        "attn": "eager",
        "padding": True,
    }
