"""Exports build the head that was planned (issue 24 item 7): the Auto class of the task with its
num_labels, in the Trainer snippet and the torchrun script, and the collator of padded or packed
batches. The exported lines are run on tiny local models on the CPU."""

from __future__ import annotations

import ast

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    ViTConfig,
    ViTForImageClassification,
)

from velora_cli.configs import VeloraConfig, from_tune_document
from velora_cli.exports import NotExpressible, export
from velora_cli.exports.torchrun import DRY_BATCHES, to_script
from velora_cli.exports.trainer import trainer_snippet
from velora_cli.exports.trl import to_sft

MICRO, SEQ = 2, 16


def _roberta(**kw) -> RobertaConfig:
    return RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=SEQ + 2, **kw)  # fmt: skip


HEADS = {
    "sequence-classification": (RobertaForSequenceClassification, lambda: _roberta(num_labels=3)),
    "token-classification": (RobertaForTokenClassification, lambda: _roberta(num_labels=5)),
    "question-answering": (RobertaForQuestionAnswering, lambda: _roberta()),
    "image-classification": (
        ViTForImageClassification,
        lambda: ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=4,
        ),  # fmt: skip
    ),
}
AUTO = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "image-classification": "AutoModelForImageClassification",
}


def _saved(tmp_path, cls, config) -> str:
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path)
    return str(tmp_path)


def _snippet_model(snippet: str):
    """Run the snippet's transformers import and its ``model = ...`` line (what loads the model)."""
    lines = snippet.splitlines()
    imports = [line for line in lines if line.startswith("from transformers import")]
    load = next(line for line in lines if line.startswith("model = "))
    scope: dict = {"torch": torch}
    exec("\n".join([*imports, load]), scope)  # noqa: S102 - the exported code, run as a user would
    return scope["model"]


@pytest.mark.parametrize("task", list(HEADS))
def test_trainer_snippet_and_torchrun_script_build_the_planned_head(tmp_path, task):
    cls, make = HEADS[task]
    config_hf = make()
    model_dir = _saved(tmp_path, cls, config_hf)
    config = VeloraConfig(model=model_dir, micro_batch_size=MICRO, seq_len=SEQ)
    snippet = trainer_snippet(config)
    ast.parse(snippet)
    model = _snippet_model(snippet)
    assert type(model).__name__ == cls.__name__  # not the LM class
    assert model.config.num_labels == config_hf.num_labels
    if task != "question-answering":
        assert f"num_labels={config_hf.num_labels}" in snippet

    script = to_script(VeloraConfig(model=model_dir, micro_batch_size=MICRO, seq_len=SEQ,
                                    world_size=2, parallel="ddp"))  # fmt: skip
    ast.parse(script)
    assert f"from transformers import {AUTO[task]}" in script
    assert f"{AUTO[task]}.from_pretrained(" in script and DRY_BATCHES[task] in script
    # the script's dry-run batch trains this head: one step on the CPU
    scope = {"torch": torch, "device": torch.device("cpu"), "cfg": model.config,
             "MICRO_BATCH": MICRO, "SEQ_LEN": SEQ,
             "x": torch.randint(0, getattr(model.config, "vocab_size", 2), (MICRO, SEQ))}  # fmt: skip
    batch = eval(DRY_BATCHES[task], scope)  # noqa: S307 - the exported expression
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_trl_refuses_a_head_sfttrainer_does_not_train(tmp_path):
    cls, make = HEADS["sequence-classification"]
    config = VeloraConfig(model=_saved(tmp_path, cls, make()), trainer="trl", seq_len=SEQ)
    with pytest.raises(NotExpressible, match="is sequence-classification"):
        export("trl", config)


def _llama(tmp_path) -> str:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return _saved(tmp_path, LlamaForCausalLM, config)


def test_packed_batches_export_the_flattening_collator_velora_planned(tmp_path):
    """The snippet's collator gives what the plan stepped on (`train_step._packed_batch`): one
    row, position_ids restarting at each sequence, no attention mask; use_cache off so that
    transformers finds the packed sequences."""
    config = VeloraConfig(model=_llama(tmp_path), micro_batch_size=MICRO, seq_len=SEQ,
                          packing=True, attn_implementation="sdpa")  # fmt: skip
    snippet = trainer_snippet(config)
    ast.parse(snippet)
    assert "data_collator=collator" in snippet
    lines = snippet.splitlines()
    start = next(i for i, line in enumerate(lines) if "DataCollatorWithFlattening" in line)
    scope: dict = {"torch": torch, "model": _snippet_model(snippet)}
    exec("\n".join(lines[start : start + 3]), scope)  # noqa: S102
    assert scope["model"].config.use_cache is False
    batch = scope["collator"]([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert scope["model"](**batch).loss.isfinite()
    assert to_sft(config)["packing"] is True  # TRL: bfd packing, padding-free
    notes = export("trainer", config).notes
    assert any(n.startswith("packed batches") for n in notes)


def test_padded_batches_export_a_padding_collator(tmp_path):
    config = VeloraConfig(model=_llama(tmp_path), micro_batch_size=MICRO, seq_len=SEQ,
                          padding=True)  # fmt: skip
    snippet = trainer_snippet(config)
    ast.parse(snippet)
    assert "DataCollatorForLanguageModeling(tokenizer, mlm=False)" in snippet
    assert "data_collator=collator" in snippet
    assert to_sft(config)["packing"] is False
    plain = VeloraConfig(model=config.model, micro_batch_size=MICRO, seq_len=SEQ)
    assert "data_collator" not in trainer_snippet(plain)


def test_a_tune_document_carries_padding_and_packing():
    document = {
        "model": "org/llama",
        "settings": {"packing": True},
        "recommendation": {"mode": "full", "micro_batch_size": 2},
        "candidates": [],
    }
    assert from_tune_document(document).packing is True
    document["settings"] = {"padding": True}
    config = from_tune_document(document)
    assert (config.padding, config.packing) == (True, False)
    with pytest.raises(ValueError, match="padding and packing exclude each other"):
        VeloraConfig(model="m", padding=True, packing=True)
