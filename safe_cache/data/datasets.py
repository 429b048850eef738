"""Dataset specs and the readers for the layouts the few-shot CLIP literature uses.

A dataset is a spec file (pipelines/*.json, shipped in the package as `safe_cache.pipelines`):
its folder under the data root, its image folder, where its split and class names come from,
its prompt templates, its Tip-Adapter search ranges, and where its files download from
(`sources`, used by `datasets fetch`, data.fetch). `--dataset` takes a spec name or a path
to a spec file, so a user's own dataset is a spec (kind `imagefolder`), not code. Readers turn a
layout into `Dataset`: class names plus train/val/test entries whose paths are relative to the
image folder (a path that would leave it is refused).
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import difflib
import hashlib
import json
import os
import random
import typing
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from ..errors import DatasetError, SafeCacheWarning
from ..identity import file_sha256
from ..records import type_problem
from .sources import Source, parse_sources

SPLITS = ("train", "val", "test")
COOP_PROPORTIONS = (0.5, 0.2)  # train, val; the rest is test (CoOp's read_and_split_data)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset described as data: layout, split source, class-name source, prompts, ranges."""

    name: str
    kind: str
    folder: str
    image_dir: str = "."
    split_file: str | None = None
    classnames_file: str | None = None
    num_classes: int | None = None
    split_sizes: dict[str, int] = field(default_factory=dict)
    templates: tuple[str, ...] = ("a photo of a {}.",)
    tip_adapter: dict[str, Any] = field(default_factory=dict)
    split_source: str = ""
    split_seed: int = 1
    csv: dict[str, str] | None = None
    notes: str = ""
    sources: tuple[Source, ...] = ()  # what `datasets fetch` downloads (see data.sources)
    build: str | None = None  # a step after unpacking (ucf101: middle frames from the videos)
    manual: str = ""  # what fetch cannot download (sign-in, dead links): where to put what
    path: str | None = None  # where the spec was read from

    @classmethod
    def from_file(cls, path: Path) -> DatasetSpec:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: not UTF-8, not JSON
            raise DatasetError(f"Dataset spec {path} is not readable JSON: {exc!s:.200}") from exc
        if not isinstance(raw, dict):
            raise DatasetError(f"Dataset spec {path} must be a JSON object of fields (see"
                               f" pipelines/README.md).")
        known = set(cls.__dataclass_fields__) - {"path"}
        unknown = set(raw) - known
        if unknown:
            raise DatasetError(f"Dataset spec {path} has unknown fields {sorted(unknown)};"
                               f" known fields: {sorted(known)}.")
        missing = {"name", "kind", "folder"} - set(raw)
        if missing:
            raise DatasetError(f"Dataset spec {path} lacks {sorted(missing)}.")
        _check_fields(raw, path)
        if raw["kind"] not in READERS:
            raise DatasetError(f"Dataset spec {path}: unknown kind '{raw['kind']}'; known kinds:"
                               f" {', '.join(sorted(READERS))}.")
        raw["templates"] = tuple(raw.get("templates", cls.templates))
        raw["sources"] = parse_sources(raw.get("sources", []), f"Dataset spec {path}")
        raw["folder"] = raw["folder"].rstrip("/")
        return cls(**raw, path=str(path))


def _check_fields(raw: dict[str, Any], path: Path) -> None:
    """Each field's type (DatasetSpec's annotations) and range (data.schema), in one line
    naming the file and the field."""
    from .schema import value_problem

    hints = typing.get_type_hints(DatasetSpec)
    for key, value in raw.items():
        if key == "sources":
            continue
        problem = type_problem(value, hints[key]) or value_problem(key, value)
        if problem:
            raise DatasetError(f"Dataset spec {path}: field '{key}' {problem}; fix it (the"
                               f" fields are in pipelines/README.md).")


