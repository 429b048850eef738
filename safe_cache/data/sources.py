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
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from ..errors import DatasetError

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


def _relative(path: str, what: str, where: str) -> str:
    """A relative path that stays inside its folder ('.' allowed for the folder itself)."""
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts:
        raise DatasetError(f"{where}: {what} '{path}' must be a relative path inside the folder.")
    return str(pure)


def parse_source(raw: dict[str, Any], where: str) -> Source:
    """One `sources` entry checked: known keys, a URL, exactly one of `unpack` / `to`."""
    if not isinstance(raw, dict):
        raise DatasetError(f"{where}: each source must be a JSON object, not {raw!r}.")
    unknown = set(raw) - _KEYS
    if unknown:
        raise DatasetError(f"{where}: unknown source fields {sorted(unknown)}; known:"
                           f" {sorted(_KEYS)}.")
    url = raw.get("url")
    if not url or urlparse(url).scheme not in ("http", "https", "file"):
        raise DatasetError(f"{where}: source url {url!r} must be an http(s):// or file:// URL.")
    if bool(raw.get("unpack")) == bool(raw.get("to")):
        raise DatasetError(f"{where}: source {url} needs exactly one of 'unpack' (an archive:"
                           f" inner path -> folder path) or 'to' (a plain file's path).")
    unpack = tuple((_relative(inner, "archive path", where), _relative(dest, "target", where))
                   for inner, dest in (raw.get("unpack") or {}).items())
    return Source(
        url=url, file=raw.get("file") or PurePosixPath(urlparse(url).path).name,
        provides=raw.get("provides", ""), md5=raw.get("md5"), sha256=raw.get("sha256"),
        approx_bytes=raw.get("approx_bytes"), unpack=unpack,
        to=_relative(raw["to"], "target", where) if raw.get("to") else None,
        nested=tuple(_relative(n, "nested archive", where) for n in raw.get("nested", ())))


def parse_sources(raw: list[Any], where: str) -> tuple[Source, ...]:
    if not isinstance(raw, list):
        raise DatasetError(f"{where}: 'sources' must be a list of objects.")
    return tuple(parse_source(item, where) for item in raw)


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
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"Sources file {path} is not readable JSON: {exc}. Fix it, or unset"
                           f" {SOURCES_ENV} / drop --sources.") from exc
    if not isinstance(raw, dict):
        raise DatasetError(f"Sources file {path} must map dataset names to objects.")
    for name, entry in raw.items():
        where = f"sources file {path} [{name}]"
        if not isinstance(entry, dict) or set(entry) - _OVERRIDE_KEYS:
            raise DatasetError(f"{where}: each entry is an object with keys among"
                               f" {sorted(_OVERRIDE_KEYS)}.")
        parse_sources(entry.get("sources", []), where)
    return SourceOverrides(path, tuple(sorted(raw.items())))
