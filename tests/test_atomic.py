"""atomic.py, the one way files and folders readers may see are written: whole or not at all,
a temporary of each writer's own, and the mode an ordinary open() or mkdir() would give."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from pathlib import Path

import pytest

from safe_cache import atomic
from safe_cache.atomic import (
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    atomic_write_with,
)


@contextlib.contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def disk_full(*_args) -> None:
    raise OSError(28, "No space left on device")


def test_a_failed_write_leaves_neither_temporary_nor_half_file(tmp_path):
    target = tmp_path / "new.json"

    def half_then_fail(temporary: Path) -> None:
        temporary.write_text('{"half": ')
        disk_full()

    with pytest.raises(OSError, match="No space"):
        atomic_write_with(target, half_then_fail)
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as temporary:
        temporary.write_bytes(b"half")
        raise KeyboardInterrupt  # a Ctrl-C mid-write too
    assert names(tmp_path) == []


def test_two_writers_of_one_file_never_share_a_temporary(tmp_path):
    target = tmp_path / "shared.txt"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second and first.parent == second.parent == tmp_path
        first.write_text("first")
        second.write_text("second")
    assert target.read_text() == "first" and names(tmp_path) == ["shared.txt"]  # last wins


@pytest.mark.slow
def test_concurrent_writers_and_a_reader_see_only_whole_files(tmp_path):
    target = tmp_path / "shared.bin"
    size, seen, stop = 256 * 1024, set(), threading.Event()

    def write(byte: int) -> None:
        for _ in range(15):
            atomic_write_bytes(target, bytes([byte]) * size)

    def read() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                data = target.read_bytes()
                seen.add((len(data), len(set(data))))

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(b,)) for b in range(6)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    reader.join()
    assert seen <= {(size, 1)}  # never a half file, never a mix of two writers
    assert names(tmp_path) == ["shared.bin"]


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_the_file_mode_follows_the_umask(tmp_path, mask, mode):
    """Whatever the writer creates (safetensors' save_file makes 0600 files), the file gets
    the mode an ordinary open() would under the umask."""
    with umask(mask):
        text = atomic_write_text(tmp_path / "a.txt", "x")
        private = atomic_write_with(tmp_path / "b.bin", lambda t: (t.write_bytes(b"x"),
                                                                   os.chmod(t, 0o600)))
    assert {stat.S_IMODE(p.stat().st_mode) for p in (text, private)} == {mode}


def test_a_folder_is_renamed_in_whole_with_the_umasks_mode(tmp_path):
    out = tmp_path / "model"
    with umask(0o027), atomic_dir(out) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".model.")
        (staging / "card.json").write_text("{}")
        assert not out.exists()  # nobody sees it until it is whole
    assert names(out) == ["card.json"] and names(tmp_path) == ["model"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o750


def test_a_failed_folder_leaves_nothing_and_keeps_the_old_one(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(OSError, match="No space"), atomic_dir(out) as staging:
        (staging / "head.safetensors").write_bytes(b"half")
        disk_full()
    assert names(tmp_path) == []
    out.mkdir()
    (out / "card.json").write_text("old")
    with pytest.raises(OSError, match="No space"), atomic_dir(out, replace=True) as staging:
        (staging / "card.json").write_text("new")
        disk_full()
    assert names(tmp_path) == ["model"] and (out / "card.json").read_text() == "old"


def test_a_folder_replaces_an_old_one_only_when_asked(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "card.json").write_text("old")
    (out / "stale.safetensors").write_text("old")
    with pytest.raises(FileExistsError, match="replaced only when asked"), atomic_dir(out):
        pass
    with atomic_dir(out, replace=True) as staging:
        (staging / "card.json").write_text("new")
    assert names(out) == ["card.json"] and (out / "card.json").read_text() == "new"
    assert names(tmp_path) == ["model"]  # the old folder moved aside and removed


def test_two_writers_of_one_folder_never_share_a_temporary(tmp_path):
    out = tmp_path / "model"
    # the second finishes first and goes in; the first then refuses to replace what appeared
    # meanwhile (it was not asked to replace anything) and removes its own temporary
    with pytest.raises(FileExistsError, match="appeared"), atomic_dir(out) as first, \
            atomic_dir(out) as second:
        assert first != second
        (first / "who").write_text("first")
        (second / "who").write_text("second")
    assert (out / "who").read_text() == "second" and names(tmp_path) == ["model"]


def test_replacing_a_link_never_touches_what_it_points_to(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    out = tmp_path / "model"
    out.symlink_to(elsewhere)
    with atomic_dir(out, replace=True) as staging:
        (staging / "card.json").write_text("new")
    assert not out.is_symlink() and names(out) == ["card.json"]
    assert (elsewhere / "keep.txt").read_text() == "keep"
    assert names(tmp_path) == ["elsewhere", "model"]


def test_a_folder_that_cannot_be_renamed_in_puts_the_old_one_back(tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "card.json").write_text("old")
    real = os.rename

    def refuse_the_new_folder(source, destination):
        if Path(source).name.endswith(atomic.PART_SUFFIX):
            disk_full()
        real(source, destination)

    monkeypatch.setattr(atomic.os, "rename", refuse_the_new_folder)
    with pytest.raises(OSError, match="No space"), atomic_dir(out, replace=True) as staging:
        (staging / "card.json").write_text("new")
    assert names(tmp_path) == ["model"] and (out / "card.json").read_text() == "old"
