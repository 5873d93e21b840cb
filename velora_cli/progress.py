"""Progress on stderr while rows are measured (stdout stays clean for --format json/csv)."""

from __future__ import annotations

import time


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
