"""PartImageNet (He et al., 2021) annotations -> the parts folder `safe-cache shapley` reads.

PartImageNet annotates the parts of ~24k ImageNet train images of 158 classes in 11
supercategories (Quadruped: Head, Body, Foot, Tail; ...; Bottle: Mouth, Body): 40 part
categories. It comes in two forms, both read here:

- COCO-style JSON (`annotations/<split>/<split>.json` of the OOD release): `images` (id,
  file_name, width, height), `annotations` (image_id, category_id, segmentation: polygons
  `[[x1, y1, x2, y2, ...], ...]` or RLE `{"counts", "size"}`) and `categories` (id, name like
  "Quadruped Head", supercategory);
- segmentation PNGs (`PartImageNet_Seg`: `annotations/<split>/<image stem>.png`), one byte per
  pixel holding the part's category id 0..39, 40 for the background.

A parts folder holds parts.json with the part names (mask value k is names[k - 1]) and an 8-bit
mask per image at the image's path with .png. The names are the dataset's 40 categories in id
order, so masks of every supercategory share one folder; an image shows the parts of its own
supercategory only, and shapley leaves a part without a token out of the game (its value 0).

An image's class is its file name's ImageNet synset (n01440764_10026.JPEG -> n01440764), looked
up in the imagenet pipeline's classnames.txt (`n01440764 tench` per line; the line's index is
the label, as the datasets code numbers ImageNet's classes). Given a store, each image is found
among its rows by file name, its mask goes at the row's path, and the row's label must be the
synset's class; without one the mask goes at ImageNet's own layout, `train/<synset>/<file>`.

Polygons are rasterised here (no pycocotools): a pixel belongs to a polygon when its center
(x + 0.5, y + 0.5) lies inside by the even-odd rule; the union of an annotation's polygons is
its part, and where two annotations overlap the later one in the file wins.

The folder is written whole or not at all (`convert`): records are checked first, the masks and
parts.json go into a staging folder beside it, renamed into place at the end; an existing
parts folder is replaced only when asked (--force), never one without parts.json.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

PARTS = (
    "Quadruped Head", "Quadruped Body", "Quadruped Foot", "Quadruped Tail",
    "Biped Head", "Biped Body", "Biped Hand", "Biped Foot", "Biped Tail",
    "Fish Head", "Fish Body", "Fish Fin", "Fish Tail",
    "Bird Head", "Bird Body", "Bird Wing", "Bird Foot", "Bird Tail",
    "Snake Head", "Snake Body",
    "Reptile Head", "Reptile Body", "Reptile Foot", "Reptile Tail",
    "Car Body", "Car Tier", "Car Side Mirror",
    "Bicycle Body", "Bicycle Head", "Bicycle Seat", "Bicycle Tier",
    "Boat Body", "Boat Sail",
    "Aeroplane Head", "Aeroplane Body", "Aeroplane Engine", "Aeroplane Wing", "Aeroplane Tail",
    "Bottle Mouth", "Bottle Body",
)  # the category ids 0..39 of both releases (the PNGs' pixel values)
PNG_BACKGROUND = len(PARTS)  # 40: the segmentation PNGs' background value
SLACK = 1.0  # pixels a polygon vertex may lie beyond the image (annotation tools round)
MAX_SIDE = 20_000  # pixels a side: ImageNet's images are far smaller; more is a broken record
NAME_BYTES = 255  # a file name's longest on common file systems (the mask's, with .png)
SYNSET = re.compile(r"^(n\d{8})_")
PARTS_FILE = "parts.json"


def _whole(value: Any) -> bool:
    """An int that is not a bool (JSON's true is no number of pixels)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    """A finite int or float that is not a bool (JSON's NaN, null and text are no coordinate)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def _short(value: Any) -> str:
    """A record's value in a message: at most 80 characters of its repr."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def name_problem(name: str) -> str | None:
    """Why an image's file name cannot name its mask file, or None: a control character (NUL),
    or too long for a file name once it ends in .png."""
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        return "it holds a control character (a NUL byte, a newline), which no file name may"
    if len(Path(name).with_suffix(".png").name.encode()) > NAME_BYTES:
        return f"its mask's name would be longer than the {NAME_BYTES} bytes a file name may be"
    return None


def synset_of(file_name: str) -> str:
    """The ImageNet synset an image's file name starts with (n01440764_10026.JPEG)."""
    match = SYNSET.match(Path(file_name).name)
    if match is None:
        raise ConfigError(f"{file_name}: a PartImageNet image's file name starts with its"
                          f" ImageNet synset (n01440764_10026.JPEG); this one does not.")
    return match.group(1)


