"""The rich progress display counts each task in its own unit: bytes as MB, others as N/M."""

from __future__ import annotations

import io
import re

from rich.console import Console

from safe_cache.runtime.progress import RichProgress


def test_each_task_in_its_own_unit():
    out = io.StringIO()
    with RichProgress(unit="B", console=Console(file=out, width=160, force_terminal=True,
                                                color_system=None)) as progress:
        download = progress.start("archive", 5_000_000)
        frames = progress.start("middle frames", 10, unit="videos")
        progress.advance(download, 2_500_000)
        progress.advance(frames, 4)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # the terminal's codes
    lines = {line.split()[0]: line for line in re.split(r"[\r\n]", text) if line.strip()}
    assert "2.5/5.0 MB" in lines["archive"]
    assert "4/10" in lines["middle"] and "videos/s" in lines["middle"]
    assert "MB" not in lines["middle"]


def test_without_a_terminal_progress_is_plain_lines_while_it_runs(monkeypatch):
    monkeypatch.setenv("SAFE_CACHE_PROGRESS_EVERY", "0")
    out = io.StringIO()
    with RichProgress(unit="img", console=Console(file=out, width=80)) as progress:
        task = progress.start("extract dtd: train", 40)
        progress.advance(task, 10)
        so_far = out.getvalue()  # written now, not when the job ends
        progress.note(task, "resumed")
        progress.advance(task, 30)
        progress.finish(task)
    lines = out.getvalue().splitlines()
    assert so_far.splitlines() == ["extract dtd: train: started (40 img)",
                                   so_far.splitlines()[1]]
    assert re.fullmatch(r"extract dtd: train: 10 img of 40 img, [\d,.]+ img/s, \d+ s"
                        r"(, [\d,]+ s left)?", so_far.splitlines()[1]), so_far
    assert "extract dtd: train: resumed" in lines
    assert lines[-1].startswith("extract dtd: train: done, 40 img of 40 img")
    assert "\x1b" not in out.getvalue() and "━" not in out.getvalue()  # no terminal codes


def test_a_warning_repeated_per_class_is_one_line_and_a_count():
    import warnings

    import rich_click as click
    from click.testing import CliRunner

    from safe_cache.cli.app import SafeCacheGroup
    from safe_cache.errors import SafeCacheWarning

    @click.group(cls=SafeCacheGroup)
    def group() -> None:
        pass

    @group.command()
    def sample() -> None:
        for name in ("cat", "dog", "owl"):
            warnings.warn(f"class {name} has 1 image, fewer than 4", SafeCacheWarning,
                          stacklevel=1)
        warnings.warn("another warning", SafeCacheWarning, stacklevel=1)

    result = CliRunner().invoke(group, ["sample"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["warning: class cat has 1 image, fewer than 4", "warning: another warning",
                     "warning: 2 more like: class cat has 1 image, fewer than 4"], lines
