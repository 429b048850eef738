"""Download one source (resumable, checksummed) and unpack an archive safely.

Why not torchvision's `download_url`: it writes straight to the final name (an interrupted
download of a 5 GB archive leaves a partial file that looks complete, and starts again from
zero), and it reports with tqdm. Here a download streams into `<file>.part`, continues with an
HTTP Range request after an interruption (a server that ignores the range restarts it cleanly),
shows bytes on the caller's progress sink, and only a file whose checksum matched is renamed to
its final name. The checksums themselves are torchvision's helpers (`calculate_md5`) and ours
(`file_sha256`). Tar archives unpack through the standard library with its "data" filter (no
member may leave the target folder, no devices or links out); zip and single-file compression
through torchvision's `extract_archive`; RAR through an external tool when one is installed.
"""

from __future__ import annotations

import http.client
import shutil
import subprocess
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from .._version import __version__
from ..errors import FetchError
from ..identity import file_sha256
from ..runtime.progress import ProgressSink, null_progress
from .sources import Source

USER_AGENT = f"safe-cache/{__version__}"
CHUNK = 1 << 20
TIMEOUT_S = 60


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


def _unreachable(source: Source, reason: object) -> FetchError:
    host = urlparse(source.url).netloc or source.url
    return FetchError(f"{source.file}: cannot reach {host} ({reason}). Check the network, or"
                      f" point this source at a mirror you can reach (--sources FILE); run"
                      f" again to resume.")


def _response(source: Source, part: Path):
    """The open response and whether it continues `part` (206) or starts it afresh."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        return _open(source.url, offset), offset
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the range is past the end: the part is stale
            part.unlink()
            return _response(source, part)
        raise FetchError(f"{source.file}: {source.url} answered HTTP {exc.code} {exc.reason}."
                         f" The source may have moved: point it at a mirror (--sources FILE)"
                         f" or fix the spec's url.") from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise _unreachable(source, getattr(exc, "reason", exc)) from exc


def _stream(source: Source, part: Path, progress: ProgressSink, label: str) -> None:
    response, offset = _response(source, part)
    with response:
        resumed = offset and getattr(response, "status", 200) == 206
        if not resumed:
            offset = 0
        length = response.length
        total = offset + length if length is not None else 0
        task = progress.start(label, total)
        progress.advance(task, offset)
        if resumed:
            progress.note(task, f"resumed at {offset:,} B")
        try:
            with open(part, "ab" if resumed else "wb") as out:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    progress.advance(task, len(chunk))
        except (http.client.IncompleteRead, ConnectionError, TimeoutError) as exc:
            raise FetchError(
                f"{source.file}: the download stopped at {part.stat().st_size:,} of"
                f" {total or '?':,} bytes ({type(exc).__name__}). Run the command again: it"
                f" continues from there.") from exc
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
    """Refuse a file whose checksum differs from the spec's; the bad file is removed."""
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


def download(source: Source, downloads: Path, progress: ProgressSink = null_progress,
             label: str | None = None) -> Path:
    """The source's file under `downloads`, fetched (or continued) and checksummed."""
    downloads.mkdir(parents=True, exist_ok=True)
    final = downloads / source.file
    if final.is_file():
        return final  # renamed to its final name only after its checksum matched
    part = final.with_name(final.name + ".part")
    _stream(source, part, progress, label or source.file)
    check_download(part, source)
    part.rename(final)
    return final


def _unpack_rar(archive: Path, into: Path) -> None:
    for tool, args in (("unrar", ["x", "-o+", "-idq"]), ("bsdtar", ["-xf"]), ("7z", ["x", "-y"])):
        binary = shutil.which(tool)
        if binary is None:
            continue
        out = [f"-o{into}"] if tool == "7z" else []
        target = [str(into) + "/"] if tool == "unrar" else []
        cwd = into if tool == "bsdtar" else None
        subprocess.run([binary, *args, str(archive), *out, *target], check=True, cwd=cwd)
        return
    raise FetchError(
        f"{archive.name} is a RAR archive and no RAR tool is installed (unrar, bsdtar or 7z:"
        f" e.g. `apt install libarchive-tools`). Install one and run again (the download is"
        f" kept), or unpack it yourself where the spec's `unpack` says.")


def unpack(archive: Path, into: Path) -> None:
    """Unpack `archive` into the folder `into` (created); members cannot leave it."""
    into.mkdir(parents=True, exist_ok=True)
    try:
        if archive.suffix.lower() == ".rar":
            _unpack_rar(archive, into)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                tar.extractall(into, filter="data")
        else:
            from torchvision.datasets.utils import extract_archive

            extract_archive(str(archive), str(into))
    except (tarfile.TarError, RuntimeError, EOFError, subprocess.CalledProcessError) as exc:
        raise FetchError(f"{archive.name} could not be unpacked ({exc}). Delete it and run"
                         f" again to download it afresh.") from exc
