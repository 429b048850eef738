"""Download one source (resumable, checksummed) and unpack an archive safely.

Why not torchvision's `download_url`: it writes straight to the final name (an interrupted
download of a 5 GB archive leaves a partial file that looks complete, and starts again from
zero), and it reports with tqdm. Here a download streams into `<file>.part`, continues with an
HTTP Range request after an interruption (a server that ignores the range restarts it cleanly),
shows bytes on the caller's progress sink, and only a file whose checksum matched is renamed to
its final name. The checksums themselves are torchvision's helpers (`calculate_md5`) and ours
(`file_sha256`). Every kept download has a record beside it (`.<file>.verified.json`: the
checksum, or where none is published the URL and size, it was checked against), and is reused
only while today's source says the same; an unfinished `.part` is keyed the same way. A local
source (an absolute path, file://) is copied and checked like a download; the original is
never moved or removed. Unpacking is data.unpack.

Why the `.part` is not atomic.py's temporary (which every other file write uses): that one is
unique per writer and removed on any failure, right for a file written in one go; a download's
part must outlive a failure and be found by the next run to be continued, so its name is keyed
by what it is of (`<file>.<checksum key>.part`), not random. It is opened O_EXCL|O_NOFOLLOW
(appended to only when it is a plain file of one link), so a link planted under ROOT/.fetch/
never leads a write elsewhere; it is renamed to its final name only once its checksum matched.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import http.client
import json
import os
import stat
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from .._version import __version__
from ..atomic import atomic_write_text
from ..errors import FetchError
from ..identity import file_sha256
from ..names import inside
from ..runtime.progress import ProgressSink, null_progress
from .sources import Source, is_local, local_path
from .unpack import DEFAULT_MARGIN

USER_AGENT = f"safe-cache/{__version__}"
CHUNK = 1 << 20
TIMEOUT_S = 60
RECORD_SUFFIX = ".verified.json"
MIN_DOWNLOAD = 256 << 20  # any source may be this large (split files, miniatures)
MAX_UNSTATED = 64 << 30  # an archive whose size the spec does not state: at most 64 GiB
MAX_MARGIN = 1e6


def file_checksum(path: Path, algorithm: str) -> str:
    if algorithm == "md5":
        from torchvision.datasets.utils import calculate_md5

        return calculate_md5(path)
    return file_sha256(path)


def _open(url: str, offset: int):
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                  timeout=TIMEOUT_S)


def _one_line(reason: object) -> str:
    return " ".join(str(reason).split())[:300]


def _unreachable(source: Source, reason: object) -> FetchError:
    host = urlparse(source.url).netloc or source.url
    return FetchError(f"{source.file}: cannot reach {host} ({_one_line(reason)}). Check the"
                      f" network, or point this source at a mirror you can reach (--sources"
                      f" FILE); run again to resume.")


def _malformed(source: Source, exc: Exception) -> FetchError:
    host = urlparse(source.url).netloc or source.url
    return FetchError(f"{source.file}: {host} answered with a malformed HTTP response"
                      f" ({type(exc).__name__}: {_one_line(exc)[:120]}); the download was not"
                      f" used. Point the source at a mirror that works (--sources FILE).")


def _part_offset(part: Path) -> int:
    """How much of `part` can be continued: a plain file of ours (not a link, not hard-linked
    to a file elsewhere, which appending would write into); anything else is removed."""
    try:
        info = os.lstat(part)
    except FileNotFoundError:
        return 0
    if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
        return info.st_size
    part.unlink()
    return 0


def _open_part(part: Path, append: bool):
    """The part file for writing, never through a link: appended to only when `_part_offset`
    accepted it, else created afresh (O_EXCL). Not atomic.atomic_path: the part is kept when
    the download fails, to be continued (see the module docstring)."""
    if append:
        return open(os.open(part, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW), "ab")
    with contextlib.suppress(FileNotFoundError):
        part.unlink()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    return open(os.open(part, flags, 0o666), "wb")


def _response(source: Source, part: Path):
    """The open response and whether it continues `part` (206) or starts it afresh."""
    offset = _part_offset(part)
    try:
        return _open(source.url, offset), offset
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the range is past the end: the part is stale
            part.unlink()
            return _response(source, part)
        raise FetchError(f"{source.file}: {source.url} answered HTTP {exc.code}"
                         f" {_one_line(exc.reason)}. The source may have moved: point it at a"
                         f" mirror (--sources FILE) or fix the spec's url.") from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise _unreachable(source, getattr(exc, "reason", exc)) from exc
    except (http.client.HTTPException, ValueError) as exc:  # a bad status line, a bad URL
        raise _malformed(source, exc) from exc


def _too_big(source: Source, limit: int) -> FetchError:
    expected = f"about {source.approx_bytes:,}" if source.approx_bytes else "a file of its kind"
    return FetchError(f"{source.file}: the source serves more than {limit:,} bytes, far more"
                      f" than expected ({expected}); the download was removed. Point the source"
                      f" at a good copy (--sources FILE), or raise the bound with"
                      f" --unpack-margin.")


def _stream(source: Source, part: Path, progress: ProgressSink, label: str,
            limit: int) -> None:
    response, offset = _response(source, part)
    with response:
        resumed = offset and getattr(response, "status", 200) == 206
        if not resumed:
            offset = 0
        length = response.length
        total = offset + length if length is not None else 0
        if total > limit:
            raise _too_big(source, limit)
        task = progress.start(label, total, unit="B")
        progress.advance(task, offset)
        if resumed:
            progress.note(task, f"resumed at {offset:,} B")
        try:
            with _open_part(part, bool(resumed)) as out:
                written = offset
                while chunk := response.read(CHUNK):
                    written += len(chunk)
                    if written > limit:
                        out.close()
                        part.unlink()
                        raise _too_big(source, limit)
                    out.write(chunk)
                    progress.advance(task, len(chunk))
        except (http.client.IncompleteRead, ConnectionError, TimeoutError) as exc:
            of = f" of {total:,}" if total else ""
            raise FetchError(
                f"{source.file}: the download stopped at {part.stat().st_size:,}{of} bytes"
                f" ({type(exc).__name__}). Run the command again: it continues from"
                f" there.") from exc
        except http.client.HTTPException as exc:
            raise _malformed(source, exc) from exc
        except OSError as exc:  # a full disk: name the file (the CLI says how to go on)
            if exc.filename is None:
                exc.filename = str(part)
            raise
        finally:
            progress.finish(task)
    if total and part.stat().st_size != total:
        raise FetchError(f"{source.file}: the server closed the connection at"
                         f" {part.stat().st_size:,} of {total:,} bytes. Run the command again:"
                         f" it continues from there.")


def check_download(path: Path, source: Source) -> None:
    """Refuse a file whose checksum differs from the spec's; the bad file (a `.part` of ours)
    is removed."""
    if source.checksum is None:
        return
    algorithm, expected = source.checksum
    actual = file_checksum(path, algorithm)
    if actual != expected:
        path.unlink()
        raise FetchError(
            f"{source.file}: {algorithm} {actual} is not the expected {expected} (from"
            f" {source.url}); the file was removed. Run again to download it afresh; if it"
            f" fails again, the source serves a different file: point the source at a good"
            f" copy (--sources FILE) or correct the spec's {algorithm}.")


def _key(source: Source) -> str:
    """What a download is of: its checksum where one is published, else its URL."""
    text = ":".join(source.checksum) if source.checksum else source.url
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def part_path(source: Source, downloads: Path) -> Path:
    """Where an unfinished download of this source lives: keyed by what it is of, so a part
    left by a run whose source had another checksum (or URL) is never continued."""
    return inside(downloads, f"{source.file}.{_key(source)}.part", what="source file",
                  error=FetchError)


def record_path(final: Path) -> Path:
    return final.with_name(f".{final.name}{RECORD_SUFFIX}")


def write_record(final: Path, source: Source, verdict: str) -> None:
    """What a kept download was checked against: the checksum (or, where none is published,
    its size), and the verdict ('checksum', 'size', then 'unpacked' once it unpacked whole)."""
    record = {"file": source.file, "url": source.url, "key": _key(source),
              "checksum": list(source.checksum) if source.checksum else None,
              "bytes": final.stat().st_size, "verdict": verdict}
    atomic_write_text(record_path(final), json.dumps(record, indent=2) + "\n")


def reusable(final: Path, source: Source) -> bool:
    """A kept download is used again only when its record says it was checked against what
    today's source says (same checksum, or same URL where none is published) and its size
    is the one checked."""
    try:
        record = json.loads(record_path(final).read_text())
        return final.is_file() and record.get("key") == _key(source) and \
            record.get("checksum") == (list(source.checksum) if source.checksum else None) and \
            record.get("bytes") == final.stat().st_size
    except (OSError, ValueError, AttributeError):
        return False


def _adopted(final: Path, source: Source) -> bool:
    """A file at the final name without a record (put there by hand, or by an older
    safe-cache) is kept when it matches today's published checksum; anything else there is
    downloaded again (ROOT/.fetch/ is fetch's own; a local copy belongs in --sources)."""
    if source.checksum is None or not final.is_file() or final.is_symlink():
        return False
    if os.lstat(final).st_nlink != 1:
        return False
    if file_checksum(final, source.checksum[0]) != source.checksum[1]:
        return False
    write_record(final, source, "checksum")
    return True


def forget(final: Path) -> None:
    """Remove a download of ours and its record (both under ROOT/.fetch/)."""
    for path in (final, record_path(final)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _copy_local(source: Source, part: Path, progress: ProgressSink, label: str,
                limit: int) -> None:
    """A local source (an absolute path, file://) copied into `part`; the original is only
    read, never moved or removed."""
    original = local_path(source.url)
    if not original.is_file():
        raise FetchError(f"{source.file}: the local source {original} is not a file; point"
                         f" the source at the file (--sources FILE) and run again.")
    size = original.stat().st_size
    if size > limit:
        raise _too_big(source, limit)
    task = progress.start(label, size, unit="B")
    try:
        with open(original, "rb") as reader, _open_part(part, False) as out:
            while chunk := reader.read(CHUNK):
                out.write(chunk)
                progress.advance(task, len(chunk))
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(part)
        raise
    finally:
        progress.finish(task)


def download_limit(source: Source, margin: float = DEFAULT_MARGIN) -> int:
    """The most bytes a source may serve: its expected size times the margin, at least
    MIN_DOWNLOAD (archives of unstated size: MAX_UNSTATED), so a server that streams without
    end fills no disk."""
    if source.approx_bytes:
        return max(MIN_DOWNLOAD, int(min(margin, MAX_MARGIN) * source.approx_bytes))
    return MIN_DOWNLOAD if source.to else MAX_UNSTATED


def download(source: Source, downloads: Path, progress: ProgressSink = null_progress,
             label: str | None = None, limit: int | None = None) -> Path:
    """The source's file under `downloads`, fetched (or continued) and checksummed. A file
    kept from an earlier run is reused only when its record matches today's source; a file
    without one (or with another's) is ours to remove, so it is downloaded again. At most
    `limit` bytes (default: `download_limit`)."""
    limit = limit or download_limit(source)
    downloads.mkdir(parents=True, exist_ok=True)
    final = inside(downloads, source.file, what="source file", error=FetchError)
    if reusable(final, source):
        return final
    if _adopted(final, source):
        return final
    forget(final)
    part = part_path(source, downloads)
    for stale in downloads.glob(f"{glob.escape(source.file)}.*.part"):
        if stale != part:  # a part of another checksum or URL: never continued
            stale.unlink()
    if is_local(source.url):
        _copy_local(source, part, progress, label or source.file, limit)
    else:
        _stream(source, part, progress, label or source.file, limit)
    check_download(part, source)
    part.rename(final)
    write_record(final, source, "checksum" if source.checksum else "size")
    return final
