"""`datasets fetch`: from public sources to a checked, CoOp-layout dataset folder.

For each dataset: if the reader already accepts its folder (split sizes as the spec says, every
image present) nothing happens. Otherwise each source whose targets are not there yet is
downloaded (resumably, checksummed: data.download), unpacked into a scratch folder, and only its
complete targets are moved into a staged copy of the dataset folder; a spec `build` step runs
(UCF101's middle frames); the staged folder is then moved into place in one rename (or, where the
user already holds part of the folder, target by target), and the reader checks the result
before fetch reports success. Everything in flight lives under `<root>/.fetch/<dataset>/`, which
no reader looks at, so a run killed at any point leaves nothing half-unpacked where a dataset is
expected, and running it again resumes. What no public source offers (Stanford Cars' images,
ImageNet) is the spec's `manual` text: fetch says where to put which files and checks them when
they are there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..atomic import atomic_write_text, atomic_write_with
from ..errors import DatasetError, FetchError
from ..runtime.cluster import auto_workers
from ..runtime.progress import ProgressSink, null_progress
from .datasets import DatasetSpec, list_specs, load_spec, open_dataset
from .download import download, unpack
from .midframes import build_midframes
from .sources import Source, SourceOverrides, load_overrides, parse_sources

WORK_DIR = ".fetch"
LEDGER = ".safe-cache-fetch.json"
Builder = Callable[[DatasetSpec, Path, Path, ProgressSink, int], None]
BUILDERS: dict[str, Builder] = {"ucf101_midframes": build_midframes}  # a spec's `build`


def fetch_spec(name: str, overrides: SourceOverrides) -> DatasetSpec:
    """The shipped spec (by name; a spec file by path) with the sources file's replacements
    (sources, split sizes) applied."""
    spec = load_spec(name)
    entry = overrides.get(spec.name)
    if not entry:
        return spec
    where = f"sources file {overrides.path} [{spec.name}]"
    changes: dict[str, Any] = {}
    if "sources" in entry:
        changes["sources"] = parse_sources(entry["sources"], where)
    if "split_sizes" in entry:
        changes["split_sizes"] = dict(entry["split_sizes"])
    return dataclasses.replace(spec, **changes)


def _check_build(spec: DatasetSpec) -> None:
    if spec.build and spec.build not in BUILDERS:
        raise DatasetError(f"Dataset spec {spec.path}: unknown build step '{spec.build}'; known:"
                           f" {', '.join(sorted(BUILDERS))}.")


def problems_of(spec: DatasetSpec, root: Path) -> list[str]:
    """What keeps the folder from being the dataset the spec describes; [] when it is."""
    if not (root / spec.folder).is_dir():
        return [f"no folder {root / spec.folder}"]
    try:
        dataset = open_dataset(spec, root)
    except DatasetError as exc:
        return [str(exc)]
    problems = _size_problems(spec, {k: len(v) for k, v in dataset.splits.items() if v})
    missing = [entry.path for entries in dataset.splits.values() for entry in entries
               if not os.path.isfile(dataset.image_path(entry))]
    if missing:
        problems.append(f"{len(missing)} images listed by the split are missing under"
                        f" {dataset.image_root} (e.g. {missing[0]})")
    return problems


def _size_problems(spec: DatasetSpec, sizes: dict[str, int]) -> list[str]:
    """Split sizes against the spec's: per split where the spec lists the splits the reader
    made, else the total (ImageNet's spec counts the 1.28M train images its split file divides
    into train and val)."""
    expected = spec.split_sizes
    if not expected:
        return []
    if set(expected) == set(sizes):
        return [f"its {split} split has {sizes[split]:,} images, the spec says {size:,}"
                for split, size in expected.items() if sizes[split] != size]
    have, want = sum(sizes.values()), sum(expected.values())
    return [] if have == want else [f"its splits hold {have:,} images, the spec says {want:,}"]


@dataclass
class SourceState:
    source: Source
    state: str  # "present", "downloaded", "partial", "to download"
    have_bytes: int = 0


@dataclass
class DatasetPlan:
    """What fetch would do for one dataset (the --dry-run listing)."""

    spec: DatasetSpec
    status: str  # "present", "fetch", "manual"
    sources: list[SourceState] = field(default_factory=list)
    manual: str = ""

    @property
    def _todo(self) -> list[SourceState]:
        return [s for s in self.sources if s.state in ("partial", "to download")]

    @property
    def download_bytes(self) -> int:
        """Bytes still to download, over the sources whose size the spec knows."""
        return sum((s.source.approx_bytes or 0) - s.have_bytes for s in self._todo)

    @property
    def disk_bytes(self) -> int:
        """About the disk a fetch needs: archives plus their unpacked contents (images barely
        compress), less what is already downloaded; sources of unknown size not counted."""
        return sum(2 * (s.source.approx_bytes or 0) - s.have_bytes
                   for s in self.sources if s.state != "present")

    @property
    def unknown_sizes(self) -> list[str]:
        """Files still to fetch whose size the spec does not know (split files, mostly)."""
        return [s.source.file for s in self.sources
                if s.state != "present" and s.source.approx_bytes is None]

    def as_json(self) -> dict[str, Any]:
        return {"dataset": self.spec.name, "folder": self.spec.folder, "status": self.status,
                "download_bytes": self.download_bytes, "disk_bytes": self.disk_bytes,
                "unknown_sizes": self.unknown_sizes,
                "manual": self.manual or None,
                "sources": [{"file": s.source.file, "url": s.source.url, "state": s.state,
                             "provides": s.source.provides, "approx_bytes": s.source.approx_bytes,
                             "checksum": s.source.checksum[0] if s.source.checksum else None}
                            for s in self.sources]}


def _work(root: Path, spec: DatasetSpec) -> Path:
    return root / WORK_DIR / spec.name


def _source_state(source: Source, root: Path, spec: DatasetSpec) -> SourceState:
    work, folder = _work(root, spec), root / spec.folder
    stage = work / "stage" / spec.folder
    if all(t != "." and ((folder / t).exists() or (stage / t).exists())
           for t in source.targets):  # "." (the whole folder) is there only when complete
        return SourceState(source, "present")
    if (work / "downloads" / source.file).is_file():
        return SourceState(source, "downloaded")
    part = work / "downloads" / (source.file + ".part")
    if part.is_file():
        return SourceState(source, "partial", part.stat().st_size)
    return SourceState(source, "to download")


def resolve_names(names: list[str] | tuple[str, ...]) -> list[str]:
    """Dataset names (or spec files) checked up front, all unknown ones in one error; 'all'
    expanded to every shipped dataset."""
    known = [spec.name for spec in list_specs()]
    if list(names) == ["all"]:
        return known
    unknown = [name for name in names if name not in known and not Path(name).is_file()]
    if unknown:
        raise DatasetError(f"Unknown dataset(s) {', '.join(unknown)}. Known: {', '.join(known)}"
                           f" (or 'all', or the path of a spec file with `sources`).")
    return list(dict.fromkeys(names))


def plan_fetch(names: list[str], root: str | Path, *,
               sources: str | Path | None = None) -> list[DatasetPlan]:
    """What fetch would download, from where, and the disk it needs; touches nothing."""
    overrides, root = load_overrides(sources), Path(root)
    plans = []
    for name in resolve_names(names):
        spec = fetch_spec(name, overrides)
        if not problems_of(spec, root):
            plans.append(DatasetPlan(spec, "present"))
            continue
        states = [_source_state(s, root, spec) for s in spec.sources]
        status = "fetch" if spec.sources else "manual"
        plans.append(DatasetPlan(spec, status, states, spec.manual))
    return plans


@dataclass
class FetchReport:
    dataset: str
    status: str  # "present" (left alone) or "fetched"
    folder: str
    downloaded: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _place(source_dir: Path, target: Path) -> None:
    """Move a complete unpacked item to its target ('.' merges a folder's children)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        if target.is_dir() and source_dir.is_dir():
            for child in source_dir.iterdir():
                _place(child, target / child.name)
            return
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    source_dir.rename(target)


def _fetch_source(source: Source, spec: DatasetSpec, work: Path, stage: Path,
                  progress: ProgressSink, keep_archives: bool) -> None:
    path = download(source, work / "downloads", progress, f"{spec.name}: {source.file}")
    if source.to:
        atomic_write_with(stage / source.to, lambda temporary: shutil.copy2(path, temporary))
    else:
        scratch = work / "unpacked" / source.file
        shutil.rmtree(scratch, ignore_errors=True)  # a half unpack from a killed run
        unpack(path, scratch)
        for nested in source.nested:
            inner = scratch / nested
            if not inner.is_file():
                raise FetchError(f"{source.file}: the archive holds no {nested} (its layout"
                                 f" changed?); the spec's `nested` must name the inner archive.")
            unpack(inner, inner.parent)
            inner.unlink()
        for inner, dest in source.unpack:
            if not (scratch / inner).exists():
                found = sorted(p.name for p in scratch.iterdir())[:8]
                raise FetchError(f"{source.file}: the archive holds no '{inner}' (top level:"
                                 f" {found}); the spec's `unpack` must name its inner paths.")
            _place(scratch / inner, stage / dest)
        shutil.rmtree(scratch)
    if not keep_archives:
        path.unlink()


def _move_into_place(stage: Path, folder: Path) -> None:
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        stage.rename(folder)  # one rename: the dataset appears complete or not at all
        return
    for item in stage.iterdir():
        _place(item, folder / item.name)


def _write_ledger(folder: Path, spec: DatasetSpec, fetched: list[Source]) -> None:
    ledger = {"safe_cache": __version__, "dataset": spec.name,
              "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "sources": [{"file": s.file, "url": s.url,
                           "checksum": dict([s.checksum]) if s.checksum else None}
                          for s in fetched]}
    atomic_write_text(folder / LEDGER, json.dumps(ledger, indent=2) + "\n")


