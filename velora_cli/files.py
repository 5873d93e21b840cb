"""Where velora writes: the profiles directory and ``-o`` files, checked before any work starts;
names that no other run can take (created exclusively); atomic writes with ordinary permissions.

Two runs started in the same second must never share a file (a profile document, a tune journal):
a name is a time stamp plus a counter, and it is taken by creating the file with ``O_EXCL``, which
fails when another process created it first, so the next counter is tried. Writes go to a
temporary file in the same directory that replaces the target (``os.replace``), so a reader or a
crash never sees half a file; the result gets the permissions ``open`` would give (0666 less the
umask), not ``mkstemp``'s 0600.

No torch here: ``velora export-config`` uses it too.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "OutputError",
    "check_output_file",
    "profiles_dir",
    "reserve",
    "slug",
    "writable_dir",
    "write_atomic",
    "write_text_atomic",
]


class OutputError(ValueError):
    """A place velora cannot write to; the one-line message says which and what to do."""


def profiles_dir() -> Path:
    """Where documents are saved: ``$VELORA_PROFILES_DIR``, else ``profiles/``."""
    return Path(os.environ.get("VELORA_PROFILES_DIR", "profiles"))


def _where(directory: Path) -> str:
    if os.environ.get("VELORA_PROFILES_DIR") and directory == profiles_dir():
        return f"VELORA_PROFILES_DIR={directory}"
    return str(directory)


def writable_dir(directory: Path) -> Path:
    """Create ``directory`` if needed and check that files can be created in it.

    Run before anything is measured, so that a run never measures first and then fails to save.

    Returns:
        ``directory``.

    Raises:
        OutputError: it is a file, it cannot be created, or a file cannot be created in it.
    """
    where = _where(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputError(
            f"{where} is a file, not a directory; point it at a directory (or remove the file)"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".velora-write-check-")
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:  # a parent is a file
        raise OutputError(
            f"cannot create {where}: a parent of it is a file; choose another directory"
        ) from None
    except OSError as exc:  # PermissionError, read-only file system, ...
        raise OutputError(
            f"cannot write to {where}: {exc.strerror or exc}; choose a writable directory "
            "(set VELORA_PROFILES_DIR, or pass --no-save where the command has it)"
        ) from None
    return directory


def check_output_file(path: str | os.PathLike, option: str = "--output") -> Path:
    """Check, before any work, that ``path`` can be written as a file.

    Raises:
        OutputError: it is a directory, its directory does not exist or is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(
            f"{option} {path} is a directory; give a file name, e.g. {path / 'velora.json'}"
        )
    parent = path.parent
    if not parent.is_dir():
        what = "is a file" if parent.exists() else "does not exist"
        raise OutputError(
            f"{option} {path}: directory {parent} {what}; create it or choose another path"
        )
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{option} {path} is read-only; choose another path")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".velora-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(
            f"{option} {path}: cannot write in {parent} ({exc.strerror or exc}); choose a "
            "writable directory"
        ) from None
    return path


def slug(model: str) -> str:
    """A file-name-safe form of a model spec: ``meta-llama_Llama-2-7b``; a local directory's own
    name (``./runs/../ckpt`` -> ``ckpt``), never leading dots or underscores."""
    text = str(model).strip()
    path = Path(text).expanduser()
    if text.startswith((".", "/", "~")) or path.is_dir():
        text = path.resolve().name or "model"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._-") or "model"


def reserve(directory: Path, stem: str, suffix: str, *, also: tuple[str, ...] = ()) -> Path:
    """Take a new file name ``<stem>-<stamp>[-n]<suffix>`` in ``directory``, created (empty) with
    ``O_EXCL`` so that no other run can take it.

    Args:
        directory: where (created if needed; checked with `writable_dir`).
        stem: the name before the stamp, e.g. ``profile-llama-60m-estimate``.
        suffix: the file created, e.g. ``.json``.
        also: other suffixes the same name will be written with (the tune document beside its
            ``.jsonl`` journal): a name is skipped when any of them exists already.

    Returns:
        The created file's path.

    Raises:
        OutputError: the directory cannot be written.
    """
    writable_dir(directory)
    stamp = _stamp()
    for n in range(1, 10_000):
        name = f"{stem}-{stamp}" + (f"-{n}" if n > 1 else "")
        path = directory / (name + suffix)
        if any((directory / (name + s)).exists() for s in also):
            continue
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot create {path}: {exc.strerror or exc}") from None
        os.close(fd)
        return path
    raise OutputError(f"no free name for {stem}-{stamp}{suffix} in {directory}")  # pragma: no cover


def _stamp() -> str:
    """The local time to the second, as names carry it: ``20261201-144215``."""
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` so that a reader (or a crash) never sees a half-written file.

    The file gets the mode a plain ``open`` would create (0666 less the umask) or, when it
    exists, keeps its own.

    Raises:
        OutputError: the directory does not exist or cannot be written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(
            f"cannot write {path}: {exc.strerror or exc}; choose a writable directory"
        ) from None
    try:
        os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, document: dict[str, Any]) -> None:
    """Write a JSON document atomically (`write_text_atomic`), indented, newline-terminated."""
    write_text_atomic(path, json.dumps(document, indent=2) + "\n")


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777  # an existing file (or a reserved name) keeps its mode
    except FileNotFoundError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