def _spec_dir() -> Path:
    """pipelines/: inside the installed package (wheel), or at the top of a source checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "pipelines", package.parent / "pipelines"):
        if candidate.is_dir():
            return candidate
    raise DatasetError(f"The dataset specs (pipelines/) are missing from {package}; reinstall.")


def list_specs() -> list[DatasetSpec]:
    """Every shipped spec except the `imagefolder` template, in file-name order."""
    files = sorted(_spec_dir().glob("*.json"))
    return [DatasetSpec.from_file(f) for f in files if f.stem != "imagefolder"]


def load_spec(name_or_path: str | Path) -> DatasetSpec:
    """A shipped spec by name (`food101`), or a spec file by path."""
    text = str(name_or_path)
    if text.endswith(".json") or Path(text).is_file():
        if not Path(text).is_file():
            raise DatasetError(f"Dataset spec file not found: {text}")
        return DatasetSpec.from_file(Path(text))
    candidate = _spec_dir() / f"{text}.json"
    if not candidate.is_file():
        known = [spec.name for spec in list_specs()]
        close = difflib.get_close_matches(text, known, n=1)
        guess = f" Did you mean {close[0]}?" if close else ""
        raise DatasetError(f"Unknown dataset '{text}'.{guess} Known: {', '.join(known)}; or pass"
                           f" the path of a spec file (see pipelines/imagefolder.json for a user"
                           f" dataset).")
    return DatasetSpec.from_file(candidate)


@dataclass(frozen=True)
class Entry:
    """One image: path relative to the dataset's image folder, integer label, class name."""

    path: str
    label: int


@dataclass
class Dataset:
    """A dataset read from disk: class names and the entries of each split."""

    spec: DatasetSpec
    root: Path  # the data root holding one folder per dataset
    classnames: list[str]
    splits: dict[str, list[Entry]]
    split_source: Path | None = None  # the file the split was read from (its sha256 is recorded)
    generated_split: bool = False
    class_subset: list[int] | None = None  # rows of the parent (ImageNet) classes, for A/R

    @property
    def image_root(self) -> Path:
        return (self.root / self.spec.folder / self.spec.image_dir).resolve()

    def image_path(self, entry: Entry) -> Path:
        return self.image_root / entry.path

    def describe(self) -> dict[str, Any]:
        """What a store's manifest records about the dataset (JSON)."""
        source = self.split_source
        return {
            "name": self.spec.name,
            "kind": self.spec.kind,
            "split_source": str(source.relative_to(self.root)) if source else None,
            "split_sha256": file_sha256(source) if source and source.is_file() else None,
            "generated_split": self.generated_split,
            "num_classes": len(self.classnames),
            "classnames": list(self.classnames),
            "class_subset": self.class_subset,
            "tip_adapter": dict(self.spec.tip_adapter),
            "split_sizes": {name: len(entries) for name, entries in self.splits.items()},
        }


DATA_ROOT_ENV = "SAFE_CACHE_DATA"
DEFAULT_DATA_ROOT = "data"


@dataclass(frozen=True)
class DataRoot:
    """The folder holding one folder per dataset, and where that choice came from."""

    path: Path
    source: str  # "--root", "SAFE_CACHE_DATA" or "default"


def resolve_data_root(root: str | Path | None = None) -> DataRoot:
    """`root` (the --root option) if given, else $SAFE_CACHE_DATA, else ./data."""
    if root is not None:
        return DataRoot(Path(root).expanduser(), "--root")
    if os.environ.get(DATA_ROOT_ENV):
        return DataRoot(Path(os.environ[DATA_ROOT_ENV]).expanduser(), DATA_ROOT_ENV)
    return DataRoot(Path(DEFAULT_DATA_ROOT), "default")


