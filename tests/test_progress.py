"""The rich progress display counts each task in its own unit: bytes as MB, others as N/M."""

from __future__ import annotations

import io

from rich.console import Console

from safe_cache.runtime.progress import RichProgress


def test_each_task_in_its_own_unit():
    out = io.StringIO()
    with RichProgress(unit="B", console=Console(file=out, width=160)) as progress:
        download = progress.start("archive", 5_000_000)
        frames = progress.start("middle frames", 10, unit="videos")
        progress.advance(download, 2_500_000)
        progress.advance(frames, 4)
    lines = {line.split()[0]: line for line in out.getvalue().splitlines() if line.strip()}
    assert "2.5/5.0 MB" in lines["archive"]
    assert "4/10" in lines["middle"] and "videos/s" in lines["middle"]
    assert "MB" not in lines["middle"]
