"""Progress on stderr while rows or candidates are measured (stdout stays clean for --format
json/csv).

On a terminal: a live bar (what runs now, how many of how many, elapsed, ETA). Anywhere else (a
pipe, a log file, CI) a live bar prints nothing at all, so plain lines instead: one per item (per
few seconds for the tune's many quick estimates), each with the elapsed time and an ETA, and a
"still ..." line every `HEARTBEAT_SECONDS` while one item runs long (a 7B row on a CPU), so that
a log never goes quiet for minutes.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

# While one item runs, a plain-line log says it is still alive this often.
HEARTBEAT_SECONDS = 30.0
# The tune's estimates are many and quick: plain lines at most this often (plus first and last).
ESTIMATE_LINE_SECONDS = 5.0


def stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal (rich's reading, which honours FORCE_TERMINAL)."""
    from rich.console import Console

    return Console(stderr=True).is_terminal


def duration(seconds: float) -> str:
    """``42s``, ``3m07s`` or ``1h02m``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _echo_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Heartbeat:
    """A daemon thread that calls ``say(seconds on the current item)`` every ``interval`` while
    an item runs; `begin` and `end` bracket each item."""

    def __init__(self, say: Callable[[float], None], interval: float = HEARTBEAT_SECONDS):
        self.say, self.interval = say, interval
        self.lock = threading.Lock()
        self._since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self) -> None:
        with self.lock:
            self._since = time.perf_counter()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="velora-progress")
            self._thread.start()

    def end(self) -> None:
        with self.lock:
            self._since = None

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self.lock:
                since = self._since
                if since is not None and time.perf_counter() - since >= self.interval:
                    self.say(time.perf_counter() - since)


class RowProgress:
    """Progress over profile rows: which row, how many left, elapsed and ETA.

    A live bar on a terminal; plain lines otherwise (one as each row starts, one for each row
    that fails, and a heartbeat while a row runs long).

    Example:
        >>> with RowProgress(19) as progress:  # doctest: +SKIP
        ...     run_profile(..., before_row=progress.start, on_row=progress.done)
    """

    def __init__(
        self,
        total: int,
        *,
        terminal: bool | None = None,
        echo: Callable[[str], None] | None = None,
        heartbeat: float = HEARTBEAT_SECONDS,
    ):
        self.total = total
        self.terminal = stderr_is_terminal() if terminal is None else terminal
        self.echo = echo or _echo_stderr
        self.started = time.perf_counter()
        self.durations: list[float] = []
        self._row_started: float | None = None
        self._label = ""
        self.progress = None
        self._beat = _Heartbeat(self._still, heartbeat)
        if self.terminal:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.console = Console(stderr=True)
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.task = self.progress.add_task("measuring", total=total)

    def __enter__(self) -> RowProgress:
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._beat.stop()
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def _eta(self, remaining: int) -> str:
        if not self.durations or remaining <= 0:
            return ""
        each = sum(self.durations) / len(self.durations)
        return f", eta ~{duration(each * remaining)}"

    def _still(self, seconds: float) -> None:
        self.echo(f"  ... still measuring {self._label} ({duration(seconds)} on this row)")

    def start(self, index: int, total: int, strategy) -> None:
        """Before row ``index`` (0-based) of ``total``."""
        self._row_started = time.perf_counter()
        self._label = strategy.label
        if self.progress is not None:
            self.progress.update(self.task, description=f"measuring {strategy.label}")
            return
        elapsed = duration(self._row_started - self.started)
        self.echo(
            f"[{index + 1}/{total}] measuring {strategy.label} "
            f"({elapsed} elapsed{self._eta(total - index)})"
        )
        self._beat.begin()

    def done(self, index: int, total: int, row: dict) -> None:
        """After row ``index``: advance, and say so when it did not measure."""
        self._beat.end()
        if self._row_started is not None:
            self.durations.append(time.perf_counter() - self._row_started)
        failed = f"{row['label']}: {row['status']}: {row.get('error', '')}"
        if self.progress is not None:
            self.progress.advance(self.task)
            if row["status"] != "ok":
                self.console.print(f"[yellow]{failed}[/yellow]", highlight=False, markup=True)
            return
        if row["status"] != "ok":
            self.echo(f"[{index + 1}/{total}] {failed}")
        if index + 1 == total:
            self.echo(f"measured {total} rows in {duration(time.perf_counter() - self.started)}")


class TuneProgress:
    """The tuner's progress callback (`velora_cli.search.tuner.tune`'s ``progress``), on stderr.

    Messages start with the stage (``estimate``, ``measure``, ``probe``, ``verify``), after
    ``resume `` when the result comes from the journal; ``estimate done`` closes the estimates.
    Each line says what runs now, how many of how many, the elapsed time and an ETA from the
    durations of the same stage so far. Estimates (many, quick) print a line every few seconds
    when not on a terminal; on a terminal a live bar follows every stage, with a line per
    measurement, probe and verification above it.

    Example:
        >>> with TuneProgress(err) as progress:  # doctest: +SKIP
        ...     autotune.run(settings, ..., progress=progress)
    """

    def __init__(
        self,
        echo: Callable[[str], None] | None = None,
        *,
        terminal: bool | None = None,
        heartbeat: float = HEARTBEAT_SECONDS,
        estimate_every: float = ESTIMATE_LINE_SECONDS,
        silent: tuple[str, ...] = (),
    ):
        """
        Args:
            echo: where lines go (default: stderr).
            terminal: live bar (True) or plain lines (False); None: whether stderr is a terminal.
            heartbeat: seconds between "still on ..." lines while one item runs (plain lines).
            estimate_every: seconds between estimate lines (plain lines).
            silent: stages that print no line (``--backend estimate``: "measure" and "verify"
                only look up the estimate, so nothing runs there).
        """
        self.silent = silent
        self.echo = echo or _echo_stderr
        self.terminal = stderr_is_terminal() if terminal is None else terminal
        self.start = time.perf_counter()
        self.estimate_every = estimate_every
        self.times: dict[str, list[float]] = {}  # stage -> durations of items actually run
        self._current: tuple[str, float, bool] | None = None  # (stage, since, resumed)
        self._stage_started: dict[str, float] = {}
        self._last_line = -float("inf")
        self._what = ""
        self._beat = _Heartbeat(self._still, heartbeat)
        self.progress = None
        self._task = None
        self._bar_stage = ""

    # -- the live bar (terminal, inside ``with`` only) ------------------------------------------
    def __enter__(self) -> TuneProgress:
        if self.terminal:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[eta]}"),
                console=Console(stderr=True),
                transient=True,
            )
            self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._beat.stop()
        if self.progress is not None:
            self.progress.__exit__(*exc)
            self.progress = None

    # -- the callback ---------------------------------------------------------------------------
    def __call__(self, message: str, done: int, total: int) -> None:
        now = time.perf_counter()
        self._finish_item(now)
        words = message.split()
        resumed = words[0] == "resume"
        stage = words[1] if resumed and len(words) > 1 else words[0]
        self._stage_started.setdefault(stage, now)
        if stage == "estimate" and words[-1] == "done":
            self._estimates_done(total, now)
            return
        self._current = (stage, now, resumed)
        self._what = message
        if stage in self.silent:
            return
        position = min(done + (stage in ("measure", "estimate")), total)
        eta = self._eta(stage, total - done)
        line = (
            f"[{position}/{total}] {message} ({duration(now - self.start)} elapsed"
            + (f", {eta}" if eta else "")
            + ")"
        )
        if self.progress is not None:
            self._bar(stage, message, done, total, eta)
            if stage != "estimate":
                self.progress.console.print(line, highlight=False, markup=False)
            return
        if stage == "estimate" and not self._due(now, done, total):
            self._beat.begin()
            return
        self._last_line = now
        self.echo(line)
        self._beat.begin()

    def _finish_item(self, now: float) -> None:
        self._beat.end()
        if self._current is not None:
            stage, since, resumed = self._current
            if not resumed:  # journal hits take no time and would shrink the ETA
                self.times.setdefault(stage, []).append(now - since)
            self._current = None

    def _eta(self, stage: str, remaining: int) -> str:
        times = self.times.get(stage)
        if not times or remaining <= 0:
            return ""
        each = sum(times) / len(times)
        # measurements: the plan may grow as rounds go on, so the ETA is a lower bound
        sign = "≥ " if stage == "measure" else "~"
        return f"eta {sign}{duration(each * remaining)}"

    def _due(self, now: float, done: int, total: int) -> bool:
        return done == 0 or done + 1 == total or now - self._last_line >= self.estimate_every

    def _estimates_done(self, total: int, now: float) -> None:
        took = duration(now - self._stage_started.get("estimate", now))
        line = f"estimated {total} candidates in {took}"
        if self.progress is not None:
            if self._task is not None:
                self.progress.update(self._task, completed=total)
            self.progress.console.print(line, highlight=False, markup=False)
            return
        self.echo(line)

    def _bar(self, stage: str, message: str, done: int, total: int, eta: str) -> None:
        if self._task is None:
            self._task = self.progress.add_task(message, total=total, eta=eta)
        elif stage != self._bar_stage:  # a new stage: its own count and clock
            self.progress.reset(self._task, total=total, completed=done, description=message)
        self._bar_stage = stage
        self.progress.update(self._task, description=message, completed=done, total=total, eta=eta)

    def _still(self, seconds: float) -> None:
        self.echo(f"  ... still on {self._what} ({duration(seconds)} on it)")
