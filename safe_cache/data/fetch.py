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
import filecmp
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..atomic import atomic_write_text, atomic_write_with
from ..errors import ArchiveError, DatasetError, FetchError
from ..names import inside, within
from ..runtime.cluster import auto_workers
from ..runtime.progress import ProgressSink, null_progress
from .datasets import DatasetSpec, list_specs, load_spec, open_dataset, reading_only
from .download import download, download_limit, forget, part_path, reusable, write_record
from .midframes import build_midframes
from .sources import Source, SourceOverrides, check_split_sizes, load_overrides, parse_sources
from .unpack import DEFAULT_MARGIN, UnpackLimits, unpack

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
        changes["split_sizes"] = check_split_sizes(entry["split_sizes"], where)
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
        with reading_only():  # a check writes nothing (not even a generated split)
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
                if s.state in ("partial", "to download") and s.source.approx_bytes is None]

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
    """ROOT/.fetch/<name>: everything in flight, all of it ours (checked inside the root)."""
    return inside(root, WORK_DIR, spec.name, what=f"{spec.name}: the fetch folder",
                  error=FetchError)


def _check_folder_name(spec: DatasetSpec) -> None:
    """A dataset folder never lies under ROOT/.fetch/ (fetch's own, which it removes)."""
    if spec.folder.split("/")[0] == WORK_DIR:
        raise FetchError(f"{spec.name}: the spec's folder {spec.folder!r} lies in {WORK_DIR}/,"
                         f" fetch's work folder, which it removes when done; give the dataset"
                         f" a folder of its own.")


def _folder(root: Path, spec: DatasetSpec) -> Path:
    """ROOT/<folder>, checked to resolve inside the root (no symlink leads fetch out) and not
    under ROOT/.fetch/."""
    _check_folder_name(spec)
    return within(root, spec.folder, f"{spec.name}: the dataset folder", FetchError)


def _source_state(source: Source, root: Path, spec: DatasetSpec) -> SourceState:
    work, folder = _work(root, spec), root / spec.folder
    stage = work / "stage" / spec.folder
    if all(t != "." and ((folder / t).exists() or (stage / t).exists())
           for t in source.targets):  # "." (the whole folder) is there only when complete
        return SourceState(source, "present")
    downloads = work / "downloads"
    if reusable(downloads / source.file, source):
        return SourceState(source, "downloaded")
    part = part_path(source, downloads)
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
    status: str  # "present" (left alone), "fetched" or "repaired"
    folder: str
    downloaded: list[str] = field(default_factory=list)
    seconds: float = 0.0
    added: int = 0  # files put where none was
    replaced: int = 0  # files that differed from the archive's (--repair only)

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _place(item: Path, target: Path, counts: Counter, *, replace: bool) -> None:
    """Put an unpacked item at its target, file by file where the target exists: a missing
    file is added; an existing one is replaced only when `replace` (our own stage, or
    --repair) and its bytes differ. Nothing is written through a symbolic link, and nothing
    the archive does not hold is touched."""
    if target.is_symlink():
        counts["kept"] += 1  # the user's link: left alone, never written through
        return
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        item.rename(target)
        counts["added"] += 1
        return
    if target.is_dir() and item.is_dir():
        for child in item.iterdir():
            _place(child, target / child.name, counts, replace=replace)
    elif target.is_file() and item.is_file() and replace and \
            not filecmp.cmp(item, target, shallow=False):
        os.replace(item, target)
        counts["replaced"] += 1
    else:
        counts["kept"] += 1


def _command(spec: DatasetSpec, root: Path, sources: Path | None, repair: bool = False) -> str:
    """The command that goes on from here, for messages."""
    extra = f" --sources {sources}" if sources else ""
    return f"`safe-cache datasets fetch {spec.name} --root {root}{extra}" \
           f"{' --repair' if repair else ''}`"


@dataclass(frozen=True)
class FetchJob:
    """One dataset's fetch: where, how, and the command that goes on after a failure."""

    spec: DatasetSpec
    root: Path
    work: Path
    keep_archives: bool = False
    margin: float = DEFAULT_MARGIN
    sources: Path | None = None  # the sources file, for the commands in messages
    repair: bool = False

    @property
    def again(self) -> str:
        return _command(self.spec, self.root, self.sources, self.repair)

    def scratch(self, *parts: str) -> Path:
        """A path of ours under the work folder, checked to resolve inside it (a symlink planted
        there never leads a clean-up outside)."""
        return inside(self.work, *parts, what=f"{self.spec.name}: the fetch folder",
                      error=FetchError)

    @property
    def stage(self) -> Path:
        return within(self.scratch("stage"), self.spec.folder,
                      f"{self.spec.name}: the staged folder", FetchError)