def read_wnids(path: str | Path) -> list[str]:
    """The synsets of ImageNet's classnames.txt in label order (`n01440764 tench` per line)."""
    from ..data.datasets import read_classnames_file  # the imagenet pipeline's own reader
    from ..errors import DatasetError

    try:
        wnids, _ = read_classnames_file(Path(path))
    except DatasetError as exc:
        raise ConfigError(f"No readable class list {path} ({exc!s:.80}): name ImageNet's"
                          f" classnames.txt (`n01440764 tench` per line) with --classnames.")\
            from None
    if not wnids or not all(SYNSET.match(w + "_") for w in wnids):
        raise ConfigError(f"{path} is not ImageNet's classnames.txt: each line starts with a"
                          f" synset (n01440764 tench).")
    return wnids


def rasterise(polygon: list[float], height: int, width: int) -> np.ndarray:
    """(height, width) bool: the pixels whose centers lie inside the polygon (even-odd).
    Edges go in chunks (about 4M row-edge pairs each) and the toggles count modulo 256 (their
    parity is all that matters), so a long polygon over a large image stays in memory."""
    points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    x1, y1 = points[:, 0], points[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    centers = np.arange(height) + 0.5  # each row's center line
    toggles = np.zeros((height, width + 1), dtype=np.uint8)
    step = max(1, (1 << 22) // max(height, 1))
    for start in range(0, len(x1), step):
        a, b = x1[start:start + step], y1[start:start + step]
        c, d = x2[start:start + step], y2[start:start + step]
        crosses = (b[None] <= centers[:, None]) != (d[None] <= centers[:, None])  # (H, E)
        rows, edges = np.nonzero(crosses)
        # where each crossing edge meets the row's center line (never a level edge: it
        # crosses no center line)
        at = a[edges] + (centers[rows] - b[edges]) * (c[edges] - a[edges]) / (
            d[edges] - b[edges])
        # the first pixel whose center lies right of the crossing toggles inside/outside
        first = np.clip(np.floor(at - 0.5).astype(np.int64) + 1, 0, width)
        np.add.at(toggles, (rows, first), 1)
    return (np.cumsum(toggles, axis=1, dtype=np.uint8)[:, :width] & 1).astype(bool)


def rle_counts(counts: str) -> list[int]:
    """COCO's compressed RLE string (pycocotools' rleToString) as its run lengths."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                raise ValueError("the RLE string ends inside a number")
            char = ord(counts[position]) - 48
            value |= (char & 0x1F) << (5 * shift)
            more = bool(char & 0x20)
            position, shift = position + 1, shift + 1
            if not more and char & 0x10:
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def decode_rle(rle: dict[str, Any], height: int, width: int) -> np.ndarray:
    """(height, width) bool of a COCO RLE (runs of 0, then 1, ..., in column-major order)."""
    counts = rle.get("counts")
    if isinstance(counts, str):
        runs = rle_counts(counts)
    elif isinstance(counts, list) and all(_whole(run) for run in counts):
        runs = list(counts)
    else:
        raise ValueError("its counts are neither COCO's compressed string nor a list of whole"
                         " numbers")
    size = rle.get("size", [height, width])
    if not isinstance(size, list) or size != [height, width] or \
            not all(_whole(side) for side in size):
        raise ValueError(f"its size {_short(size)} is not the image's [{height}, {width}]")
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise ValueError(f"its runs cover {sum(runs)} pixels, not {height} x {width}")
    values = np.arange(len(runs)) % 2 == 1
    return np.repeat(values, runs).reshape(width, height).T


def _segment(annotation: dict[str, Any], image: dict[str, Any], where: str) -> np.ndarray:
    """One annotation's pixels; polygons beyond the image by more than SLACK are refused."""
    height, width = int(image["height"]), int(image["width"])
    segmentation = annotation.get("segmentation")
    try:
        if isinstance(segmentation, dict):
            return decode_rle(segmentation, height, width)
        if not isinstance(segmentation, list) or not segmentation:
            raise ValueError("it is neither polygons ([[x1, y1, ...], ...]) nor RLE")
        mask = np.zeros((height, width), dtype=bool)
        for polygon in segmentation:
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                raise ValueError("a polygon is a flat list of at least 3 x, y pairs")
            bad = [v for v in polygon if not _number(v)]
            if bad:
                raise ValueError(f"a polygon holds the coordinate {_short(bad[0])}: each x and y"
                                 f" is a finite number (not NaN, null or text)")
            points = np.asarray(polygon, dtype=np.float64)
            xs, ys = points[0::2], points[1::2]
            if xs.min() < -SLACK or ys.min() < -SLACK or xs.max() > width + SLACK or \
                    ys.max() > height + SLACK:
                raise ValueError(f"a polygon reaches ({xs.min():g}..{xs.max():g},"
                                 f" {ys.min():g}..{ys.max():g}), beyond the image's"
                                 f" {width} x {height} pixels (file_name, width and height"
                                 f" must be the annotated image's)")
            mask |= rasterise(polygon, height, width)
        return mask
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{where}: annotation {_short(annotation.get('id'))} of image"
                          f" {image.get('file_name')}: {exc}. Fix or remove that annotation:"
                          f" the file is not PartImageNet's as released.") from None


def _field(record: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = record.get(key) if isinstance(record, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: not PartImageNet's COCO-style JSON: each record needs"
                          f" {key!r} ({record!s:.80}). Name a split's file (annotations/"
                          f"<split>/<split>.json), or the folder of its segmentation PNGs.")
    return value


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        reason = "it is nested too deeply" if isinstance(exc, RecursionError) else f"{exc!s:.80}"
        raise ConfigError(f"{path} is not a readable JSON file ({reason}): name a split's"
                          f" file, annotations/<split>/<split>.json.") from None


def _image_record(image: Any, where: str) -> tuple[int, str, int, int]:
    """An image record's id, file name, height and width, each checked."""
    image_id = _field(image, "id", int, where)
    file_name = _field(image, "file_name", str, where)
    record = f"{where}: image {image_id} ({_short(file_name)})"
    problem = name_problem(file_name)
    if problem is not None:
        raise ConfigError(f"{record}: its file_name cannot name a mask file: {problem}. Fix"
                          f" the record's file_name (PartImageNet's are like"
                          f" n01440764_10026.JPEG).")
    sides = []
    for key in ("height", "width"):
        side = image.get(key)
        if not _whole(side) or not 1 <= side <= MAX_SIDE:
            raise ConfigError(f"{record}: its {key} {_short(side)} is not a whole number of"
                              f" pixels from 1 to {MAX_SIDE:,} (the most a side may have"
                              f" here). Fix the record's width and height to the annotated"
                              f" image's size.")
        sides.append(side)
    return image_id, file_name, sides[0], sides[1]


def json_masks(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(file name, label mask: 0 none, k = the part PARTS[k - 1]) per annotated image. Every
    record is checked here, before the first mask is made: the polygons and RLE as each
    image's mask is drawn (while iterating)."""
    data = _read_json(path)
    where = str(path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ConfigError(f"{path}: not PartImageNet's COCO-style JSON (no {key!r} list):"
                              f" name a split's file, annotations/<split>/<split>.json.")
    value: dict[int, int] = {}
    for category in data["categories"]:
        name = _field(category, "name", str, where)
        if name not in PARTS:
            raise ConfigError(f"{path}: category {name!r} is none of PartImageNet's 40 parts"
                              f" ({PARTS[0]!r}, ...): is this PartImageNet's file?")
        category_id = _field(category, "id", int, where)
        if category_id in value:
            raise ConfigError(f"{path}: two categories have the id {category_id}"
                              f" ({PARTS[value[category_id] - 1]!r} and {name!r}), so its"
                              f" annotations' parts are ambiguous. Give each category its own"
                              f" id, as PartImageNet's file does (0..39).")
        value[category_id] = PARTS.index(name) + 1
    images: dict[int, tuple[str, int, int]] = {}
    names: dict[str, int] = {}  # a mask's name (the file name's last part) -> its image id
    for image in data["images"]:
        image_id, file_name, height, width = _image_record(image, where)
        if image_id in images:
            raise ConfigError(f"{path}: two images have the id {image_id}"
                              f" ({_short(images[image_id][0])} and {_short(file_name)}), so"
                              f" their annotations are ambiguous. Give each image its own id.")
        name = Path(file_name).name
        if name in names:
            raise ConfigError(f"{path}: images {names[name]} and {image_id} are both"
                              f" {_short(name)}: one mask file each, so one record per image."
                              f" Remove the repeated record or merge its annotations.")
        images[image_id], names[name] = (file_name, height, width), image_id
    by_image: dict[int, list[dict[str, Any]]] = {key: [] for key in images}
    for annotation in data["annotations"]:
        image_id = _field(annotation, "image_id", int, where)
        category_id = _field(annotation, "category_id", int, where)
        if image_id not in images or category_id not in value:
            raise ConfigError(f"{path}: annotation {_short(annotation.get('id'))} names image"
                              f" {image_id} or category {category_id}, which the file does"
                              f" not list.")
        by_image[image_id].append(annotation)

    def masks() -> Iterator[tuple[str, np.ndarray]]:
        for image_id, (file_name, height, width) in images.items():
            image = {"file_name": file_name, "height": height, "width": width}
            mask = np.zeros((height, width), dtype=np.uint8)
            for annotation in by_image[image_id]:
                mask[_segment(annotation, image, where)] = value[annotation["category_id"]]
            yield file_name, mask

    return masks()


def png_masks(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(file name, label mask) per segmentation PNG of a PartImageNet_Seg split folder; the
    folder is checked here, each PNG as it is read (while iterating)."""
    files = sorted(p for p in folder.glob("*.png") if SYNSET.match(p.name))
    if not files:
        raise ConfigError(f"{folder} holds no PartImageNet segmentation PNG (n01440764_*.png):"
                          f" name annotations/<split>/ of PartImageNet_Seg, or a split's"
                          f" JSON file.")

    def masks() -> Iterator[tuple[str, np.ndarray]]:
        for file in files:
            raw = read_png(file)
            if raw.ndim != 2 or raw.dtype != np.uint8 or raw.max() > PNG_BACKGROUND:
                raise ConfigError(f"{file}: a PartImageNet part PNG is one 8-bit channel of"
                                  f" category ids 0..39 and {PNG_BACKGROUND} for the"
                                  f" background (not the *_whole folders' 158 classes).")
            mask = np.where(raw == PNG_BACKGROUND, 0, raw.astype(np.int64) + 1).astype(
                np.uint8)
            yield f"{file.stem}.JPEG", mask

    return masks()


def read_png(file: Path) -> np.ndarray:
    """A segmentation PNG's pixels; an unreadable file, or one over MAX_SIDE a side, is one
    clear error naming it."""
    from PIL import Image

    try:
        with Image.open(file) as opened:
            if max(opened.size) > MAX_SIDE:
                raise ConfigError(f"{file} is {opened.size[0]} x {opened.size[1]} pixels: more"
                                  f" than {MAX_SIDE:,} a side, no PartImageNet mask. Remove it"
                                  f" from the folder.")
            return np.asarray(opened)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ConfigError(f"{file} is not a readable PNG ({type(exc).__name__}: {exc!s:.80}):"
                          f" replace it with the split's own segmentation PNG, or remove it.")\
            from None


def store_rows(store: Any) -> dict[str, tuple[str, int, str, int]]:
    """file name -> (split, row, path, label) of the store's rows (padding rows left out); a
    name at several paths takes the one at ImageNet's train/<synset>/ layout, where
    PartImageNet's images come from."""
    found: dict[str, tuple[str, int, str, int]] = {}
    for split in store.splits():
        labels = store.row_labels(split)
        for row, path in enumerate(str(p) for p in store.row_paths(split)):
            name = Path(path).name
            if not path or labels[row] < 0:
                continue
            own = SYNSET.match(name) is not None and path == f"train/{synset_of(name)}/{name}"
            if name not in found or own:
                found[name] = (split, row, path, int(labels[row]))
    return found


def check_out(out: Path, force: bool) -> bool:
    """Refuse an --out that is not this command's to write; True when one is there to be
    replaced (an empty folder, or a parts folder with `force`)."""
    if str(out) in ("", ".", "..") or out.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise ConfigError(f"--out {str(out)!r} is not a folder of its own: name the parts folder"
                          f" to write (e.g. ~/data/parts).")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"--out {out} is {'a link' if out.is_symlink() else 'a file'}, not a"
                          f" parts folder: choose another --out.")
    if not out.exists():
        return False
    if not any(out.iterdir()):
        return True
    if not (out / PARTS_FILE).is_file():
        raise ConfigError(f"{out} exists and is not a parts folder (no {PARTS_FILE}): --force"
                          f" replaces parts folders only, never other data. Choose another"
                          f" --out.")
    if not force:
        raise ConfigError(f"{out} already holds a parts folder; choose another --out, or"
                          f" replace it whole with --force.")
    return True


def _mask_path(entry: dict[str, Any], where: str) -> Path:
    """Where an entry's mask goes inside the parts folder: its path with .png, refused when it
    would lead out of the folder (a store row's path that is absolute or climbs with ..)."""
    path = Path(entry["path"])
    if path.is_absolute() or not path.parts or any(p in ("", ".", "..") for p in path.parts) \
            or name_problem(path.name) is not None:
        raise ConfigError(f"{where} puts {entry['file_name']} at {entry['path']!r}, which is"
                          f" no path inside a parts folder (absolute, with .., or not a file"
                          f" name): extract the store again, or leave --store out.")
    return path.with_suffix(".png")


def convert(annotations: str | Path, out: str | Path, classnames: str | Path | None = None,
            store_url: str | None = None, only_in_store: bool = False,
            root: str | Path | None = None, force: bool = False) -> dict[str, Any]:
    """Write the parts folder `out` from a PartImageNet JSON file or PNG folder; returns
    parts.json's record (names, and per image its mask, synset, label and store row).
    `classnames`: ImageNet's classnames.txt, by default the imagenet pipeline's own
    (<data root>/imagenet/classnames.txt, the data root `root`, $SAFE_CACHE_DATA or ./data).

    The folder is written whole or not at all: the annotations are checked first, the masks
    and parts.json go into a staging folder beside `out` (atomic.atomic_dir) that is renamed
    into place at the end, and removed on any failure. An existing `out` is replaced only
    when it is empty, or a parts folder (it holds parts.json) and `force` is given; its old
    masks never mix with the new ones."""
    from PIL import Image

    from ..atomic import atomic_dir
    from ..data.datasets import resolve_data_root

    out = Path(out)
    replace = check_out(out, force)
    if classnames is None:
        classnames = resolve_data_root(root).path / "imagenet" / "classnames.txt"

    source = Path(annotations)
    if source.is_dir():
        masks = png_masks(source)
    elif source.is_file():
        masks = json_masks(source)
    else:
        raise ConfigError(f"No PartImageNet annotations at {source}: name a split's JSON"
                          f" (annotations/<split>/<split>.json) or its PNG folder.")
    wnids = read_wnids(classnames)
    label_of = {wnid: index for index, wnid in enumerate(wnids)}
    rows: dict[str, tuple[str, int, str, int]] | None = None
    classes: list[str] = []
    if store_url is not None:
        from ..store import open_store

        store = open_store(store_url)
        rows, classes = store_rows(store), store.manifest["dataset"]["classnames"]
        if len(classes) != len(wnids):
            raise ConfigError(f"{store_url} has {len(classes)} classes and {classnames}"
                              f" {len(wnids)}: PartImageNet's images need an ImageNet store.")
    images: list[dict[str, Any]] = []
    skipped: list[str] = []
    written: dict[Path, str] = {}  # mask path -> the file name it is of
    with atomic_dir(out, replace=replace) as staging:  # renamed in whole, or removed
        for file_name, mask in masks:
            name, wnid = Path(file_name).name, synset_of(file_name)
            if wnid not in label_of:
                raise ConfigError(f"{file_name}: synset {wnid} is not in {classnames},"
                                  f" ImageNet's 1000 classes.")
            entry: dict[str, Any] = {"file_name": name, "synset": wnid, "label": label_of[wnid],
                                     "path": f"train/{wnid}/{name}",
                                     "parts": [PARTS[int(v) - 1] for v in np.unique(mask) if v]}
            if rows is not None:
                if name not in rows:
                    if only_in_store:
                        skipped.append(name)
                        continue
                    raise ConfigError(f"{name} is not in {store_url}: extract a store holding"
                                      f" PartImageNet's images, pass --only-in-store to"
                                      f" convert only those it holds, or leave --store out.")
                split, row, path, label = rows[name]
                if label != label_of[wnid]:
                    raise ConfigError(f"{store_url} labels {path} {label} ({classes[label]}),"
                                      f" but {classnames} puts {wnid} at {label_of[wnid]}: the"
                                      f" store's classes are not in that file's order.")
                entry.update(path=path, split=split, row=row, classname=classes[label])
            target = _mask_path(entry, store_url or str(source))
            if target in written:
                raise ConfigError(f"{source}: {written[target]} and {file_name} would both be"
                                  f" the mask {target}: one record per image. Remove the"
                                  f" repeated one.")
            written[target] = file_name
            (staging / target).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(staging / target)
            images.append(entry)
        record: dict[str, Any] = {"names": list(PARTS), "source": f"PartImageNet: {source}",
                                  "images": images, "skipped": skipped}
        if rows is not None:
            record["rows"] = {split: sorted(e["row"] for e in images if e["split"] == split)
                              for split in sorted({e["split"] for e in images})}
        (staging / PARTS_FILE).write_text(json.dumps(record, indent=1, allow_nan=False))
    return record