def _clean(root: Path, spec: DatasetSpec, keep_archives: bool) -> None:
    """Drop the work folder of a complete dataset (its downloads too, unless kept)."""
    work = _work(root, spec)
    for part in ("stage", "unpacked") if keep_archives else ("",):
        shutil.rmtree(work / part, ignore_errors=True)
    if (root / WORK_DIR).is_dir() and not any((root / WORK_DIR).iterdir()):
        (root / WORK_DIR).rmdir()


def fetch_dataset(spec: DatasetSpec, root: Path, *, keep_archives: bool = False,
                  progress: ProgressSink = null_progress, workers: int = 1) -> FetchReport:
    """Fetch one dataset (see the module docstring); raises FetchError with the fix."""
    started = time.perf_counter()
    if not problems_of(spec, root):
        _clean(root, spec, keep_archives)
        return FetchReport(spec.name, "present", str(root / spec.folder))
    if not spec.sources:
        raise FetchError(f"{spec.name}: no public download; {spec.manual or spec.split_source}")
    work, folder = _work(root, spec), root / spec.folder
    stage = work / "stage" / spec.folder
    stage.mkdir(parents=True, exist_ok=True)
    todo = [s for s in spec.sources if _source_state(s, root, spec).state != "present"]
    for source in todo:
        _fetch_source(source, spec, work, stage, progress, keep_archives)
    if spec.build:
        BUILDERS[spec.build](spec, stage, folder, progress, workers)
    _move_into_place(stage, folder)
    problems = problems_of(spec, root)
    if problems:
        manual = f" {spec.manual}" if spec.manual else ""
        raise FetchError(f"{spec.name}: fetched {[s.file for s in todo] or 'nothing new'}, but"
                         f" {folder} is not complete yet: {problems[0].rstrip('.')}.{manual}")
    _write_ledger(folder, spec, todo)
    _clean(root, spec, keep_archives)
    return FetchReport(spec.name, "fetched", str(folder), [s.file for s in todo],
                       round(time.perf_counter() - started, 2))


def fetch(names: list[str], root: str | Path, *, sources: str | Path | None = None,
          keep_archives: bool = False, progress: ProgressSink = null_progress,
          workers: int | None = None) -> list[FetchReport]:
    """Fetch every named dataset under `root`; one failure does not stop the others, and the
    failures are raised together at the end (one line each)."""
    overrides, root = load_overrides(sources), Path(root)
    specs = [fetch_spec(name, overrides) for name in resolve_names(names)]
    for spec in specs:
        _check_build(spec)
    workers = auto_workers(workers)
    reports, failures = [], []
    for spec in specs:
        try:
            reports.append(fetch_dataset(spec, root, keep_archives=keep_archives,
                                         progress=progress, workers=workers))
        except FetchError as exc:
            failures.append(str(exc))
    if failures:
        raise FetchError("\n".join(failures))
    return reports
