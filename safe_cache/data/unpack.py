"""Unpack an archive into a folder of ours, bounded and confined.

Every member is checked before it is written: a relative path of plain names (no `..`, not
absolute), no links or devices, and a running count of members and expanded bytes within the
limits (from the source's expected size times a margin: `datasets fetch --unpack-margin`), so a
331 KiB zip that expands to 300 MiB is refused in one line, not written until the disk fills.
Tar (any compression) goes through the standard library's "data" filter as well; zip through
zipfile member by member (its sizes are the ones its reader enforces); a single compressed file
(.gz, .bz2, .xz) is decompressed in a bounded stream; RAR through an external tool (unrar,
bsdtar or 7z refuse paths that leave the folder) and measured afterwards. A corrupt archive
(a bad CRC, a truncated stream) is an ArchiveError naming it; the caller removes the download
and says how to go on.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import lzma
import shutil
import stat
import subprocess
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import ArchiveBombError, ArchiveError, FetchError
from ..names import relative_path_problem

DEFAULT_MARGIN = 8.0  # expanded bytes at most 8x the archive's expected size (images: ~1x)
MIN_BYTES = 64 << 20  # small archives (split files, miniatures) may always expand this much
MIN_MEMBERS = 10_000
MAX_MARGIN = 1e6
MAX_PATH = 1024  # characters of a member's path
MAX_HEADER = 1 << 20  # bytes of a tar long-name or pax header
_COLLISIONS = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}
BYTES_PER_MEMBER = 4096  # an archive of N bytes plausibly holds up to margin * N / 4096 files
COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError,
            gzip.BadGzipFile, NotImplementedError, RuntimeError, ValueError,
            subprocess.CalledProcessError)


@dataclass(frozen=True)
class UnpackLimits:
    """How much one archive may write: expanded bytes and members."""

    max_bytes: int
    max_members: int
    margin: float = DEFAULT_MARGIN

    @classmethod
    def for_size(cls, archive_bytes: int, margin: float = DEFAULT_MARGIN) -> UnpackLimits:
        """The limits of an archive expected to be `archive_bytes` long."""
        margin = min(margin, MAX_MARGIN)
        return cls(max(MIN_BYTES, int(margin * archive_bytes)),
                   max(MIN_MEMBERS, int(margin * archive_bytes / BYTES_PER_MEMBER)), margin)


class _Budget:
    """The running count of one unpack, refusing the member that goes past a limit."""

    def __init__(self, archive: Path, limits: UnpackLimits) -> None:
        self.archive, self.limits, self.bytes, self.members = archive, limits, 0, 0

    def member(self, name: str, size: int) -> None:
        parts = [part for part in name.split("/") if part not in ("", ".")]  # "./a/", "a//b"
        problem = "is an absolute path" if name.startswith("/") else \
            f"is longer than {MAX_PATH} characters" if len(name) > MAX_PATH else \
            relative_path_problem("/".join(parts)) if parts else None
        if problem:
            raise ArchiveError(f"{self.archive.name}: member {name!r:.100} {problem}; the"
                               f" archive would write outside its folder (or no file system"
                               f" could hold it), so nothing of it is used.")
        self.members += 1
        if self.members > self.limits.max_members:
            self._refuse(f"more than {self.limits.max_members:,} members")
        self.add(size)

    def add(self, size: int) -> None:
        self.bytes += size
        if self.bytes > self.limits.max_bytes:
            self._refuse(f"more than {self.limits.max_bytes:,} bytes")

    def _refuse(self, what: str) -> None:
        raise ArchiveBombError(
            f"{self.archive.name}: unpacking would write {what} ({self.limits.margin:g}x what"
            f" it was expected to hold): refused as an archive bomb, and what it had written"
            f" was removed. If the archive is genuine, raise the bound with --unpack-margin"
            f" {self.limits.margin * 4:g}.")


class _BoundedInfo(tarfile.TarInfo):
    """Tar headers read with a bound: a GNU long name or a pax header is read whole into
    memory by tarfile before any member is seen, so a 400 KB .tar.gz can ask for gigabytes."""

    def _proc_gnulong(self, tarfile):  # tarfile's names
        self._bounded()
        return super()._proc_gnulong(tarfile)

    def _proc_pax(self, tarfile):
        self._bounded()
        return super()._proc_pax(tarfile)

    def _bounded(self) -> None:
        if self.size > MAX_HEADER:
            raise ArchiveBombError(f"a tar header asks for {self.size:,} bytes (at most"
                                   f" {MAX_HEADER:,}): refused as an archive bomb.")


def _is_tar(archive: Path) -> bool:
    try:
        with tarfile.open(archive, tarinfo=_BoundedInfo):
            return True
    except tarfile.TarError:
        return False


def _unpack_tar(archive: Path, into: Path, budget: _Budget) -> None:
    with tarfile.open(archive, tarinfo=_BoundedInfo) as tar:
        for member in tar:
            if not (member.isfile() or member.isdir()):
                raise ArchiveError(f"{archive.name}: member {member.name!r:.100} is a link or"
                                   f" a device; only files and folders are unpacked.")
            budget.member(member.name, member.size)
            tar.extract(member, into, filter="data")


def _unpack_zip(archive: Path, into: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zipped:
        for info in zipped.infolist():
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ArchiveError(f"{archive.name}: member {info.filename!r:.100} is a link;"
                                   f" only files and folders are unpacked.")
            budget.member(info.filename, info.file_size)
            target = into / info.filename
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zipped.open(info) as reader, open(target, "wb") as out:
                shutil.copyfileobj(reader, out, 1 << 20)  # zipfile checks size and CRC


def _decompress(archive: Path, into: Path, budget: _Budget) -> None:
    opener = COMPRESSED[archive.suffix.lower()]
    target = into / archive.stem
    budget.member(target.name, 0)
    with opener(archive, "rb") as reader, open(target, "wb") as out:
        while chunk := reader.read(1 << 20):
            budget.add(len(chunk))
            out.write(chunk)


def _unpack_rar(archive: Path, into: Path, budget: _Budget) -> None:
    for tool, args in (("unrar", ["x", "-o+", "-idq"]), ("bsdtar", ["-xf"]), ("7z", ["x", "-y"])):
        binary = shutil.which(tool)
        if binary is None:
            continue
        out = [f"-o{into}"] if tool == "7z" else []
        target = [str(into) + "/"] if tool == "unrar" else []
        cwd = into if tool == "bsdtar" else None
        subprocess.run([binary, *args, str(archive), *out, *target], check=True, cwd=cwd,
                       capture_output=True)
        for path in into.rglob("*"):  # measured afterwards: the tools stream no sizes to us
            if path.is_symlink():
                raise ArchiveError(f"{archive.name}: member {path.relative_to(into)} is a link;"
                                   f" only files and folders are unpacked.")
            budget.member(path.relative_to(into).as_posix(),
                          path.stat().st_size if path.is_file() else 0)
        return
    raise FetchError(
        f"{archive.name} is a RAR archive and no RAR tool is installed (unrar, bsdtar or 7z:"
        f" e.g. `apt install libarchive-tools`). Install one and run again (the download is"
        f" kept), or unpack it yourself where the spec's `unpack` says.")


def unpack(archive: Path, into: Path, limits: UnpackLimits | None = None) -> None:
    """Unpack `archive` into the folder `into` (created); members cannot leave it, and the
    whole stays within `limits` (default: from the archive's own size). On any failure what
    was written under `into` is removed."""
    limits = limits or UnpackLimits.for_size(archive.stat().st_size)
    budget = _Budget(archive, limits)
    into.mkdir(parents=True, exist_ok=True)
    before = set(into.iterdir())
    try:
        if archive.suffix.lower() == ".rar":
            _unpack_rar(archive, into, budget)
        elif zipfile.is_zipfile(archive):
            _unpack_zip(archive, into, budget)
        elif _is_tar(archive):
            _unpack_tar(archive, into, budget)
        elif archive.suffix.lower() in COMPRESSED:
            _decompress(archive, into, budget)
        else:
            raise ArchiveError(f"{archive.name} is not an archive this fetch can read (tar,"
                               f" zip, gz, bz2, xz, rar).")
    except BaseException as exc:
        for path in set(into.iterdir()) - before:  # what this unpack wrote, and only that
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if isinstance(exc, OSError) and exc.errno in _COLLISIONS:
            raise ArchiveError(f"{archive.name} is not a consistent archive: its members"
                               f" collide ({exc.strerror}: {Path(exc.filename or '?').name}"
                               f" is both a file and a folder, or its path is too long)."
                               ) from exc
        if isinstance(exc, ArchiveBombError) and not str(exc).startswith(archive.name):
            raise ArchiveBombError(f"{archive.name}: {exc} Nothing of it was kept.") from exc
        if isinstance(exc, OSError) and not isinstance(exc, _CORRUPT) and exc.filename is None:
            exc.filename = str(into)  # a full disk: say where (the CLI says how to go on)
        if isinstance(exc, _CORRUPT) and not isinstance(exc, FetchError):
            reason = str(exc) or type(exc).__name__
            raise ArchiveError(f"{archive.name} is corrupt ({reason}).") from exc
        raise
