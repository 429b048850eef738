"""Progress reporting: library functions take a sink; the CLI passes a rich one."""

from __future__ import annotations

from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text


class ProgressSink(Protocol):
    def start(self, description: str, total: int) -> int: ...
    def advance(self, task: int, amount: int) -> None: ...
    def note(self, task: int, text: str) -> None: ...
    def finish(self, task: int) -> None: ...


class _NullProgress:
    def start(self, description: str, total: int) -> int:
        return 0

    def advance(self, task: int, amount: int) -> None:
        pass

    def note(self, task: int, text: str) -> None:
        pass

    def finish(self, task: int) -> None:
        pass


null_progress: ProgressSink = _NullProgress()


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


class RichProgress:
    """A rich progress display: one bar per task, items/s and time left."""

    def __init__(self, unit: str = "img", console: Console | None = None) -> None:
        counts: tuple[ProgressColumn, ...] = (DownloadColumn(), TransferSpeedColumn()) \
            if unit == "B" else (MofNCompleteColumn(), _RateColumn(unit))  # bytes: MB, MB/s
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), *counts,
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            TextColumn("{task.fields[note]}", style="green"),
            console=console or Console(stderr=True), transient=False,
        )

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def start(self, description: str, total: int) -> int:
        return self.progress.add_task(description, total=total, note="")

    def advance(self, task: int, amount: int) -> None:
        self.progress.advance(task, amount)

    def note(self, task: int, text: str) -> None:
        self.progress.update(task, note=text)

    def finish(self, task: int) -> None:
        self.progress.update(task, completed=self.progress.tasks[task].total)
