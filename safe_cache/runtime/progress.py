"""Progress reporting: library functions take a sink; the CLI passes a rich one.

On a terminal the sink draws rich bars; when stderr is a file or a pipe (a batch job's log, `2>
log`), it writes one plain line per task every few seconds instead (`SAFE_CACHE_PROGRESS_EVERY`,
default 10 s) and one when a task starts and ends, so a log shows progress while the job runs,
not only at its end, and holds no terminal control codes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
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


EVERY_ENV = "SAFE_CACHE_PROGRESS_EVERY"


def _amount(value: float, unit: str) -> str:
    if unit == "B":
        return f"{value / 1e6:,.1f} MB"
    return f"{value:,.0f} {unit}"


@dataclass
class _LineTask:
    description: str
    total: int
    unit: str
    started: float
    done: float = 0.0
    printed: float = 0.0


class LineProgress:
    """Progress as plain lines (for logs): a task's start, then its count, rate and time left
    every `every` seconds, then its end."""

    def __init__(self, console: Console, unit: str = "img", every: float | None = None) -> None:
        self.console, self.unit = console, unit
        self.every = every if every is not None else float(os.environ.get(EVERY_ENV) or 10)
        self.tasks: list[_LineTask] = []

    def _line(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True, markup=False)

    def start(self, description: str, total: int, unit: str | None = None) -> int:
        now = time.monotonic()
        task = _LineTask(description, total, unit or self.unit, now, printed=now)
        self.tasks.append(task)
        self._line(f"{description}: started ({_amount(total, task.unit)})" if total
                   else f"{description}: started")
        return len(self.tasks) - 1

    def _status(self, task: _LineTask) -> str:
        elapsed = max(time.monotonic() - task.started, 1e-9)
        rate = task.done / elapsed
        left = f", {(task.total - task.done) / rate:,.0f} s left" \
            if rate > 0 and task.total > task.done else ""
        of = f" of {_amount(task.total, task.unit)}" if task.total else ""
        return f"{_amount(task.done, task.unit)}{of}, {_amount(rate, task.unit)}/s," \
               f" {elapsed:,.0f} s{left}"

    def advance(self, task: int, amount: int) -> None:
        entry = self.tasks[task]
        entry.done += amount
        now = time.monotonic()
        if now - entry.printed >= self.every:
            entry.printed = now
            self._line(f"{entry.description}: {self._status(entry)}")

    def note(self, task: int, text: str) -> None:
        if text:
            self._line(f"{self.tasks[task].description}: {text}")

    def finish(self, task: int) -> None:
        entry = self.tasks[task]
        entry.done = max(entry.done, entry.total)
        self._line(f"{entry.description}: done, {self._status(entry)}")


class RichProgress:
    """A rich progress display: one bar per task, its count and rate (in the task's unit, or
    the display's), time elapsed and left; plain lines (LineProgress) where stderr is not a
    terminal."""

    def __init__(self, unit: str = "img", console: Console | None = None) -> None:
        self.unit = unit
        console = console or Console(stderr=True)
        self.lines = None if console.is_terminal else LineProgress(console, unit)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), _CountColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            TextColumn("{task.fields[note]}", style="green"),
            console=console, transient=False,
        )

    def __enter__(self) -> RichProgress:
        if self.lines is None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.lines is None:
            self.progress.stop()

    def start(self, description: str, total: int, unit: str | None = None) -> int:
        if self.lines is not None:
            return self.lines.start(description, total, unit)
        return self.progress.add_task(description, total=total, note="",
                                      unit=unit or self.unit)

    def advance(self, task: int, amount: int) -> None:
        if self.lines is not None:
            return self.lines.advance(task, amount)
        self.progress.advance(task, amount)

    def note(self, task: int, text: str) -> None:
        if self.lines is not None:
            return self.lines.note(task, text)
        self.progress.update(task, note=text)

    def finish(self, task: int) -> None:
        if self.lines is not None:
            return self.lines.finish(task)
        self.progress.update(task, completed=self.progress.tasks[task].total)
