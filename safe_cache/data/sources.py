"""Where a dataset's files come from, as data: the `sources` list of a dataset spec.

Each source is one file at one URL with its checksum and what it provides: either an archive
whose inner paths are unpacked to paths of the dataset folder (`unpack`), or a plain file put at
one path of it (`to`). Sources live in pipelines/*.json beside the layout they produce, not in
code, so a new mirror or a moved archive is a one-line change. A sources file (`--sources FILE`
or $SAFE_CACHE_SOURCES) overrides them per dataset, for a local mirror, an internal copy on a
shared disk, or the miniature archives the tests serve; it may also restate `split_sizes` for a
mirror that holds a subset.
"""

from __future__ import annotations

import json
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from ..errors import DatasetError
from ..names import plain_name_problem, relative_path, relative_path_problem
from ..records import type_problem

SOURCES_ENV = "SAFE_CACHE_SOURCES"
_KEYS = {"url", "file", "provides", "md5", "sha256", "approx_bytes", "unpack", "to", "nested"}
_OVERRIDE_KEYS = {"sources", "split_sizes"}


@dataclass(frozen=True)
class Source:
    """One downloadable file, its checksum, and where its contents go in the dataset folder."""

    url: str
    file: str  # the name it is saved under (default: the URL's last part)
    provides: str = ""  # for people: "images", "split file", ...
    md5: str | None = None
    sha256: str | None = None
    approx_bytes: int | None = None  # for --dry-run's disk estimate, when the spec knows it
    unpack: tuple[tuple[str, str], ...] = ()  # (path inside the archive, path in the folder)
    to: str | None = None  # a plain file: its path in the dataset folder
    nested: tuple[str, ...] = ()  # archives inside the archive, unpacked in place first

    @property
    def targets(self) -> list[str]:
        """The dataset-folder paths this source provides (all present: nothing to fetch)."""
        return [self.to] if self.to else [dest for _, dest in self.unpack]

    @property
    def checksum(self) -> tuple[str, str] | None:
        """(algorithm, hex digest) the download must match, or None where none is published."""
        if self.sha256:
            return "sha256", self.sha256.lower()
        if self.md5:
            return "md5", self.md5.lower()
        return None


_HINTS = typing.get_type_hints(Source)
_HEX = re.compile(r"[0-9a-fA-F]+")


def is_local(url: str) -> bool:
    """A source on this machine (an absolute path or a file:// URL): copied, never moved."""
    return url.startswith("/") or urlparse(url).scheme == "file"


def local_path(url: str) -> Path:
    """The file a local source names."""
    return Path(url2pathname(urlparse(url).path)) if urlparse(url).scheme == "file" \
        else Path(url)


def _field_problem(key: str, value: Any) -> str | None:
    """Why one source field's value is wrong (type, then value), None when it is right."""
    hint = dict[str, str] if key == "unpack" else _HINTS[key]
    problem = type_problem(value, hint)
    if problem:
        return problem
    if key in ("md5", "sha256") and value is not None:
        digits = 32 if key == "md5" else 64
        if len(value) != digits or not _HEX.fullmatch(value):
            return f"is {value!r}, not {digits} hex digits"
    if key == "approx_bytes" and value is not None and value < 0:
        return f"is {value}, not a size in bytes (>= 0)"
    if key == "file":
        return plain_name_problem(value)
    if key == "to" and value is not None:
        return relative_path_problem(value)
    if key == "nested":
        return next((f"[{i}] {p}" for i, v in enumerate(value)
                     if (p := relative_path_problem(v))), None)
    if key == "unpack":
        if not value:
            return "is empty: name at least one inner path -> folder path"
        for inner, dest in value.items():
            problem = relative_path_problem(inner)
            if problem:
                return f"has an inner path {inner!r} that {problem}"
            problem = relative_path_problem(dest, allow_dot=True)
            if problem:
                return f"has a target {dest!r} (for {inner!r}) that {problem}"
    return None


def _url_ok(url: str) -> bool:
    if url.startswith("/"):
        return "\x00" not in url
    try:
        parts = urlparse(url)
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError:
        return False
    if any(ord(c) < 33 for c in url):
        return False
    return parts.scheme == "file" or (parts.scheme in ("http", "https") and bool(parts.hostname))


