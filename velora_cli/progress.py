"""Progress on stderr while rows or candidates are measured (stdout stays clean for --format
json/csv)."""

from __future__ import annotations

import time
from collections.abc import Callable


class RowProgress:
    """A rich progress bar over profile rows: which row, how many left, elapsed and ETA."""

    def __init__(self, total: int):
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
        self.started = time.perf_counter()

    def __enter__(self) -> RowProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def start(self, index: int, total: int, strategy) -> None:
        self.progress.update(self.task, description=f"measuring {strategy.label}")

    def done(self, index: int, total: int, row: dict) -> None:
        self.progress.advance(self.task)
        if row["status"] != "ok":
            self.console.print(
                f"[yellow]{row['label']}: {row['status']}: {row.get('error', '')}[/yellow]",
                highlight=False,
            )


class TuneProgress:
    """Progress lines (stderr): what runs now, how many measured of how many, elapsed and ETA."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo = echo
        self.start = time.perf_counter()
        self.measure_times: list[float] = []
        self._measuring_since: float | None = None

    def __call__(self, message: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if self._measuring_since is not None:
            self.measure_times.append(now - self._measuring_since)
            self._measuring_since = None
        stage = message.split()[0]
        eta = ""
        if stage in ("measure", "verify"):
            self._measuring_since = now
            if self.measure_times and total > done:
                each = sum(self.measure_times) / len(self.measure_times)
                eta = f", eta ≥ {_duration(each * (total - done))}"
        self.echo(f"[{min(done + (stage == 'measure'), total)}/{total}] {message} "
                  f"({_duration(now - self.start)} elapsed{eta})")  # fmt: skip


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
