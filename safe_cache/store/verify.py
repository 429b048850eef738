"""`safe-cache verify`: check a store against its own manifest, chunk by chunk.

Schema version, manifest fields and backbone fingerprint, array names, shapes and dtypes against
the schema table and the manifest, completeness, and for every complete write unit: its chunk
objects exist and decode, and its values are finite. Returns the list of problems (empty when the
store is sound).

verify is the store's own auditor: it reads the raw zarr arrays of the store it opened
(`FeatureStore._group`), which nothing outside safe_cache/store/ may do.
"""

from __future__ import annotations

from typing import Any

import fsspec
import numpy as np
import zarr

from ..errors import StoreError
from ..records import StoreManifest
from .schema import BY_NAME, FEATURES, MANIFEST_FIELDS, chunk_keys, split_arrays
from .store import (
    FeatureStore,
    array_at,
    group_at,
    manifest_problems,
    open_store,
    read,
    seal_store,
    small_array_problem,
)


def expected_arrays(manifest: dict[str, Any], split: str
                    ) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """Row and feature array name -> (shape after the image axis, dtype) that the schema and the
    manifest imply (None: a string dtype, whose name differs between zarr versions)."""
    views = manifest["views"].get("count", 0)
    return {spec.name: (spec.tail(manifest["backbone"], views),
                        None if spec.dtype == "str" else spec.dtype)
            for spec in split_arrays(split, views, manifest) if spec.role != "bookkeeping"}


def verify_store(url: str, *, storage_options: dict[str, Any] | None = None) -> list[str]:
    try:
        store = open_store(url, "r", storage_options=storage_options, check_fingerprint=False)
    except StoreError as exc:
        return [str(exc)]
    manifest = store.manifest
    problems = [f"card: missing field '{key}'" for key in MANIFEST_FIELDS
                if key not in manifest]
    if problems:
        return problems
    try:
        StoreManifest.from_dict(manifest, "manifest")
    except StoreError as exc:
        return [str(exc)]  # malformed: its sizes cannot be used to check the data
    # edited or unsealed: reported, data checked (the seal is over the stored schema's form)
    problems = manifest_problems(url, store.stored_manifest())
    for key in ("tokens", "channels", "embed_dim"):
        if manifest["shapes"].get(key) != manifest["backbone"].get(key):
            problems.append(f"card: shapes.{key}={manifest['shapes'].get(key)} but backbone."
                            f"{key}={manifest['backbone'].get(key)}")
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    for split in store.splits():
        problems += _verify_split(store, split, fs, root.rstrip("/"))
    problems += _verify_extras(store)
    return problems


def seal_verified(url: str, *, storage_options: dict[str, Any] | None = None) -> list[str]:
    """verify, then seal the manifest of a store whose only problem is that it carries no seal
    (a store of an older safe-cache): the person asking has checked what it names."""
    problems = verify_store(url, storage_options=storage_options)
    if any("carries no manifest_sha256" not in p and "carries no sha256" not in p
           for p in problems):
        return problems
    with open_store(url, "a", storage_options=storage_options, check_fingerprint=False) as store:
        seal_store(store)
    return []


def _verify_split(store: FeatureStore, split: str, fs: Any, root: str) -> list[str]:
    manifest, group = store.manifest, store._arrays(split)
    problems = []
    rows = array_at(group, "label").shape[0]
    for name, (tail, dtype) in expected_arrays(manifest, split).items():
        if name not in group:
            problems.append(f"{split}/{name}: missing")
            continue
        array = array_at(group, name)
        if tuple(array.shape) != (rows, *tail):
            problems.append(f"{split}/{name}: shape {tuple(array.shape)}, card implies"
                            f" {(rows, *tail)}")
        if dtype and str(array.dtype) != dtype:
            problems.append(f"{split}/{name}: dtype {array.dtype}, expected {dtype}")
    if problems:
        return problems
    unit = store.layout.unit
    complete = np.zeros(array_at(group, "complete").shape[0], dtype=bool)
    complete[store.complete_units(split)] = True
    missing = np.flatnonzero(~complete)
    if missing.size:
        problems.append(f"{split}: {missing.size} of {complete.size} write units incomplete"
                        f" (units {missing[:10].tolist()}{'...' if missing.size > 10 else ''})")
    keys = set(fs.find(f"{root}/{split}"))
    for u in np.flatnonzero(complete):
        problems += _verify_unit(group, split, int(u), unit, keys, f"{root}/{split}",
                                 manifest["dataset"]["num_classes"])
    return problems


def _verify_unit(group: zarr.Group, split: str, unit: int, rows_per_unit: int, keys: set[str],
                 prefix: str, classes: int) -> list[str]:
    problems = []
    start, stop = unit * rows_per_unit, min((unit + 1) * rows_per_unit,
                                            array_at(group, "label").shape[0])
    labels = read(array_at(group, "label"), slice(start, stop))
    valid = labels >= 0
    if (labels < -1).any() or (labels >= classes).any():
        problems.append(f"{split}/label: unit {unit} holds labels outside -1..{classes - 1}"
                        f" (damaged)")
    for name in FEATURES:
        if name not in group:
            continue
        array = array_at(group, name)
        spec = BY_NAME[name]
        views = array.shape[1] if spec.per_view else 0
        expected = [f"{prefix}/{name}/{key}" for key in chunk_keys(spec, unit, views, array.ndim)]
        absent = [key for key in expected if key not in keys]
        if absent:
            problems.append(f"{split}/{name}: chunk of unit {unit} is missing ({absent[0]})")
            continue
        try:
            values = read(array, slice(start, stop))
        except Exception as exc:  # a truncated or corrupt chunk fails in its codec
            problems.append(f"{split}/{name}: chunk of unit {unit} is unreadable ({exc!r:.120})")
            continue
        if not np.isfinite(values[valid]).all():
            problems.append(f"{split}/{name}: unit {unit} holds NaN or Inf")
    return problems


def _verify_extras(store: FeatureStore) -> list[str]:
    problems: list[str] = []
    manifest = store.manifest
    classes = manifest["dataset"].get("num_classes")
    if "text" in store._group:
        for name in group_at(store._group, "text").group_keys():
            shape = array_at(store._group, f"text/{name}/classifier").shape
            if shape != (classes, manifest["backbone"]["embed_dim"]):
                problems.append(f"text/{name}: classifier shape {shape}, expected"
                                f" {(classes, manifest['backbone']['embed_dim'])}")
    for key in store.small_arrays():
        problem, _ = small_array_problem(array_at(store._group, key))
        if problem:
            problems.append(f"{key}: {problem}")
    if "fewshot" in store._group:
        readable = {split: set(store.readable_rows(split).tolist()) for split in store.splits()}
        for seed in group_at(store._group, "fewshot").group_keys():
            for shots in group_at(store._group, f"fewshot/{seed}").group_keys():
                node = group_at(store._group, f"fewshot/{seed}/{shots}")
                for split in ("train", "val"):
                    rows = read(array_at(node, f"{split}_rows"))
                    lost = [r for r in rows.tolist() if r not in readable.get(split, set())]
                    if lost:
                        problems.append(f"fewshot/{seed}/{shots}: {len(lost)} {split} rows are"
                                        f" not readable (e.g. {lost[:5]})")
    return problems
