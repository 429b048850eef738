"""One way to write a file (or a folder) that readers may see at any moment: write a temporary
beside it, then rename it into place (zarr-python's `_atomic_write`, img2dataset's done markers).

- the temporary name is unique per writer (`.<name>.<random>.part`), so two writers of the same
  file never write into one temporary, and the last rename wins whole;
- a failure (an exception, a full disk) removes the temporary: nothing half-written stays;
- the final file gets the mode an ordinary `open()` would give it (0666 less the umask: 0644
  under 022). Writers such as safetensors' `save_file` create 0600 files, which a teammate
  cannot read in a shared results folder.

A kill -9 between the write and the rename can leave a `.part` file; it is never read (readers
look for final names only) and the next successful write of the same file does not need it.

`atomic_dir` is the same for a folder of files (an exported model): a fresh temporary folder
beside it, removed whole on failure, renamed in whole. A folder cannot be renamed over a
folder that holds files, so replacing one moves the old folder aside first (`.<name>.<random>
.old`, removed once the new one is in): a kill between those two renames leaves the old folder
beside the name, whole, and nothing at it; never a mix of both.

Not for a download that must resume (data/download.py): its `.part` is kept across failures
and runs on purpose, under a name keyed by what it is of.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

PART_SUFFIX = ".part"
OLD_SUFFIX = ".old"


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc), else by the
    set-and-restore dance."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a new ordinary file under the current umask."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """The mode of a new folder under the current umask (0755 under 022)."""
    return 0o777 & ~_umask()


def temporary_name(path: Path, suffix: str = PART_SUFFIX) -> Path:
    """A temporary beside `path`, unique to this writer."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s content into; on a clean exit it gets the
    umask's mode and is renamed onto `path`, on any failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    try:
        yield temporary
        os.chmod(temporary, file_mode())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` whole or not at all."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` whole or not at all."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Let `write(temporary)` write the file (a library's own saver), then rename it in."""
    with atomic_path(path) as temporary:
        write(temporary)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path` to fill; on a clean exit it gets the
    umask's mode and is renamed onto `path`, on any failure it is removed whole.

    An existing `path` is replaced only with `replace` (the caller has checked it is its own
    to replace): it is moved aside, the new folder renamed in, then the old one removed; if
    the rename fails the old folder is put back. Without `replace` an existing `path` is a
    FileExistsError, raised before anything is written (the caller's check should come first:
    this catches a folder made meanwhile by someone else).
    """
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists; it is replaced only when asked to.")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    os.mkdir(temporary)
    try:
        yield temporary
        os.chmod(temporary, folder_mode())
        _rename_folder_in(temporary, path, replace)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _rename_folder_in(temporary: Path, path: Path, replace: bool) -> None:
    """Rename a finished folder onto `path`, the old one (if `replace`) moved aside first and
    removed last, or put back when the new one cannot be renamed in."""
    old = temporary_name(path, OLD_SUFFIX) if replace and (path.exists() or path.is_symlink()) \
        else None
    if old is not None:
        os.rename(path, old)
    elif path.exists():
        raise FileExistsError(f"{path} appeared while it was being written; nothing replaced it.")
    try:
        os.rename(temporary, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    if old is not None:
        _remove(old)


def _remove(old: Path) -> None:
    """Remove what was moved aside: a folder whole, a file or a link itself (never what a
    link points to)."""
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            old.unlink()
