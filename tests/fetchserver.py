"""A local HTTP mirror for `datasets fetch` tests: miniature archives with the real inner layouts.

Each archive is built from the shipped spec's own `unpack` map (so a wrong inner path in a spec
fails the tests), filled from a miniature dataset folder; the server speaks HTTP Range, records
every request, and can cut one response halfway to test resuming.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath

from safe_cache.data.datasets import load_spec, open_dataset
from safe_cache.data.sources import Source


@dataclass
class Mirror:
    """What the server serves (name -> bytes) and what it was asked (name, Range header)."""

    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    cut_once: set[str] = field(default_factory=set)
    url: str = ""

    def asked(self, name: str) -> list[str | None]:
        return [rng for file, rng in self.requests if file == name]


def _handler(mirror: Mirror) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's name
            name = self.path.lstrip("/")
            wanted = self.headers.get("Range")
            mirror.requests.append((name, wanted))
            data = mirror.files.get(name)
            if data is None:
                self.send_error(404)
                return
            start = int(wanted.split("=")[1].split("-")[0]) if wanted else 0
            body = data[start:]
            self.send_response(206 if wanted else 200)
            self.send_header("Content-Length", str(len(body)))
            if wanted:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if name in mirror.cut_once:  # the connection drops halfway
                mirror.cut_once.discard(name)
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    return Handler


def serve(mirror: Mirror) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(mirror))
    mirror.url = f"http://127.0.0.1:{server.server_address[1]}"
    # shutdown() waits for the loop's next poll: 0.5 s by default, at every module's end
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                     daemon=True).start()
    return server


def _add_tree(add, folder: Path, inner: str) -> None:
    """Add `folder` (or a placeholder when the miniature lacks it) under the archive path."""
    if folder.is_file():
        add(inner, folder.read_bytes())
    elif folder.is_dir():
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                add(f"{inner}/{path.relative_to(folder).as_posix()}", path.read_bytes())
    else:  # e.g. dtd's labels/: the reader does not need it, the layout has it
        add(f"{inner}/README.txt", b"placeholder\n")


def pack(members: dict[str, bytes], name: str) -> bytes:
    """An archive of the format its file name says (.zip, .tar, .tar.gz / .tgz)."""
    buffer = io.BytesIO()
    if name.endswith(".zip"):
        with zipfile.ZipFile(buffer, "w") as archive:
            for path, data in members.items():
                archive.writestr(path, data)
    else:
        mode = "w" if name.endswith(".tar") else "w:gz"
        with tarfile.open(fileobj=buffer, mode=mode) as archive:
            for path, data in members.items():
                info = tarfile.TarInfo(path)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def archive_for(source: Source, folder: Path, name: str) -> bytes:
    """The miniature of `source`'s archive: each unpack target's content from the miniature
    dataset `folder`, at the spec's inner path; nested archives built inside."""
    members: dict[str, bytes] = {}
    nested = {PurePosixPath(n): {} for n in source.nested}
    for inner, dest in source.unpack:
        inner_path = PurePosixPath(inner)
        host = next((n for n in nested if inner_path.is_relative_to(n.parent)), None)
        if host is not None:
            target, inner = nested[host], str(inner_path.relative_to(host.parent))
        else:
            target = members
        _add_tree(target.__setitem__, folder / dest if dest != "." else folder, inner)
    for path, contents in nested.items():
        members[str(path)] = pack(contents, path.name)
    return pack(members, name)


def mirror_dataset(mirror: Mirror, name: str, mini_root: Path, *,
                   rename: dict[str, str] | None = None) -> dict:
    """Serve `name`'s sources built from the miniature under `mini_root`; returns the sources-file
    entry pointing at them (with the miniature's split sizes). `rename` swaps a file name
    (UCF101.rar -> UCF101.zip: no RAR writer here)."""
    spec = load_spec(name)
    folder = mini_root / spec.folder
    entries = []
    for source in spec.sources:
        file = (rename or {}).get(source.file, source.file)
        if source.to:  # a plain file: the miniature's, or a placeholder where it has none
            plain = folder / source.to
            data = plain.read_bytes() if plain.is_file() else b"placeholder\n"
        else:
            data = archive_for(source, folder, file)
        mirror.files[f"{name}/{file}"] = data
        entry = {"url": f"{mirror.url}/{name}/{file}", "file": file,
                 "md5": hashlib.md5(data).hexdigest()}
        entry.update({"to": source.to} if source.to else {"unpack": dict(source.unpack)})
        if source.nested:
            entry["nested"] = list(source.nested)
        entries.append(entry)
    if spec.split_file:  # the split's sizes (UCF101's miniature has videos, not frames yet)
        split = json.loads((folder / spec.split_file).read_text())
        sizes = {k: len(split[k]) for k in ("train", "val", "test") if split.get(k)}
    else:
        sizes = {k: len(v) for k, v in open_dataset(spec, mini_root).splits.items() if v}
    return {"sources": entries, "split_sizes": sizes}


def write_sources(path: Path, entries: dict[str, dict]) -> Path:
    path.write_text(json.dumps(entries))
    return path