def parse_source(raw: dict[str, Any], where: str) -> Source:
    """One `sources` entry checked against the schema (Source's fields and their types, then
    their values: a URL or an absolute path, hex checksums, plain file names, relative inner
    paths, exactly one of `unpack` / `to`); each error names the file, dataset and field."""
    if not isinstance(raw, dict):
        raise DatasetError(f"{where}: each source must be a JSON object, not {raw!r:.60}.")
    unknown = set(raw) - _KEYS
    if unknown:
        raise DatasetError(f"{where}: unknown source fields {sorted(unknown)}; known:"
                           f" {sorted(_KEYS)}.")
    url = raw.get("url")
    if not isinstance(url, str) or not _url_ok(url):
        raise DatasetError(f"{where}: source url {url!r:.200} must be an http(s):// or file://"
                           f" URL (host and port well formed), or the absolute path of a local"
                           f" file.")
    for key, value in raw.items():
        problem = _field_problem(key, value) if key != "url" else None
        if problem:
            raise DatasetError(f"{where}: source {url} field '{key}' {problem}.")
    if bool(raw.get("unpack")) == bool(raw.get("to")):
        raise DatasetError(f"{where}: source {url} needs exactly one of 'unpack' (an archive:"
                           f" inner path -> folder path) or 'to' (a plain file's path).")
    file = raw.get("file") or PurePosixPath(urlparse(url).path).name
    problem = plain_name_problem(file)
    if problem:
        raise DatasetError(f"{where}: source {url} saves as {file!r}, which {problem}; give it"
                           f" a plain 'file' name.")
    return Source(
        url=url, file=file, provides=raw.get("provides", ""), md5=raw.get("md5"),
        sha256=raw.get("sha256"), approx_bytes=raw.get("approx_bytes"),
        unpack=tuple((relative_path(inner, "archive path", DatasetError),
                      relative_path(dest, "target", DatasetError, allow_dot=True))
                     for inner, dest in (raw.get("unpack") or {}).items()),
        to=relative_path(raw["to"], "target", DatasetError) if raw.get("to") else None,
        nested=tuple(relative_path(n, "nested archive", DatasetError)
                     for n in raw.get("nested", ())))


def check_split_sizes(value: Any, where: str) -> dict[str, int]:
    """A sources file's `split_sizes`, checked as a spec's are."""
    from .schema import value_problem

    problem = type_problem(value, dict[str, int]) or value_problem("split_sizes", value)
    if problem:
        raise DatasetError(f"{where}: field 'split_sizes' {problem}.")
    return dict(value)


def parse_sources(raw: list[Any], where: str) -> tuple[Source, ...]:
    if not isinstance(raw, list):
        raise DatasetError(f"{where}: 'sources' must be a list of objects.")
    sources = tuple(parse_source(item, where) for item in raw)
    files = [s.file for s in sources]
    for file in files:
        if files.count(file) > 1:
            raise DatasetError(f"{where}: two sources save as '{file}'; give them distinct"
                               f" 'file' names.")
    return sources


@dataclass(frozen=True)
class SourceOverrides:
    """Per-dataset replacements for the specs' sources (and split sizes), from one JSON file."""

    path: Path | None = None
    entries: tuple[tuple[str, dict[str, Any]], ...] = ()

    def get(self, name: str) -> dict[str, Any] | None:
        return dict(self.entries).get(name)


def load_overrides(path: str | Path | None = None) -> SourceOverrides:
    """The sources file given (--sources), else $SAFE_CACHE_SOURCES, else none.

    Its form: {"food101": {"sources": [...], "split_sizes": {...}}, ...}; each sources list is
    checked like a spec's, so a typo fails here, before anything downloads.
    """
    path = path or os.environ.get(SOURCES_ENV) or None
    if path is None:
        return SourceOverrides()
    path = Path(path).expanduser()
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: not UTF-8, not JSON
        raise DatasetError(f"Sources file {path} is not readable JSON: {exc!s:.200}. Fix it, or"
                           f" unset {SOURCES_ENV} / drop --sources.") from exc
    if not isinstance(raw, dict):
        raise DatasetError(f"Sources file {path} must map dataset names to objects.")
    for name, entry in raw.items():
        where = f"sources file {path} [{name}]"
        if not isinstance(entry, dict) or set(entry) - _OVERRIDE_KEYS:
            raise DatasetError(f"{where}: each entry is an object with keys among"
                               f" {sorted(_OVERRIDE_KEYS)}.")
        parse_sources(entry.get("sources", []), where)
        if "split_sizes" in entry:
            check_split_sizes(entry["split_sizes"], where)
    return SourceOverrides(path, tuple(sorted(raw.items())))
