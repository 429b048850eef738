"""One way to write a file that readers may see at any moment: write a temporary beside it, then
rename it into place (zarr-python's `_atomic_write`, img2dataset's done markers).

- the temporary name is unique per writer (`.<name>.<random>.part`), so two writers of the same
  file never write into one temporary, and the last rename wins whole;
- a failure (an exception, a full disk) removes the temporary: nothing half-written stays;
- the final file gets the mode an ordinary `open()` would give it (0666 less the umask: 0644
  under 022). Writers such as safetensors' `save_file` create 0600 files, which a teammate
  cannot read in a shared results folder.

A kill -9 between the write and the rename can leave a `.part` file; it is never read (readers
look for final names only) and the next successful write of the same file does not need it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

PART_SUFFIX = ".part"


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


def temporary_name(path: Path) -> Path:
    """A temporary beside `path`, unique to this writer."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{PART_SUFFIX}")


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