def _not_found(spec: DatasetSpec, root: DataRoot) -> DatasetError:
    """Where the dataset was looked for (all three root sources), what was expected, the fix."""
    env = os.environ.get(DATA_ROOT_ENV)
    looked = [f"--root {root.path if root.source == '--root' else '(not given)'}",
              f"{DATA_ROOT_ENV} {env or '(not set)'}", f"the default ./{DEFAULT_DATA_ROOT}"]
    expected = f"{spec.folder}/{spec.image_dir.rstrip('/')}/" if spec.image_dir != "." \
        else f"{spec.folder}/"
    if spec.split_file:
        expected += f" and {spec.folder}/{spec.split_file}"
    source = f" Where to get it: {spec.split_source}." if spec.split_source else ""
    if spec.sources and spec.path and Path(spec.path).parent == _spec_dir():
        source = (f" `safe-cache datasets fetch {spec.name} --root {root.path}` downloads it"
                  f"{' (partly: see its instructions)' if spec.manual else ''}.{source}")
    return DatasetError(
        f"{spec.name}: no folder {root.path.absolute() / spec.folder}. The data root is"
        f" {root.path}"
        f" ({'the default' if root.source == 'default' else 'from ' + root.source}; in order:"
        f" {', '.join(looked)}). Expected {expected} under the data"
        f" root (spec {spec.path or spec.name}). Point at the folder that holds"
        f" {spec.folder}/ with --root DIR or {DATA_ROOT_ENV}=DIR, or put the dataset under"
        f" ./{DEFAULT_DATA_ROOT}/.{source}")


def open_dataset(spec: DatasetSpec | str | Path, root: str | Path | None = None, *,
                 make_split: bool = False) -> Dataset:
    """Read a dataset under the data root with the reader its spec's kind names.

    root: the data root; None resolves it as the CLI does (`resolve_data_root`: $SAFE_CACHE_DATA,
    else ./data). make_split: when the published split file is missing, write a seeded split
    with CoOp's proportions beside it (numbers on it are not comparable with published ones) and
    use it.
    """
    spec = spec if isinstance(spec, DatasetSpec) else load_spec(spec)
    data_root = resolve_data_root(root)
    root = data_root.path
    folder = root / spec.folder
    if not folder.is_dir():
        raise _not_found(spec, data_root)
    image_root = folder / spec.image_dir
    if not image_root.is_dir():
        raise DatasetError(f"{spec.name}: image folder {image_root} not found.")
    dataset = READERS[spec.kind](spec, root, make_split)
    for entries in dataset.splits.values():
        for entry in entries:
            _check_inside(dataset.image_root, entry.path, spec.name)
    return dataset


def _check_inside(image_root: Path, relative: str, name: str) -> None:
    try:
        resolved = (image_root / relative).resolve()
    except (OSError, ValueError) as exc:  # a NUL, a loop of links
        raise DatasetError(f"{name}: image path {relative!r:.100} cannot be a file ({exc});"
                           f" the split file is damaged.") from exc
    if Path(relative).is_absolute() or not resolved.is_relative_to(image_root):
        raise DatasetError(f"{name}: image path '{relative}' leaves the image folder"
                           f" {image_root}; split files must hold paths relative to it.")


# --- readers ------------------------------------------------------------------------------------

Reader = Callable[[DatasetSpec, Path, bool], Dataset]
READERS: dict[str, Reader] = {}


def register_reader(kind: str) -> Callable[[Reader], Reader]:
    def add(reader: Reader) -> Reader:
        READERS[kind] = reader
        return reader

    return add


def _clean_classname(name: str) -> str:
    return name.replace("_", " ")


_REFETCH = ("fetch it again (`safe-cache datasets fetch <dataset> --root <root> --repair`), or"
            " fix it.")


def split_entries(raw: dict[str, Any], path: Path,
                  num_classes: int | None = None) -> dict[str, list[Entry]]:
    """A split file's train/val/test lists as entries, each item checked ([path, label, ...]:
    a non-empty path, a whole-number label in range): a damaged or hand-edited split file is
    one line naming the file, the split and the item, never a ValueError."""
    splits = {}
    for split in SPLITS:
        items = raw.get(split)
        if not isinstance(items, list):
            raise DatasetError(f"{path}: '{split}' is {items!r:.40}, not a list of [path,"
                               f" label, classname]; the file is damaged: {_REFETCH}")
        entries = []
        for index, item in enumerate(items):
            ok = isinstance(item, list) and len(item) >= 2 and isinstance(item[0], str) \
                and item[0] and not any(ord(c) < 32 for c in item[0]) \
                and isinstance(item[1], int) and not isinstance(item[1], bool) \
                and item[1] >= 0 and (num_classes is None or item[1] < num_classes)
            if not ok:
                raise DatasetError(f"{path}: {split}[{index}] is {item!r:.80}, not [path, label"
                                   f" (a whole number{f' < {num_classes}' if num_classes else ''}"
                                   f"), classname]; the file is damaged: {_REFETCH}")
            entries.append(Entry(item[0], item[1]))
        splits[split] = entries
    return splits