def _unpack_source(source: Source, path: Path, job: FetchJob, counts: Counter) -> None:
    """Unpack an archive into scratch (bounded) and move its `unpack` targets to the stage."""
    scratch = job.scratch("unpacked", source.file)
    shutil.rmtree(scratch, ignore_errors=True)  # a half unpack from a killed run: ours
    expected = max(source.approx_bytes or 0, path.stat().st_size)
    unpack(path, scratch, UnpackLimits.for_size(expected, job.margin))
    for nested in source.nested:
        inner = scratch / nested
        if not inner.is_file() or inner.is_symlink():
            raise FetchError(f"{source.file}: the archive holds no {nested} (its layout"
                             f" changed?); the spec's `nested` must name the inner archive.")
        unpack(inner, inner.parent, UnpackLimits.for_size(inner.stat().st_size, job.margin))
        inner.unlink()
    for inner, dest in source.unpack:
        if not (scratch / inner).exists():
            found = sorted(p.name for p in scratch.iterdir())[:8]
            raise FetchError(f"{source.file}: the archive holds no '{inner}' (top level:"
                             f" {found}); the spec's `unpack` must name its inner paths.")
        _place(scratch / inner, job.stage / dest if dest != "." else job.stage, counts,
               replace=True)
    shutil.rmtree(scratch)


def _fetch_source(source: Source, job: FetchJob, progress: ProgressSink) -> None:
    """Download (or reuse) one source, check it, and stage what it provides. A corrupt
    archive is removed (it is ours), so running again downloads it afresh."""
    path = download(source, job.scratch("downloads"), progress,
                    f"{job.spec.name}: {source.file}", download_limit(source, job.margin))
    try:
        if source.to:
            target = job.stage / source.to
            atomic_write_with(target, lambda temporary: shutil.copy2(path, temporary))
        else:
            _unpack_source(source, path, job, Counter())
            write_record(path, source, "unpacked")
    except ArchiveError as exc:
        forget(path)
        raise FetchError(f"{exc} The download {path} was removed; {job.again} downloads it"
                         f" afresh. If that fails the same way, the source serves a broken"
                         f" file: point it at a good copy (--sources FILE).") from exc
    if not job.keep_archives:
        forget(path)


def _covers(target: str, path: str) -> bool:
    return target == "." or path == target or path.startswith(target.rstrip("/") + "/")


def _to_repair(spec: DatasetSpec, root: Path, done: set[Source]) -> list[Source]:
    """The sources that hold what the folder lacks: those providing missing images; the plain
    files (split, class names) when the reader cannot read the folder; every source when
    nothing is found missing (--repair then compares every file with the archives)."""
    left = [s for s in spec.sources if s not in done]
    try:
        with reading_only():
            dataset = open_dataset(spec, root)
    except DatasetError:
        plain = [s for s in left if s.to]
        return plain or left
    image_dir = "" if spec.image_dir == "." else spec.image_dir.rstrip("/") + "/"
    missing = [image_dir + e.path for entries in dataset.splits.values() for e in entries
               if not os.path.isfile(dataset.image_path(e))]
    if not missing:
        return left
    covering = [s for s in left if any(_covers(t, m) for t in s.targets for m in missing)]
    return covering or left  # frames a build step cuts: the sources it cuts them from


def _move_into_place(job: FetchJob, folder: Path, counts: Counter, *, replace: bool) -> None:
    if not folder.exists() and not folder.is_symlink():
        folder.parent.mkdir(parents=True, exist_ok=True)
        job.stage.rename(folder)  # one rename: the dataset appears complete or not at all
        counts["added"] += 1
        return
    for item in job.stage.iterdir():
        _place(item, folder / item.name, counts, replace=replace)


