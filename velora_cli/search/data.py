"""Probe text: where it comes from, how it becomes token ids, and how it is cut into batches.

The accuracy probes (``probes.py``) train on real text so that their loss means something. The
text comes from ``--data``: a plain-text file, a JSONL file with a ``text`` field per line, or a
Hugging Face dataset name; with none, from English text that ships with Python itself
(``pydoc_data.topics``: the help pages of the language reference, ≈465 KB), so the probe works
offline and needs no download.

Every step is deterministic: documents in a fixed order, one token stream, batches cut from it
in order. torch and transformers are imported inside functions (``velora --help`` stays instant).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from velora_cli.models import ModelSpec

DEFAULT_SOURCE = "pydoc_data.topics"
BYTE_VOCAB = 256  # byte-level tokenization: token ids are the UTF-8 bytes 0..255
BYTE_LEVEL = "byte-level (UTF-8 bytes as token ids): built-in architectures ship no tokenizer"
_DOC_SEPARATOR = "\n\n"  # between documents in the byte stream
_PATH_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".json")


class DataError(ValueError):
    """Probe data that cannot be read or is too short; the message says what to do."""


# -- sources ------------------------------------------------------------------------------------


def load_texts(data: str | None, *, max_chars: int | None = None) -> tuple[list[str], str]:
    """The documents of a probe data source, in a fixed order.

    Args:
        data: None for the embedded default (``pydoc_data.topics``, one document per topic,
            sorted by topic name); a path to a ``.jsonl`` file (one JSON object with a string
            ``text`` field per line); a path to any other file, read as UTF-8 plain text with
            one document per paragraph (blank-line separated); anything else is a Hugging Face
            dataset name, ``NAME`` or ``NAME:CONFIG``, loaded with ``datasets.load_dataset(...,
            split="train")`` and read from its ``text`` column.
        max_chars: stop collecting documents once this many characters are gathered (the
            probes need a few thousand tokens; this keeps a large dataset from being read whole).
            None reads everything.

    Returns:
        ``(documents, description)``: non-empty strings, and one line naming the source and its
        size, e.g. ``"pydoc_data.topics (Python's bundled help text): 79 documents, 464,970
        characters"``.

    Raises:
        DataError: a path that does not exist, an empty or unreadable file, a JSONL line that is
            not valid JSON or has no string ``text`` field (the message names file and line),
            or a dataset name that cannot be loaded (``datasets`` not installed, offline, no
            ``text`` column).
    """
    if data is None:
        return _default_texts(max_chars)
    path = Path(data).expanduser()
    if path.is_dir():
        raise DataError(f"--data {data} is a directory; pass a .txt or .jsonl file")
    if path.is_file():
        if path.suffix.lower() == ".jsonl":
            docs = _jsonl_texts(path, max_chars)
            kind = "JSONL"
        else:
            docs = _plain_texts(path, max_chars)
            kind = "plain text"
        return docs, f"{path} ({kind}): {_size(docs)}"
    if _looks_like_path(data):
        raise DataError(
            f"--data {data}: no such file; pass an existing .txt or .jsonl file, a Hugging Face "
            "dataset name, or leave --data out for the built-in English text"
        )
    return _dataset_texts(data, max_chars)


def _default_texts(max_chars: int | None) -> tuple[list[str], str]:
    from pydoc_data.topics import topics

    docs = _take([topics[key].strip() for key in sorted(topics)], max_chars)
    return docs, f"{DEFAULT_SOURCE} (Python's bundled help text, offline default): {_size(docs)}"


def _plain_texts(path: Path, max_chars: int | None) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    docs = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"{path}: the file is empty; pass a file with some text")
    return _take(docs, max_chars)


def _jsonl_texts(path: Path, max_chars: int | None) -> list[str]:
    docs: list[str] = []
    total = 0
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    found = (
                        f"keys: {', '.join(map(str, record))}"
                        if isinstance(record, dict)
                        else f"a JSON {type(record).__name__}"
                    )
                    raise DataError(
                        f"{path}:{number}: no string 'text' field ({found}); each line must be "
                        'an object like {"text": "..."}'
                    )
                if text.strip():
                    docs.append(text.strip())
                    total += len(docs[-1])
                if max_chars is not None and total >= max_chars:
                    break
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not docs:
        raise DataError(f'{path}: no text in the file; each line must be {{"text": "..."}}')
    return docs


def _dataset_texts(name: str, max_chars: int | None) -> tuple[list[str], str]:
    dataset, _, config = name.partition(":")
    todo = "pass --data PATH to a .txt or .jsonl file, or leave --data out for the built-in text"
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"--data {name} is not a file, so it was taken as a Hugging Face dataset name, but "
            f"the `datasets` package is not installed; pip install datasets, or {todo}"
        ) from None
    try:
        loaded = datasets.load_dataset(dataset, config or None, split="train")
    except Exception as exc:  # offline, not found, gated, a config is needed, ...
        lines = str(exc).strip().splitlines()
        reason = (lines[0] if lines else type(exc).__name__)[:200]
        raise DataError(
            f"--data {name}: tried datasets.load_dataset({dataset!r}"
            f"{f', {config!r}' if config else ''}, split='train') and it failed ({reason}); "
            f"{todo}"
        ) from None
    if "text" not in loaded.column_names:
        raise DataError(
            f"--data {name}: the dataset has no 'text' column (columns: "
            f"{', '.join(loaded.column_names)}); {todo}"
        )
    docs: list[str] = []
    total = 0
    for row in loaded.select_columns(["text"]):
        text = row["text"]
        if isinstance(text, str) and text.strip():
            docs.append(text.strip())
            total += len(docs[-1])
            if max_chars is not None and total >= max_chars:
                break
    if not docs:
        raise DataError(f"--data {name}: the dataset's 'text' column is empty; {todo}")
    label = f"{dataset} ({config})" if config else dataset
    return docs, f"{label} (Hugging Face dataset, train split): {_size(docs)}"


def _looks_like_path(data: str) -> bool:
    return (
        data.lower().endswith(_PATH_SUFFIXES)
        or data.startswith(("/", "./", "../", "~", ".\\"))
        or data.count("/") > 1
    )


def _take(docs: list[str], max_chars: int | None) -> list[str]:
    if max_chars is None:
        return docs
    kept, total = [], 0
    for doc in docs:
        kept.append(doc)
        total += len(doc)
        if total >= max_chars:
            break
    return kept


def _size(docs: list[str]) -> str:
    return f"{len(docs):,} documents, {sum(map(len, docs)):,} characters"


# -- tokenization -------------------------------------------------------------------------------


def tokenize(
    texts: list[str],
    model_spec: ModelSpec,
    vocab_size: int,
    *,
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, str]:
    """One stream of token ids for ``texts``, in order.

    With a tokenizer (``model_spec.tokenizer_path``, loaded with ``local_files_only=True``) each
    document is tokenized without special tokens and documents are separated by the EOS token
    when the tokenizer has one. Built-in architectures ship no tokenizer: their stream is the
    UTF-8 bytes of the documents joined by blank lines, each byte a token id (0..255). A
    tokenizer that cannot be loaded locally falls back to bytes, and the description says why.

    Args:
        texts: documents, e.g. from :func:`load_texts`.
        model_spec: the resolved model (:func:`velora_cli.models.resolve_model`).
        vocab_size: the model's vocabulary size; every id must be below it.
        max_tokens: stop once the stream has at least this many tokens (None: all of it).

    Returns:
        ``(ids, description)``: a 1-D ``torch.long`` tensor, and one line naming the
        tokenization, e.g. ``"byte-level (UTF-8 bytes as token ids): built-in architectures
        ship no tokenizer"``.

    Raises:
        DataError: byte-level tokenization for a model whose vocabulary has fewer than 256
            entries, or a tokenizer whose ids do not fit the model's vocabulary.
    """
    import torch

    tokenizer, reason = _local_tokenizer(model_spec, "token ids")
    if tokenizer is not None:
        return _tokenizer_ids(texts, tokenizer, model_spec, vocab_size, max_tokens)
    if vocab_size < BYTE_VOCAB:
        raise DataError(
            f"byte-level tokenization needs a vocabulary of at least {BYTE_VOCAB} ids, but "
            f"{model_spec.name} has {vocab_size}; use a model with a tokenizer or a larger vocab"
        )
    stream = _DOC_SEPARATOR.join(texts).encode("utf-8")
    if max_tokens is not None:
        stream = stream[:max_tokens]
    ids = torch.frombuffer(bytearray(stream), dtype=torch.uint8).long()  # (N,)
    return ids, reason


def _local_tokenizer(model_spec: ModelSpec, units: str) -> tuple[Any, str]:
    """The model's tokenizer if it loads from local files, else None and why bytes stand in
    (``units``: what the bytes are used as, in the description); `BYTE_LEVEL` without one."""
    if model_spec.tokenizer_path is None:
        return None, BYTE_LEVEL
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_spec.tokenizer_path, local_files_only=True), ""
    except Exception as exc:  # missing files, no sentencepiece, ...
        lines = str(exc).strip().splitlines()
        why = (lines[0] if lines else type(exc).__name__)[:160]
        return None, (
            f"byte-level (UTF-8 bytes as {units}): the tokenizer of "
            f"{model_spec.tokenizer_path} could not be loaded locally ({why})"
        )


def _tokenizer_ids(texts, tokenizer, model_spec, vocab_size, max_tokens):
    import torch

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in texts:
        if ids and eos is not None:
            ids.append(eos)
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            del ids[max_tokens:]
            break
    top = max(ids, default=0)
    if top >= vocab_size:
        raise DataError(
            f"the tokenizer of {model_spec.tokenizer_path} produced id {top}, outside "
            f"{model_spec.name}'s vocabulary of {vocab_size}; check that they belong together"
        )
    name = type(tokenizer).__name__
    return torch.tensor(ids, dtype=torch.long), f"{name} from {model_spec.tokenizer_path}"


def token_lengths(
    texts: list[str], model_spec: ModelSpec, max_length: int
) -> tuple[list[int], str]:
    """The token length of each document, as a collator gets them (``--padding``/``--packing``
    with ``--data``): one sequence per document (a JSONL line's ``text``, a paragraph of a text
    file, a dataset row), tokenized as ``tokenizer(text, truncation=True, max_length=...)`` does,
    with the tokenizer's special tokens.

    With no tokenizer that loads offline (built-in architectures ship none), a document's length
    is its UTF-8 bytes, truncated the same way, and the description says so: byte counts run
    about 4 times a subword tokenizer's on English text, so such a plan is for longer sequences
    than the real tokenizer gives (the safe side).

    Returns:
        ``(lengths, description)``: one length >= 1 per non-empty document.
    """
    tokenizer, reason = _local_tokenizer(model_spec, "tokens")
    if tokenizer is not None:
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        name = type(tokenizer).__name__
        return [len(x) for x in ids if x], f"{name} from {model_spec.tokenizer_path}"
    lengths = [min(max_length, len(t.encode("utf-8"))) for t in texts]
    return [n for n in lengths if n], reason


# -- batches ------------------------------------------------------------------------------------


def split_batches(
    ids: torch.Tensor,
    batch_size: int,
    seq_len: int,
    n_train_batches: int,
    n_eval_batches: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Cut a token stream into training batches and held-out evaluation batches.

    Training batches are consecutive windows from the start of the stream, in order; held-out
    batches are taken from its end, so the two never overlap and neither depends on how many of
    the other were asked for.

    Args:
        ids: a 1-D token stream (from :func:`tokenize`).
        batch_size: sequences per batch.
        seq_len: tokens per sequence.
        n_train_batches: how many training batches (one per optimizer step).
        n_eval_batches: how many held-out batches.

    Returns:
        ``(train, held_out)``: lists of ``(batch_size, seq_len)`` long tensors.

    Raises:
        DataError: the stream is shorter than the request (the message gives both numbers), or a
            size is not positive.
    """
    if batch_size < 1 or seq_len < 1 or n_train_batches < 0 or n_eval_batches < 0:
        raise DataError(
            f"batch size {batch_size}, sequence length {seq_len}, {n_train_batches} training and "
            f"{n_eval_batches} held-out batches: sizes must be positive"
        )
    per_batch = batch_size * seq_len
    needed = per_batch * (n_train_batches + n_eval_batches)
    if ids.numel() < needed:
        raise DataError(
            f"the probe text is too short: {n_train_batches} training + {n_eval_batches} held-out "
            f"batches of {batch_size}×{seq_len} tokens need {needed:,} tokens, the text gives "
            f"{ids.numel():,}; pass more text with --data, or fewer/smaller probe batches"
        )
    train = ids[: per_batch * n_train_batches].reshape(n_train_batches, batch_size, seq_len)
    held_out = ids[ids.numel() - per_batch * n_eval_batches :].reshape(
        n_eval_batches, batch_size, seq_len
    )
    return [b.clone() for b in train], [b.clone() for b in held_out]
