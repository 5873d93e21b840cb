"""The published measurements: one `Case` per record of ``validation/published/*.json``.

No torch. Figures stay as the corpus gives them (bytes, seconds); the one figure derived here is
``tokens_per_second`` from ``step_seconds`` where a source timed its step but did not state a
throughput (tokens of one optimizer step / seconds per step), and the case says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# validation/published/ at the repository root (the package sits in velora_cli/validation/)
DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "validation" / "published"

TIERS = ("allocated_bytes", "reserved_bytes", "device_bytes", "tokens_per_second")


def default_corpus() -> Path:
    """The repository's corpus: beside the package in a checkout (or an editable install), else
    ``validation/published`` under the working directory (a wheel does not carry the data)."""
    if DEFAULT_CORPUS.is_dir():
        return DEFAULT_CORPUS
    return Path.cwd() / "validation" / "published"


class CorpusError(ValueError):
    """A corpus that cannot be read, or a selection that matches nothing (one line)."""


@dataclass(frozen=True)
class Case:
    """One published run: its setup and what was measured, in the corpus's own terms."""

    id: str
    source: str  # the corpus file's stem, e.g. "fitcheck_t4"
    gpu: str
    cuda_version: str | None
    setup: Mapping[str, Any]
    measured: Mapping[str, Any]  # the tiers compared (TIERS keys present in the record)
    record: Mapping[str, Any] = field(repr=False)  # the whole record
    derived: tuple[str, ...] = ()  # measured keys derived here, not stated by the source

    @property
    def outcome(self) -> str | None:
        return self.record.get("outcome")


def measured_tiers(record: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The compared figures of a record, and which of them were derived here."""
    measured = record.get("measured") or {}
    out = {k: measured[k] for k in TIERS if measured.get(k) is not None}
    derived: tuple[str, ...] = ()
    setup = record.get("setup") or {}
    seconds = measured.get("step_seconds")
    if (
        "tokens_per_second" not in out
        and seconds
        and setup.get("batch_size")
        and setup.get("seq_len")
    ):
        tokens = setup["batch_size"] * (setup.get("grad_accum") or 1) * setup["seq_len"]
        out["tokens_per_second"] = tokens / seconds
        derived = ("tokens_per_second",)
    return out, derived


def load_cases(
    directory: str | Path | None = None,
    *,
    ids: Iterable[str] = (),
    sources: Iterable[str] = (),
) -> list[Case]:
    """Every record of every corpus file, in file order, optionally selected.

    Args:
        directory: the folder of ``*.json`` corpus files (default: the repository's).
        ids: keep the cases whose id equals one of these or contains it (a fitcheck ``row_id``
            selects its case); empty: all.
        sources: keep the cases of these corpus files (stem, e.g. ``fitcheck_t4``, or a prefix
            such as ``fitcheck``); empty: all.

    Raises:
        CorpusError: no folder or files, an unreadable file, or a selection that matches nothing.
    """
    folder = Path(directory) if directory is not None else default_corpus()
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise CorpusError(f"no corpus files (*.json) in {folder}")
    ids, sources = list(ids), list(sources)
    cases: list[Case] = []
    for path in files:
        if sources and not any(path.stem == s or path.stem.startswith(s) for s in sources):
            continue
        try:
            data = json.loads(path.read_text())
            records = data["records"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CorpusError(f"cannot read corpus file {path}: {exc}") from None
        for record in records:
            if ids and not any(i == record["id"] or i in record["id"] for i in ids):
                continue
            measured, derived = measured_tiers(record)
            cases.append(
                Case(
                    id=record["id"],
                    source=path.stem,
                    gpu=record.get("gpu", ""),
                    cuda_version=record.get("cuda_version"),
                    setup=record.get("setup") or {},
                    measured=measured,
                    record=record,
                    derived=derived,
                )
            )
    if not cases:
        known = ", ".join(p.stem for p in files)
        what = f"--case {' '.join(ids)}" if ids else ""
        what += f" --source {' '.join(sources)}" if sources else ""
        raise CorpusError(f"no case matches{what or ''} (sources: {known})")
    return cases


def repeat_groups(cases: Iterable[Case]) -> dict[str, tuple[str, ...]]:
    """Runs of one setup that a source repeated: case id -> the ids of its group, in corpus order.

    Two records are repeats when they come from the same corpus file, GPU and CUDA version and
    give the same ``setup`` and the same ``versions``, and both timed the step (a
    ``tokens_per_second`` figure). Rows of one setup from sessions with other library versions
    are not repeats (fitcheck's 2026-09-15 session ran torch 2.14 / transformers 5.17, its
    2026-09-16 session torch 2.10 / transformers 5.0). Cases in no group of two or more are left
    out.
    """
    groups: dict[str, list[str]] = {}
    for case in cases:
        if not case.measured.get("tokens_per_second"):
            continue
        key = json.dumps(
            [case.source, case.gpu, case.cuda_version, case.setup,
             case.record.get("versions")],
            sort_keys=True, default=str,
        )  # fmt: skip
        groups.setdefault(key, []).append(case.id)
    return {i: tuple(ids) for ids in groups.values() if len(ids) > 1 for i in ids}
