"""The tune journal: finished results as JSON lines, durable as they arrive.

Each record is written whole, flushed and fsynced, so Ctrl-C, a crash or an out-of-memory kill
loses nothing already finished, and ``velora tune --resume`` redoes only what is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

try:  # POSIX: a running tune holds a lock on its journal, so a resume never takes it over
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock, names are still unique
    fcntl = None


class Journal:
    """Append-only JSONL log of a tune's finished calls, so an interrupted tune can resume.

    One record per line: ``{"v": 1, "stage": "estimate"|"measure"|"probe"|"verify", "key": ...,
    "result": {...}}``, written whole, flushed and fsynced. Keys are `Candidate.key`, except probe
    records, keyed by the candidate with gc off (checkpointing does not change the maths). Only
    results the functions returned are recorded; calls that raised are retried on resume. The first
    line is a header carrying the caller's `context` (model, backend, budget… for the CLI to compare
    before resuming: the journal does not know what a key was measured on).

    Example:
        >>> j = Journal(tmp / "tune.jsonl", context={"model": "llama-60m"})  # doctest: +SKIP
        >>> tune(cands, ..., journal=j)  # Ctrl-C
        >>> tune(cands, ..., journal=Journal.load(tmp / "tune.jsonl"))  # redoes only unfinished
    """

    VERSION = 1

    def __init__(self, path: str | os.PathLike, *, context: dict | None = None) -> None:
        """Start a new journal at `path`, replacing any file there."""
        self.path = Path(path)
        self.context = context
        self.skipped: list[int] = []
        self._records: dict[tuple[str, str], dict] = {}
        self._lock_fd: int | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self._append({"v": self.VERSION, "stage": "header", "context": context})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Journal:
        """Reopen an existing journal, keeping its finished records; new records append to it.

        A truncated last line (crash mid-write) is ignored and cut from the file. A complete line
        in the middle that is not a journal record (hand-edited, disk trouble) is skipped, its
        number kept in ``skipped``; the records around it are kept.

        Raises:
            FileNotFoundError: no journal at `path`.
        """
        journal = cls.__new__(cls)
        journal.path, journal.context, journal._records = Path(path), None, {}
        journal.skipped, journal._lock_fd = [], None
        data = journal.path.read_bytes()
        complete, _, tail = data.rpartition(b"\n")
        lines = complete.split(b"\n") if complete else []
        tail_record = _parse_line(tail)
        if tail_record is not None:  # whole record that only lost its newline
            lines.append(tail)
            with open(journal.path, "ab") as f:
                f.write(b"\n")
        elif tail.strip():
            os.truncate(journal.path, len(data) - len(tail))
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = _parse_line(line)
            if record is None:
                journal.skipped.append(number)
            elif record["stage"] == "header":
                journal.context = record.get("context")
            else:
                journal._records[(record["stage"], record["key"])] = record["result"]
        return journal

    @staticmethod
    def read_context(path: str | os.PathLike) -> dict | None:
        """The header's context of the journal at `path` without reading its records; None when
        the file is empty or its first line is not a header."""
        with open(path, "rb") as f:
            record = _parse_line(f.readline())
        if record is None or record["stage"] != "header":
            return None
        return record.get("context")

    def claim(self) -> bool:
        """Lock the journal for this process (until `release` or exit), so that no other
        ``velora tune --resume`` takes it over while this run writes it.

        Returns:
            False when another process holds it (a tune still running); True otherwise (also
            where the platform has no locks).
        """
        if fcntl is None or self._lock_fd is not None:
            return True
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def release(self) -> None:
        """Give up the lock taken by `claim` (a no-op without one)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops its flock
            self._lock_fd = None

    @staticmethod
    def in_use(path: str | os.PathLike) -> bool:
        """True when a running tune holds the journal at `path` (see `claim`)."""
        if fcntl is None:
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # also drops the lock just taken
        return False

    def get(self, stage: str, key: str) -> dict | None:
        """The finished result of `stage` for candidate `key`, or None."""
        return self._records.get((stage, key))

    def record(self, stage: str, key: str, result: dict) -> None:
        """Append one finished result (a dataclass's asdict) and keep it for `get`."""
        self._records[(stage, key)] = result
        self._append({"v": self.VERSION, "stage": stage, "key": key, "result": result})

    def __len__(self) -> int:
        return len(self._records)

    def _append(self, record: dict) -> None:
        line = json.dumps(record, default=str) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def _parse_line(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or "stage" not in record:
        return None
    if record["stage"] != "header" and (
        "key" not in record or not isinstance(record.get("result"), dict)
    ):
        return None
    return record
