"""`safe-cache verify`: check a store against its own card, chunk by chunk.

Schema version, card fields and fingerprint, array names, shapes and dtypes against the card,
completeness, and for every complete write unit: its chunk objects exist and decode, and its
values are finite. Returns the list of problems (empty when the store is sound).
"""

from __future__ import annotations

from typing import Any

import fsspec
import numpy as np

from .cards import card_fingerprint
from .errors import StoreError
from .store import FeatureStore, open_store

REQUIRED_CARD = ("schema_version", "backbone", "backbone_fingerprint", "dataset", "views",
                 "shapes", "layout", "tool_version", "created")


def expected_arrays(card: dict[str, Any], split: str) -> dict[str, tuple[tuple, str]]:
    """Array name -> (shape after the image axis, dtype) that the card implies."""
    backbone, views = card["backbone"], card["views"].get("count", 0)
    t, c, d = backbone["T"], backbone["C"], backbone["D"]
    arrays = {"path": ((), None), "label": ((), "int32"), "dense": ((t, c), "float16"),
              "pooled": ((d,), "float32")}
    if split == "train" and views:
        arrays["aug_dense"] = ((views, t, c), "float16")
        arrays["aug_pooled"] = ((views, d), "float32")
    return arrays


def verify_store(url: str, *, storage_options: dict | None = None) -> list[str]:
    try:
        store = open_store(url, "r", storage_options=storage_options)
    except StoreError as exc:
        return [str(exc)]
    card = store.card
    problems = [f"card: missing field '{key}'" for key in REQUIRED_CARD if key not in card]
    if problems:
        return problems
    if card_fingerprint(card["backbone"]) != card["backbone_fingerprint"]:
        problems.append("card: the backbone card does not match its fingerprint (edited?)")
    for key in ("T", "C", "D"):
        if card["shapes"].get(key) != card["backbone"].get(key):
            problems.append(f"card: shapes.{key}={card['shapes'].get(key)} but backbone.{key}="
                            f"{card['backbone'].get(key)}")
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    for split in store.splits():
        problems += _verify_split(store, split, fs, root.rstrip("/"))
    problems += _verify_extras(store)
    return problems


def _verify_split(store: FeatureStore, split: str, fs, root: str) -> list[str]:
    card, group = store.card, store.arrays(split)
    problems = []
    rows = group["label"].shape[0]
    for name, (tail, dtype) in expected_arrays(card, split).items():
        if name not in group:
            problems.append(f"{split}/{name}: missing")
            continue
        array = group[name]
        if tuple(array.shape) != (rows, *tail):
            problems.append(f"{split}/{name}: shape {tuple(array.shape)}, card implies"
                            f" {(rows, *tail)}")
        if dtype and str(array.dtype) != dtype:
            problems.append(f"{split}/{name}: dtype {array.dtype}, expected {dtype}")
    if problems:
        return problems
    unit = store.layout.unit
    complete = np.zeros(group["complete"].shape[0], dtype=bool)
    complete[store.complete_units(split)] = True
    missing = np.flatnonzero(~complete)
    if missing.size:
        problems.append(f"{split}: {missing.size} of {complete.size} write units incomplete"
                        f" (units {missing[:10].tolist()}{'...' if missing.size > 10 else ''})")
    keys = set(fs.find(f"{root}/{split}"))
    for u in np.flatnonzero(complete):
        problems += _verify_unit(group, split, int(u), unit, keys, f"{root}/{split}")
    return problems


def _verify_unit(group, split: str, unit: int, rows_per_unit: int, keys: set[str],
                 prefix: str) -> list[str]:
    problems = []
    start, stop = unit * rows_per_unit, min((unit + 1) * rows_per_unit, group["label"].shape[0])
    valid = group["label"][start:stop] >= 0
    for name in ("dense", "pooled", "aug_dense", "aug_pooled"):
        if name not in group:
            continue
        array = group[name]
        views = range(array.shape[1]) if name.startswith("aug") else [0]
        expected = [f"{prefix}/{name}/c/" + "/".join([str(unit), str(v)] + ["0"] * (array.ndim - 2))
                    for v in views]
        absent = [key for key in expected if key not in keys]
        if absent:
            problems.append(f"{split}/{name}: chunk of unit {unit} is missing ({absent[0]})")
            continue
        try:
            values = array[start:stop]
        except Exception as exc:  # a truncated or corrupt chunk fails in its codec
            problems.append(f"{split}/{name}: chunk of unit {unit} is unreadable ({exc!r:.120})")
            continue
        if not np.isfinite(values[valid]).all():
            problems.append(f"{split}/{name}: unit {unit} holds NaN or Inf")
    return problems


def _verify_extras(store: FeatureStore) -> list[str]:
    problems = []
    card = store.card
    classes = card["dataset"].get("num_classes")
    if "text" in store.group:
        for name in store.group["text"].group_keys():
            shape = store.group[f"text/{name}/classifier"].shape
            if shape != (classes, card["backbone"]["D"]):
                problems.append(f"text/{name}: classifier shape {shape}, expected"
                                f" {(classes, card['backbone']['D'])}")
    if "fewshot" in store.group:
        readable = {split: set(store.readable_rows(split).tolist()) for split in store.splits()}
        for seed in store.group["fewshot"].group_keys():
            for shots in store.group[f"fewshot/{seed}"].group_keys():
                node = store.group[f"fewshot/{seed}/{shots}"]
                for split in ("train", "val"):
                    rows = node[f"{split}_rows"][:]
                    lost = [r for r in rows.tolist() if r not in readable.get(split, set())]
                    if lost:
                        problems.append(f"fewshot/{seed}/{shots}: {len(lost)} {split} rows are"
                                        f" not readable (e.g. {lost[:5]})")
    return problems