def _classnames_from_entries(raw: dict[str, list], path: Path) -> list[str]:
    """Class names by label from the split file's third field (underscores become spaces)."""
    names: dict[int, str] = {}
    for split in SPLITS:
        for index, item in enumerate(raw.get(split, [])):
            if len(item) < 3 or not isinstance(item[2], str):
                raise DatasetError(f"{path}: {split}[{index}] {item!r:.80} has no class name"
                                   f" (a third field); the file is damaged or not a CoOp"
                                   f" split file.")
            names.setdefault(item[1], _clean_classname(item[2]))
    if sorted(names) != list(range(len(names))):
        raise DatasetError(f"{path}: labels are not 0..{len(names) - 1}.")
    return [names[label] for label in range(len(names))]


@register_reader("split_zhou")
def read_split_zhou(spec: DatasetSpec, root: Path, make_split: bool) -> Dataset:
    """CoOp's split_zhou_<Name>.json: {split: [[relative_path, label, classname], ...]}."""
    path = root / spec.folder / (spec.split_file or "")
    generated = False
    if not path.is_file():
        path, generated = _missing_split(spec, root, path, make_split), True
    raw = _read_json(path)
    for split in SPLITS:
        if split not in raw:
            raise DatasetError(f"{path} has no '{split}' list; a split file holds train, val"
                               f" and test lists of [path, label, classname].")
    splits = split_entries(raw, path)
    return Dataset(spec, root, _classnames_from_entries(raw, path), splits, path, generated)


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise DatasetError(f"{path} is not a readable JSON split file: {exc!s:.200}. If fetch"
                           f" put it there, `safe-cache datasets fetch <dataset> --root <root>"
                           f" --repair` restores it.") from exc
    if not isinstance(raw, dict):
        raise DatasetError(f"{path} is not a split file (a JSON object of train, val and test"
                           f" lists).")
    return raw


def _missing_split(spec: DatasetSpec, root: Path, path: Path, make_split: bool) -> Path:
    generated = path.with_name(f"split_generated_{spec.name}.json")
    image_root = root / spec.folder / spec.image_dir
    if generated.is_file():
        _ensure_generated(spec, image_root, generated)
        _warn_generated(spec, generated)
        return generated
    if not make_split:
        raise DatasetError(
            f"{spec.name}: split file {path} not found. Where to get it:"
            f" {spec.split_source.rstrip('.')}. Put it at that path, or pass --make-split (in"
            f" Python: make_split=True) to write a seeded split with CoOp's proportions instead;"
            f" its numbers are NOT comparable with published ones."
        )
    write_generated_split(image_root, generated, spec.split_seed)
    _warn_generated(spec, generated)
    return generated


def _ensure_generated(spec: DatasetSpec, image_root: Path, generated: Path) -> dict[str, Any]:
    """The generated split: written if it is missing, or again if the image folder changed
    since it was written (an image or class removed after a failed extract: a stale split
    would keep listing what the user fixed)."""
    if generated.is_file():
        raw = _read_json(generated)
        recorded = raw.get("listing_sha256")
        if recorded is None or _READ_ONLY.get() or recorded == _listing_digest(image_root):
            return raw
        warnings.warn(f"{spec.name}: {image_root} changed since {generated.name} was written;"
                      f" the split is generated again.", SafeCacheWarning, stacklevel=5)
    return write_generated_split(image_root, generated, spec.split_seed)


def _class_images(image_root: Path) -> dict[str, list[str]]:
    """Class folder -> its image files (sorted), as a generated split sees the folder."""
    classes = sorted(d.name for d in image_root.iterdir() if d.is_dir()
                     and not d.name.startswith("."))
    return {name: sorted(f"{name}/{f.name}" for f in (image_root / name).iterdir()
                         if f.suffix.lower() in IMAGE_SUFFIXES) for name in classes}


def _listing_digest(image_root: Path) -> str:
    """sha256 of the class folders and image names a generated split was made from."""
    listing = json.dumps(_class_images(image_root), sort_keys=True)
    return hashlib.sha256(listing.encode()).hexdigest()


