"""The ONE table of a store's arrays: what store creation, verify, the chunk cache and readers
all read, so the layout is written down once.

Per split (`train`, `val`, `test`) a Zarr group holds row arrays (one row per image), feature
arrays (the trunk's output, immutable once their write unit is complete) and bookkeeping arrays
(one flag per write unit, or per unit and view). Train also holds the augmented views, cut one
chunk per (unit, view) so views can be added to an existing store later, and the mirrored
center view (`flip_*`, the manifest's `center_flip`: the second training sample of the `safe`
fit recipe), also addable later. Dimension names map to the backbone card's sizes: token -> T,
channel -> C, embed -> D, view -> the store's view count.

Changing this table changes the store format: bump `SCHEMA_VERSION` and keep reading the old one.
Arrays marked `optional` may be absent (stores written before they existed stay version 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

SCHEMA_VERSION = 2  # 2: the card says tokens/channels/embed_dim/token_grid (compat.py)
SPLITS = ("train", "val", "test")
MANIFEST_ATTRIBUTE = "safe_cache"  # the root zarr.json attribute holding the store manifest
MANIFEST_FIELDS = ("schema_version", "backbone", "backbone_fingerprint", "dataset", "views",
                   "shapes", "layout", "tool_version", "created")

Role = Literal["row", "feature", "bookkeeping"]
Part = Literal["center", "views", "flip"]


@dataclass(frozen=True)
class ArraySpec:
    """One array of a split.

    role: "row" arrays are written when rows are reserved (paths, labels); "feature" arrays are
    the trunk's output, chunked by image rows (whole maps per chunk), compressed with the store
    layout's codec, sharded on object stores and cacheable (immutable once their unit is
    complete); "bookkeeping" arrays hold one completion flag per chunk of one element, so
    concurrent writers never share a chunk. `per_view` arrays are cut one chunk per view.

    part: the part of a write unit a feature or bookkeeping array belongs to (the completion
    map): each part's one bookkeeping array is its flag, set only once every feature array of
    that part is written for the unit (and view), so parts can be added to a store later. The
    arrays of a part share the flag's prefix (`aug_` for views, `flip_` for the mirrored view).
    """

    name: str
    dims: tuple[str, ...]
    dtype: str  # "str" for variable-length strings
    fill: Any
    role: Role
    splits: tuple[str, ...] = SPLITS
    per_view: bool = False
    compressed: bool | None = None  # None: zarr's default codec; False: none; True: the layout's
    optional: str | None = None  # the manifest flag that says whether the store has it
    part: Part | None = None  # feature and bookkeeping arrays: the unit part they belong to
    about: str = ""  # what it holds, for docs/store.md

    def tail(self, shapes: dict[str, int], views: int) -> tuple[int, ...]:
        """The shape after the first axis (image or unit), from the card's sizes."""
        sizes = {"token": shapes["tokens"], "channel": shapes["channels"],
                 "embed": shapes["embed_dim"],
                 "view": views}
        return tuple(sizes[dim] for dim in self.dims[1:])

    @property
    def cacheable(self) -> bool:
        return self.role == "feature"


ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("path", ("image",), "str", None, "row",
              about="image path, relative to the dataset's image folder"),
    ArraySpec("label", ("image",), "int32", -1, "row", compressed=False,
              about="class index (-1: a padding row)"),
    ArraySpec("dense", ("image", "token", "channel"), "float16", 0, "feature", compressed=True,
              part="center", about="the center view's dense map (the trunk's output)"),
    ArraySpec("pooled", ("image", "embed"), "float32", 0, "feature", compressed=True,
              part="center", about="the original head's output for the center view"),
    ArraySpec("aug_dense", ("image", "view", "token", "channel"), "float16", 0, "feature",
              splits=("train",), per_view=True, compressed=True, part="views",
              about="the augmented views' dense maps, row-aligned with `dense`"),
    ArraySpec("aug_pooled", ("image", "view", "embed"), "float32", 0, "feature",
              splits=("train",), per_view=True, compressed=True, part="views",
              about="the original head's output for each augmented view"),
    ArraySpec("aug_complete", ("unit", "view"), "uint8", 0, "bookkeeping", splits=("train",),
              per_view=True, part="views", about="1 once that view of a write unit is written"),
    ArraySpec("flip_dense", ("image", "token", "channel"), "float16", 0, "feature",
              splits=("train",), compressed=True, optional="center_flip", part="flip",
              about="the mirrored center view's dense map"),
    ArraySpec("flip_pooled", ("image", "embed"), "float32", 0, "feature", splits=("train",),
              compressed=True, optional="center_flip", part="flip",
              about="the original head's output for the mirrored center view"),
    ArraySpec("flip_complete", ("unit",), "uint8", 0, "bookkeeping", splits=("train",),
              optional="center_flip", part="flip",
              about="1 once a write unit's mirrored view is written"),
    ArraySpec("complete", ("unit",), "uint8", 0, "bookkeeping", part="center",
              about="1 once a write unit (a chunk of rows) is fully written"),
)
BY_NAME = {spec.name: spec for spec in ARRAYS}
FEATURES = tuple(spec.name for spec in ARRAYS if spec.role == "feature")
BOOKKEEPING = tuple(spec.name for spec in ARRAYS if spec.role == "bookkeeping")


