"""Probe text: sources and their errors, tokenization, batches."""

import dataclasses
import json
import sys
import types

import pytest
import torch

from velora_cli.models import resolve_model
from velora_cli.search.data import (
    BYTE_LEVEL,
    DataError,
    load_texts,
    split_batches,
    tokenize,
)

# -- sources ------------------------------------------------------------------------------------


def test_default_text_is_pydoc_topics_sorted_and_offline():
    from pydoc_data.topics import topics

    docs, desc = load_texts(None)
    assert len(docs) == len(topics)
    assert docs[0] == topics[sorted(topics)[0]].strip()
    assert desc.startswith("pydoc_data.topics") and "documents" in desc
    assert load_texts(None) == (docs, desc)  # deterministic


def test_max_chars_stops_early():
    docs, _ = load_texts(None, max_chars=1000)
    assert sum(map(len, docs)) >= 1000
    assert sum(map(len, docs[:-1])) < 1000


def test_plain_text_paragraphs(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first paragraph\nstill first\n\n\nsecond\n\n  \n")
    docs, desc = load_texts(str(path))
    assert docs == ["first paragraph\nstill first", "second"]
    assert str(path) in desc and "plain text" in desc


def test_empty_text_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n  \n")
    with pytest.raises(DataError, match=r"empty\.txt: the file is empty"):
        load_texts(str(path))


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8"):
        load_texts(str(path))


def test_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": "one", "id": 1}), "", json.dumps({"text": "two"})]
    path.write_text("\n".join(lines) + "\n")
    docs, desc = load_texts(str(path))
    assert docs == ["one", "two"]
    assert "JSONL" in desc


def test_jsonl_corrupt_line_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_texts(str(path))


def test_jsonl_without_text_named(tmp_path):
    path = tmp_path / "notext.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "x", "id": 3}\n')
    with pytest.raises(
        DataError, match=r"notext\.jsonl:2: no string 'text' field \(keys: body, id\)"
    ):
        load_texts(str(path))
    path.write_text('["a", "list"]\n')
    with pytest.raises(DataError, match=r"notext\.jsonl:1: .*a JSON list"):
        load_texts(str(path))


def test_jsonl_all_empty(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text('{"text": ""}\n\n')
    with pytest.raises(DataError, match=r"blank\.jsonl: no text"):
        load_texts(str(path))


@pytest.mark.parametrize("name", ["missing.txt", "./nope", "/no/such/file.jsonl", "a/b/c"])
def test_missing_file(name):
    with pytest.raises(DataError, match="no such file"):
        load_texts(name)


def test_directory(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        load_texts(str(tmp_path))


def test_dataset_name_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError) as err:
        load_texts("wikitext")
    message = str(err.value)
    assert "Hugging Face dataset name" in message and "--data PATH" in message
    assert "\n" not in message


class _FakeDataset:
    def __init__(self, rows):
        self.rows = rows
        self.column_names = list(rows[0]) if rows else []

    def select_columns(self, columns):
        return [{c: row[c] for c in columns} for row in self.rows]


def _fake_datasets(monkeypatch, load):
    module = types.ModuleType("datasets")
    module.load_dataset = load
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_dataset_load_failure_says_what_was_tried(monkeypatch):
    def load(name, config, split):
        raise ConnectionError("offline mode is enabled\nmore detail")

    _fake_datasets(monkeypatch, load)
    with pytest.raises(DataError) as err:
        load_texts("owner/corpus:en")
    message = str(err.value)
    assert "load_dataset('owner/corpus', 'en', split='train')" in message
    assert "offline mode is enabled" in message and "--data PATH" in message
    assert "\n" not in message


def test_dataset_text_column(monkeypatch):
    calls = []

    def load(name, config, split):
        calls.append((name, config, split))
        return _FakeDataset(
            [{"text": "alpha", "n": 1}, {"text": " ", "n": 2}, {"text": "b", "n": 3}]
        )

    _fake_datasets(monkeypatch, load)
    docs, desc = load_texts("corpus")
    assert calls == [("corpus", None, "train")]
    assert docs == ["alpha", "b"]
    assert "Hugging Face dataset" in desc


def test_dataset_without_text_column(monkeypatch):
    _fake_datasets(monkeypatch, lambda name, config, split: _FakeDataset([{"body": "x"}]))
    with pytest.raises(DataError, match=r"no 'text' column \(columns: body\)"):
        load_texts("corpus")


# -- tokenization -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_spec():
    return resolve_model("llama-tiny")


def test_byte_level(tiny_spec):
    ids, desc = tokenize(["héllo", "ab"], tiny_spec, vocab_size=1024)
    assert desc == BYTE_LEVEL
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == list("héllo\n\nab".encode())
    short, _ = tokenize(["héllo", "ab"], tiny_spec, vocab_size=1024, max_tokens=3)
    assert short.tolist() == ids[:3].tolist()


def test_byte_level_needs_256_ids(tiny_spec):
    with pytest.raises(DataError, match="at least 256"):
        tokenize(["x"], tiny_spec, vocab_size=128)


@pytest.fixture
def word_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3, "big": 900}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>"
    ).save_pretrained(tmp_path)
    return str(tmp_path)


def test_model_tokenizer(tiny_spec, word_tokenizer):
    spec = dataclasses.replace(tiny_spec, tokenizer_path=word_tokenizer)
    ids, desc = tokenize(["hello world", "world zzz"], spec, vocab_size=1024)
    assert ids.tolist() == [2, 3, 1, 3, 0]  # documents separated by EOS; unknown -> [UNK]
    assert word_tokenizer in desc and "byte-level" not in desc


def test_tokenizer_ids_must_fit_vocab(tiny_spec, word_tokenizer):
    spec = dataclasses.replace(tiny_spec, tokenizer_path=word_tokenizer)
    with pytest.raises(DataError, match="produced id 900, outside"):
        tokenize(["big"], spec, vocab_size=512)


def test_unloadable_tokenizer_falls_back_to_bytes(tiny_spec, tmp_path):
    spec = dataclasses.replace(tiny_spec, tokenizer_path=str(tmp_path / "nothing"))
    ids, desc = tokenize(["ab"], spec, vocab_size=1024)
    assert ids.tolist() == [97, 98]
    assert desc.startswith("byte-level") and "could not be loaded locally" in desc


# -- batches ------------------------------------------------------------------------------------


def test_split_batches_shapes_order_and_held_out_at_end():
    ids = torch.arange(100)
    train, held_out = split_batches(
        ids, batch_size=2, seq_len=5, n_train_batches=3, n_eval_batches=2
    )
    assert [b.shape for b in train + held_out] == [(2, 5)] * 5
    assert torch.cat([b.flatten() for b in train]).tolist() == list(range(30))
    assert torch.cat([b.flatten() for b in held_out]).tolist() == list(range(80, 100))
    # held-out batches do not depend on how many training batches were asked for
    _, again = split_batches(ids, 2, 5, n_train_batches=1, n_eval_batches=2)
    assert all(torch.equal(a, b) for a, b in zip(held_out, again, strict=True))


def test_split_batches_too_short_says_needed_and_available():
    with pytest.raises(DataError, match=r"need 60 tokens, the text gives 50"):
        split_batches(
            torch.arange(50), batch_size=2, seq_len=5, n_train_batches=4, n_eval_batches=2
        )


def test_split_batches_rejects_nonsense_sizes():
    with pytest.raises(DataError, match="must be positive"):
        split_batches(
            torch.arange(50), batch_size=0, seq_len=5, n_train_batches=1, n_eval_batches=1
        )