def _warn_generated(spec: DatasetSpec, path: Path) -> None:
    warnings.warn(f"{spec.name}: using the generated split {path}; accuracies on it are not"
                  f" comparable with published numbers.", SafeCacheWarning, stacklevel=4)


def write_generated_split(image_root: Path, target: Path, seed: int) -> dict[str, Any]:
    """A seeded split of a class-per-folder image tree: 50% train, 20% val, 30% test per class.

    Written in the split_zhou format (paths relative to `image_root`), as CoOp does for datasets
    that come without one (inside `reading_only()`, returned and not written).
    """
    listing = _class_images(image_root)
    if not listing:
        raise DatasetError(f"{image_root} has no class sub-folders, so no split can be"
                           f" generated: the labels of a flat image folder are unknown.")
    rng = random.Random(seed)
    split: dict[str, Any] = {name: [] for name in SPLITS}
    for label, (name, images) in enumerate(listing.items()):
        images = list(images)
        rng.shuffle(images)
        n_train = round(len(images) * COOP_PROPORTIONS[0])
        n_val = round(len(images) * COOP_PROPORTIONS[1])
        for part, chunk in zip(SPLITS, (images[:n_train], images[n_train:n_train + n_val],
                                        images[n_train + n_val:]), strict=True):
            split[part].extend([p, label, name] for p in chunk)
    split["listing_sha256"] = _listing_digest(image_root)  # regenerated when the folder changes
    if not _READ_ONLY.get():
        _write_split(target, split)
    return split


_READ_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("read_only", default=False)


@contextlib.contextmanager
def reading_only() -> Iterator[None]:
    """Readers inside this block write nothing (a generated split is made in memory): what a
    check or a dry run (fetch's) reads must leave the data root as it was."""
    token = _READ_ONLY.set(True)
    try:
        yield
    finally:
        _READ_ONLY.reset(token)


def _write_split(target: Path, split: dict[str, Any]) -> None:
    """A generated split, written whole (a temporary renamed in: a link at its name is
    replaced, never written through)."""
    atomic_write_text(target, json.dumps(split))


@register_reader("fgvc")
def read_fgvc(spec: DatasetSpec, root: Path, make_split: bool) -> Dataset:
    """FGVC-Aircraft: variants.txt (class order), images_variant_<split>.txt of `<id> <variant>`
    lines (variants may contain spaces), image `<id>.jpg`."""
    folder = root / spec.folder
    variants_file = folder / (spec.classnames_file or "variants.txt")
    classnames = [line.strip() for line in _read_lines(variants_file, spec) if line.strip()]
    index = {name: label for label, name in enumerate(classnames)}
    splits = {}
    for split in SPLITS:
        entries = []
        for line in _read_lines(folder / f"images_variant_{split}.txt", spec):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in index:
                raise DatasetError(f"{spec.name}: variant '{variant}' of image {image_id} is not"
                                   f" in {variants_file}.")
            entries.append(Entry(f"{image_id}.jpg", index[variant]))
        splits[split] = entries
    return Dataset(spec, root, classnames, splits, variants_file)


def _read_lines(path: Path, spec: DatasetSpec) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{spec.name}: {path} not found. It comes from {spec.split_source}.")
    return _text(path).splitlines()


def _text(path: Path) -> str:
    """A small text file of the dataset (class names, a CSV), or one line saying it is not."""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not a readable text file ({exc!s:.120}); restore it (if"
                           f" fetch put it there, `safe-cache datasets fetch <dataset> --root"
                           f" <root> --repair` does).") from exc


def imagenet_classnames(spec: DatasetSpec, root: Path) -> tuple[list[str], list[str], Path]:
    """(wnids, class names, file) from classnames.txt (`n01440764 tench` per line), looked up in
    the dataset's folder first, then in imagenet/."""
    name = spec.classnames_file or "classnames.txt"
    candidates = [root / spec.folder / name, root / "imagenet" / name]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise DatasetError(f"{spec.name}: classnames.txt not found at {candidates[0]} or"
                           f" {candidates[1]}. It comes from {spec.split_source}.")
    wnids, names = read_classnames_file(path)
    return wnids, names, path