def _write_ledger(folder: Path, spec: DatasetSpec, fetched: list[Source],
                  counts: Counter) -> None:
    ledger = {"safe_cache": __version__, "dataset": spec.name,
              "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "added": counts["added"], "replaced": counts["replaced"],
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


def _incomplete(job: FetchJob, folder: Path, fetched: list[Source], problems: list[str],
                repair: bool) -> FetchError:
    spec = job.spec
    if spec.manual:
        fix = f" {spec.manual}"
    elif repair:
        links = [p for p in (folder / spec.split_file if spec.split_file else None,
                             folder / spec.image_dir) if p is not None and p.is_symlink()]
        fix = f" {links[0]} is a symbolic link, which fetch never writes through: repair" \
              f" what it points to, or remove the link and run again." if links else \
            " The archives do not hold what is missing: the sources may have changed."
    else:
        fix = (f" {_command(spec, job.root, job.sources, repair=True)} completes it from the"
               f" archives, replacing only what is missing or damaged.")
    return FetchError(f"{spec.name}: fetched {[s.file for s in fetched] or 'nothing new'}, but"
                      f" {folder} is not complete yet: {problems[0].rstrip('.')}.{fix}")


def fetch_dataset(spec: DatasetSpec, root: Path, *, keep_archives: bool = False,
                  progress: ProgressSink = null_progress, workers: int = 1,
                  repair: bool = False, margin: float = DEFAULT_MARGIN,
                  sources_path: Path | None = None) -> FetchReport:
    """Fetch one dataset (see the module docstring); raises FetchError with the fix.

    repair: complete a folder the reader rejects from the archives (only what is missing or
    differs from the archive's copy is written; the user's other files stay as they are).
    """
    started = time.perf_counter()
    if not problems_of(spec, root) and not repair:
        _clean(root, spec, keep_archives)
        return FetchReport(spec.name, "present", str(root / spec.folder))
    if not spec.sources:
        raise FetchError(f"{spec.name}: no public download; {spec.manual or spec.split_source}")
    folder = _folder(root, spec)
    job = FetchJob(spec, root, _work(root, spec), keep_archives, margin, sources_path, repair)
    counts: Counter = Counter()
    fetched: list[Source] = []
    for _ in range(2 if repair else 1):  # repair: the split file first, then what it lists
        todo = _to_repair(spec, root, set(fetched)) if repair else \
            [s for s in spec.sources if _source_state(s, root, spec).state != "present"]
        job.stage.mkdir(parents=True, exist_ok=True)
        for source in todo:
            _fetch_source(source, job, progress)
        if spec.build:
            BUILDERS[spec.build](spec, job.stage, folder, progress, workers)
        _move_into_place(job, folder, counts, replace=repair)
        shutil.rmtree(job.scratch("stage"), ignore_errors=True)  # what was kept back: ours
        fetched += todo
        if not problems_of(spec, root):
            break
    problems = problems_of(spec, root)
    if problems:
        raise _incomplete(job, folder, fetched, problems, repair)
    _write_ledger(folder, spec, fetched, counts)
    _clean(root, spec, keep_archives)
    return FetchReport(spec.name, "repaired" if repair else "fetched", str(folder),
                       [s.file for s in fetched], round(time.perf_counter() - started, 2),
                       counts["added"], counts["replaced"])


def fetch(names: list[str], root: str | Path, *, sources: str | Path | None = None,
          keep_archives: bool = False, progress: ProgressSink = null_progress,
          workers: int | None = None, repair: bool = False,
          margin: float = DEFAULT_MARGIN) -> list[FetchReport]:
    """Fetch every named dataset under `root`; one failure does not stop the others, and the
    failures are raised together at the end (one line each). Every spec and the sources file
    are checked before anything is downloaded."""
    if not 0 < margin <= 1e6:
        raise FetchError(f"--unpack-margin {margin} must be a number in (0, 1e6].")
    overrides, root = load_overrides(sources), Path(root)
    specs = [fetch_spec(name, overrides) for name in resolve_names(names)]
    for spec in specs:
        _check_build(spec)
        _work(root, spec)
        _check_folder_name(spec)  # refused before any work
    workers = auto_workers(workers)
    reports, failures = [], []
    for spec in specs:
        try:
            reports.append(fetch_dataset(spec, root, keep_archives=keep_archives,
                                         progress=progress, workers=workers, repair=repair,
                                         margin=margin, sources_path=overrides.path))
        except FetchError as exc:
            failures.append(str(exc))
    if failures:
        raise FetchError("\n".join(failures))
    return reports
