"""Which tune journal ``velora tune --resume`` continues: this run's own, never another run's.

Several tunes may share the profiles directory (and may run at the same time). ``--resume``
without ``--resume-from`` takes the newest journal whose header records this run's settings
(`tune_settings.CONTEXT_KEYS`) and that no running tune holds (`Journal.claim`); it names the
one it took. ``--resume-from PATH`` takes that journal, after the same checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from velora_cli.search.journal import Journal
from velora_cli.search.settings import CONTEXT_KEYS, TuneError, TuneSettings


def _differences(recorded: dict[str, Any], context: dict[str, Any], ignore: tuple[str, ...]):
    return [k for k in CONTEXT_KEYS if k not in ignore and recorded.get(k) != context.get(k)]


def _describe(keys: list[str], recorded: dict[str, Any], context: dict[str, Any]) -> str:
    was = ", ".join(f"{k}={recorded.get(k)!r}" for k in keys)
    now = ", ".join(f"{k}={context.get(k)!r}" for k in keys)
    return f"it was recorded with {was}, this run has {now}"


def find_journal(
    directory: Path, context: dict[str, Any], *, ignore: tuple[str, ...] = ()
) -> tuple[Path, list[str]]:
    """The newest journal under ``directory`` recorded with ``context`` and not in use.

    Args:
        directory: the profiles directory.
        context: this run's `TuneSettings.context()`.
        ignore: context keys not compared (``budget_bytes`` when the budget is to come from the
            journal).

    Returns:
        (path, notes): the journal, and one line per newer journal passed over because a running
        tune holds it.

    Raises:
        TuneError: no journal, none recorded with these settings (the newest one's differences
            are named), or every matching one is held by a running tune.
    """
    found = sorted(directory.glob("tune-*.jsonl"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not found:
        raise TuneError(
            f"no tune journal under {directory}/ to resume; run velora tune without --resume, "
            "or pass --resume-from PATH"
        )
    notes, newest_other = [], None
    for path in found:
        recorded = Journal.read_context(path)
        if recorded is None:
            continue  # empty or not a journal: it records no settings to match
        differ = _differences(recorded, context, ignore)
        if differ:
            newest_other = newest_other or (path, differ, recorded)
            continue
        if Journal.in_use(path):
            notes.append(f"{path} has these settings but a running tune is writing it: not taken")
            continue
        return path, notes
    if notes:
        raise TuneError(
            f"cannot resume: the tune journals with these settings are being written by running "
            f"tunes ({'; '.join(notes)}); wait for them, or run without --resume"
        )
    if newest_other is None:
        raise TuneError(
            f"cannot resume: no tune journal under {directory}/ records its settings (all empty "
            "or unreadable); run without --resume to start a new tune"
        )
    path, differ, recorded = newest_other
    raise TuneError(
        f"cannot resume: no tune journal under {directory}/ was recorded with this run's "
        f"settings; the newest, {path}: {_describe(differ, recorded, context)}; rerun with its "
        "settings, pass --resume-from PATH, or run without --resume to start a new tune"
    )


def open_journal(path: Path, settings: TuneSettings, *, ignore: tuple[str, ...] = ()) -> Journal:
    """Reopen the journal at ``path`` for ``settings``: it must record them and be free.

    Raises:
        FileNotFoundError: no journal at ``path``.
        TuneError: it records no settings (empty, or its header is unreadable), other settings
            (the message lists them), or a running tune is writing it.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no tune journal at {path}")
    if Journal.in_use(path):
        raise TuneError(
            f"cannot resume {path}: a running velora tune is writing it; wait for it to finish, "
            "or run without --resume"
        )
    recorded = Journal.read_context(path)
    if recorded is None:
        what = "is empty" if path.stat().st_size == 0 else "has no readable header line"
        raise TuneError(
            f"cannot resume {path}: it {what}, so it records no settings and no results; run "
            "without --resume to start a new tune"
        )
    context = settings.context()
    differ = _differences(recorded, context, ignore)
    if differ:
        raise TuneError(
            f"cannot resume {path}: {_describe(differ, recorded, context)}; rerun with the same "
            "settings, or without --resume to start a new tune"
        )
    return Journal.load(path)


def discard_if_empty(journal, *, new: bool) -> bool:
    """Delete a journal this tune started when it failed before any result (e.g. ``--weights``
    for a built-in): an empty journal has nothing to resume and would be found by the next
    ``--resume``. A resumed journal is always kept.

    Returns:
        Whether the journal was deleted.
    """
    if not new or len(journal):
        return False
    journal.release()
    journal.path.unlink(missing_ok=True)
    return True
