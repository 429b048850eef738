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
    """`start` gives a task's total in its own unit (None: the sink's default unit)."""

    def start(self, description: str, total: int, unit: str | None = None) -> int: ...
    def advance(self, task: int, amount: int) -> None: ...
    def note(self, task: int, text: str) -> None: ...
    def finish(self, task: int) -> None: ...


class _NullProgress:
    def start(self, description: str, total: int, unit: str | None = None) -> int:
        return 0

    def advance(self, task: int, amount: int) -> None:
        pass

    def note(self, task: int, text: str) -> None:
        pass

    def finish(self, task: int) -> None:
        pass


null_progress: ProgressSink = _NullProgress()


class _CountColumn(ProgressColumn):
    """Done / total with its rate: in MB and MB/s for a task counted in bytes ("B")."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = (DownloadColumn(), TransferSpeedColumn())
        self.count = MofNCompleteColumn()

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "it")
        if unit == "B":
            return Text.assemble(self.bytes[0].render(task), " ", self.bytes[1].render(task))
        speed = task.finished_speed or task.speed
        rate = f"{speed:,.1f} {unit}/s" if speed else f"- {unit}/s"
        return Text.assemble(self.count.render(task), " ", Text(rate, style="cyan"))


class RichProgress:
    """A rich progress display: one bar per task, its count and rate (in the task's unit, or
    the display's), time elapsed and left."""

    def __init__(self, unit: str = "img", console: Console | None = None) -> None:
        self.unit = unit
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), _CountColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            TextColumn("{task.fields[note]}", style="green"),
            console=console or Console(stderr=True), transient=False,
        )

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def start(self, description: str, total: int, unit: str | None = None) -> int:
        return self.progress.add_task(description, total=total, note="",
                                      unit=unit or self.unit)

    def advance(self, task: int, amount: int) -> None:
        self.progress.advance(task, amount)

    def note(self, task: int, text: str) -> None:
        self.progress.update(task, note=text)

    def finish(self, task: int) -> None:
        self.progress.update(task, completed=self.progress.tasks[task].total)