def read_classnames_file(path: Path) -> tuple[list[str], list[str]]:
    """(wnids, class names) of an ImageNet classnames.txt (`n01440764 tench` per line, blank
    lines skipped), in label order; an unreadable file is a DatasetError naming it."""
    wnids, names = [], []
    for line in _text(path).splitlines():
        if line.strip():
            wnid, _, classname = line.strip().partition(" ")
            wnids.append(wnid)
            names.append(classname.strip())
    return wnids, names


def _folder_entries(image_root: Path, folder: str, label: int) -> list[Entry]:
    directory = image_root / folder
    return [Entry(f"{folder}/{f.name}", label) for f in sorted(directory.iterdir())
            if f.suffix.lower() in IMAGE_SUFFIXES]


@register_reader("imagenet")
def read_imagenet(spec: DatasetSpec, root: Path, make_split: bool) -> Dataset:
    """ImageNet: images/{train,val}/n*/ and classnames.txt. Few-shot train and val both come
    from the TRAIN images, split 80/20 per class by `split_ImageNet.json` (Cross-Modal
    Fine-tuning's file, the split_zhou format, paths relative to images/); test is the official
    val set. So early stopping, the grid and the adapters' searches never select on test.
    Without the file, make_split writes a seeded 80/20 split (CoOp's split_trainval)."""
    wnids, names, _ = imagenet_classnames(spec, root)
    path = root / spec.folder / (spec.split_file or "split_ImageNet.json")
    generated = path.with_name(f"split_generated_{spec.name}.json")
    if not path.is_file() and not generated.is_file():
        if not make_split:
            raise DatasetError(
                f"{spec.name}: split file {path} not found. Where to get it:"
                f" {spec.split_source.rstrip('.')}. Put it at that path, or pass --make-split"
                f" (in Python: make_split=True) to write a seeded 80/20 train/val split of the"
                f" train images; its numbers are NOT comparable with published ones.")
        _write_imagenet_split(root / spec.folder / spec.image_dir, wnids, names, generated,
                              spec.split_seed)
    if not path.is_file():
        _warn_generated(spec, generated)
        path = generated
    splits = split_entries(_read_json(path), path, len(names))
    return Dataset(spec, root, names, splits, path, path == generated)


def _write_imagenet_split(image_root: Path, wnids: list[str], names: list[str], target: Path,
                          seed: int, val_fraction: float = 0.2) -> None:
    """Per class, a seeded round(n * 0.2) of the train images become val; test = val/."""
    rng = random.Random(seed)
    split: dict[str, list] = {name: [] for name in SPLITS}
    for label, (wnid, name) in enumerate(zip(wnids, names, strict=True)):
        train = [e.path for e in _folder_entries(image_root, f"train/{wnid}", label)] \
            if (image_root / "train" / wnid).is_dir() else []
        rng.shuffle(train)
        n_val = round(len(train) * val_fraction)
        split["val"] += [[p, label, name] for p in train[:n_val]]
        split["train"] += [[p, label, name] for p in train[n_val:]]
        if (image_root / "val" / wnid).is_dir():
            split["test"] += [[e.path, label, name]
                              for e in _folder_entries(image_root, f"val/{wnid}", label)]
    _write_split(target, split)


@register_reader("imagenet_v2")
def read_imagenet_v2(spec: DatasetSpec, root: Path, make_split: bool) -> Dataset:
    """ImageNet-V2: numbered folders 0..999, folder i = the i-th class of classnames.txt."""
    _, names, source = imagenet_classnames(spec, root)
    image_root = root / spec.folder / spec.image_dir
    entries = []
    for label in range(len(names)):
        if (image_root / str(label)).is_dir():
            entries.extend(_folder_entries(image_root, str(label), label))
    return Dataset(spec, root, names, {"test": entries}, source)