@dataclass(frozen=True)
class UnitPart:
    """One part of a write unit, read off ARRAYS: its completion flag and the feature arrays
    that flag covers. The center part's flag is `complete`; a unit is readable once every part
    its split holds is written."""

    name: str
    flag: ArraySpec
    features: tuple[ArraySpec, ...]

    @property
    def prefix(self) -> str:
        """What the names of the part's arrays start with ("" for the center view)."""
        return self.flag.name.removesuffix("complete")

    @property
    def per_view(self) -> bool:
        """Whether the part is written (and flagged) view by view."""
        return self.flag.per_view


def _parts() -> dict[str, UnitPart]:
    """Each part's flag and feature arrays, in the table's order (the center view first)."""
    names = dict.fromkeys(spec.part for spec in ARRAYS if spec.part)
    flags = {spec.part: spec for spec in ARRAYS if spec.role == "bookkeeping"}
    return {part: UnitPart(part, flags[part], tuple(spec for spec in ARRAYS if spec.part == part
                                                    and spec.role == "feature"))
            for part in names}


PARTS: dict[str, UnitPart] = _parts()  # the completion map: part -> its flag and arrays


def split_arrays(split: str, views: int, flags: dict[str, Any] | None = None) -> list[ArraySpec]:
    """The arrays a split holds in a store with `views` augmented views (none without views)
    and the optional arrays its manifest `flags` (e.g. {"center_flip": True}) turn on."""
    flags = flags or {}
    return [spec for spec in ARRAYS
            if split in spec.splits and (views > 0 or not spec.per_view)
            and (spec.optional is None or flags.get(spec.optional))]


def optional_group(flag: str) -> list[ArraySpec]:
    """The arrays one optional manifest flag adds."""
    return [spec for spec in ARRAYS if spec.optional == flag]


def chunk_keys(spec: ArraySpec, unit: int, views: int, ndim: int) -> list[str]:
    """Keys (relative to the array) of one write unit's chunk objects: one per view for
    per-view arrays. A unit is one chunk along images, or one shard on object stores."""
    rest = ["0"] * (ndim - (2 if spec.per_view else 1))
    if spec.per_view:
        return ["c/" + "/".join([str(unit), str(view), *rest]) for view in range(views)]
    return ["c/" + "/".join([str(unit), *rest])]


# Chunk (or shard) objects of the feature arrays: <split>/<array>/c/<indices>.
_CACHEABLE = re.compile("^({})/({})/c/[0-9/]+$".format(
    "|".join(SPLITS), "|".join(spec.name for spec in ARRAYS if spec.cacheable)))


def is_cacheable(key: str) -> bool:
    """True for a store key that is a feature chunk: immutable once its unit is complete."""
    return bool(_CACHEABLE.match(key))


GROUP_NODES = (  # the nodes beside the split arrays: (path, what it holds)
    ("zarr.json", "the root group; attribute `safe_cache` is the sealed manifest (backbone card"
                  " and fingerprint, dataset, views recipe, layout, versions, times)"),
    ("lease/", "the writer lease (host, pid, start, heartbeat)"),
    ("fewshot/seed<S>/shots<K>/train_rows, val_rows", "row indices of a CoOp few-shot draw"),
    ("text/<prompt set>/classifier", "(class, embed) float32, the zero-shot classifier"),
    ("text/<prompt set>/embeddings", "(sentence, embed) float32, each sentence's raw embedding;"
                                     " the sentences in the group's attributes"),
    ("head/<parameter>", "the original pooling head's weights (open_clip names); its model"
                         " config in the group's attributes"),
)


def describe_arrays() -> str:
    """The store layout as a markdown table, from ARRAYS and GROUP_NODES (docs/store.md holds
    it, and a test checks that it is this): the one table of arrays, written once. A flag's
    row names the arrays it covers (the completion map)."""
    rows = ["| path | dims | dtype | what |", "|---|---|---|---|"]
    for path, what in GROUP_NODES:
        rows.append(f"| `{path}` | | | {what} |")
    for spec in ARRAYS:
        notes = []
        if spec.role == "bookkeeping":
            assert spec.part is not None  # every flag covers a part
            covered = ", ".join(f"`{feature.name}`" for feature in PARTS[spec.part].features)
            notes.append(f"covers {covered}")
        if spec.optional:
            notes.append(f"only with `{spec.optional}` in the manifest")
        what = spec.about + (f" ({'; '.join(notes)})" if notes else "")
        rows.append(f"| `{{{','.join(spec.splits)}}}/{spec.name}` | ({', '.join(spec.dims)}) |"
                    f" {spec.dtype} | {what} |".replace("`{train}/", "`train/"))
    return "\n".join(rows) + "\n"