@register_reader("imagenet_folders")
def read_imagenet_folders(spec: DatasetSpec, root: Path, make_split: bool) -> Dataset:
    """ImageNet-Sketch: n* folders of all 1000 classes, labels in classnames.txt order."""
    wnids, names, source = imagenet_classnames(spec, root)
    image_root = root / spec.folder / spec.image_dir
    entries = []
    for label, wnid in enumerate(wnids):
        if (image_root / wnid).is_dir():
            entries.extend(_folder_entries(image_root, wnid, label))
    return Dataset(spec, root, names, {"test": entries}, source)


@register_reader("imagenet_subset")
def read_imagenet_subset(spec: DatasetSpec, root: Path, make_split: bool) -> Dataset:
    """ImageNet-A / -R: 200 n* folders; labels follow the sorted folder names, and
    `class_subset` maps each to its row of the 1000-class ImageNet classifier."""
    wnids, names, source = imagenet_classnames(spec, root)
    row = {wnid: i for i, wnid in enumerate(wnids)}
    image_root = root / spec.folder / spec.image_dir
    folders = sorted(d.name for d in image_root.iterdir() if d.is_dir())
    unknown = [f for f in folders if f not in row]
    if unknown:
        raise DatasetError(f"{spec.name}: folders {unknown[:5]} are not ImageNet classes of"
                           f" {source}.")
    entries = []
    for label, wnid in enumerate(folders):
        entries.extend(_folder_entries(image_root, wnid, label))
    subset = [row[wnid] for wnid in folders]
    return Dataset(spec, root, [names[i] for i in subset], {"test": entries}, source,
                   class_subset=subset)


@register_reader("imagefolder")
def read_imagefolder(spec: DatasetSpec, root: Path, make_split: bool) -> Dataset:
    """A user dataset: CSV files of path,label (label = class name), or class sub-folders
    (split generated once, seeded by the spec's split_seed, with CoOp's proportions)."""
    if spec.csv:
        return _read_csv_dataset(spec, root)
    image_root = root / spec.folder / spec.image_dir
    path = root / spec.folder / f"split_generated_{spec.name}.json"
    raw = _ensure_generated(spec, image_root, path)
    splits = split_entries(raw, path)
    return Dataset(spec, root, _classnames_from_entries(raw, path), splits, path, True)


def _read_csv_dataset(spec: DatasetSpec, root: Path) -> Dataset:
    rows: dict[str, list[tuple[str, str]]] = {}
    for split in SPLITS:
        name = (spec.csv or {}).get(split)
        if name is None:
            raise DatasetError(f"{spec.name}: the spec's csv needs a file for '{split}'.")
        path = root / spec.folder / name
        if not path.is_file():
            raise DatasetError(f"{spec.name}: CSV {path} not found.")
        rows[split] = _csv_rows(path)
    classnames = sorted({label for split_rows in rows.values() for _, label in split_rows})
    index = {name: i for i, name in enumerate(classnames)}
    splits = {split: [Entry(p, index[label]) for p, label in split_rows]
              for split, split_rows in rows.items()}
    return Dataset(spec, root, [_clean_classname(c) for c in classnames], splits,
                   root / spec.folder / spec.csv["train"])


def _csv_rows(path: Path) -> list[tuple[str, str]]:
    """(path, label) rows of a user's CSV (a header row `path,...` skipped), each checked."""
    rows = []
    reader = csv.reader(_text(path).splitlines())
    for number, row in enumerate(reader, 1):
        if not row or row[0] == "path":
            continue
        if len(row) < 2 or not row[0] or not row[1] or any(ord(c) < 32 for c in row[0]):
            raise DatasetError(f"{path}: line {number} is {row!r:.80}, not `path,label` (an"
                               f" image path and its class name).")
        rows.append((row[0], row[1]))
    return rows


def dataset_status(spec: DatasetSpec, root: str | Path | None) -> str:
    """'present', 'missing' or a short reason, for the `datasets` table (reads nothing big)."""
    if root is None:
        return "-"
    folder = Path(root).expanduser() / spec.folder
    if not folder.is_dir():
        return "missing"
    if not (folder / spec.image_dir).is_dir():
        return f"no {spec.image_dir}/"
    if spec.split_file and not (folder / spec.split_file).is_file():
        generated = folder / f"split_generated_{spec.name}.json"
        return "generated split" if generated.is_file() else f"no {spec.split_file}"
    return "present"
