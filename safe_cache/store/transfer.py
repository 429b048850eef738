"""`safe-cache copy SRC DST`: publish a store to a shared location (or fetch one), then verify.

Object by object through fsspec, so any pair of locations works (local folder, s3://, gs://,
memory://). The root `zarr.json` (the card) is written last: until the copy is complete, DST
holds no store and no reader can mistake it for one. An interrupted copy is resumed by running
the same command again: objects already at DST with the source's size are not sent twice.
After the copy, DST is verified (`verify_store`) and its objects are compared with SRC's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..errors import StoreError
from ..runtime.progress import ProgressSink, null_progress
from .store import open_store
from .verify import verify_store

BATCH_BYTES = 256 * 2**20  # objects read and written together (s3fs sends them concurrently)


@dataclass
class CopyReport:
    source: str
    destination: str
    objects: int = 0
    bytes: int = 0
    already_there: int = 0  # objects a previous, interrupted copy had sent
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def _filesystem(url: str, options: dict[str, Any] | None) -> tuple[Any, str]:
    if "://" not in url:
        return LocalFileSystem(auto_mkdir=True), str(LocalFileSystem._strip_protocol(url))
    fs, path = fsspec.core.url_to_fs(url, **(options or {}))
    return fs, path.rstrip("/")


def _objects(fs: Any, root: str) -> dict[str, int]:
    """Relative key -> size of every object under root."""
    found = fs.find(root, detail=True)
    return {path[len(root):].lstrip("/"): int(info.get("size") or 0)
            for path, info in found.items() if info.get("type", "file") == "file"}


def _check_source(source: str, options: dict[str, Any] | None) -> None:
    store = open_store(source, "r", storage_options=options)
    holder = store.lease_holder()
    if holder:
        raise StoreError(f"{source} is being written (its lease is held by pid {holder['pid']}"
                         f" on {holder['host']}); copy it once that writer has finished, or"
                         f" finish it with `safe-cache extract --takeover` if the writer died.")


def _check_destination(fs: Any, root: str, destination: str) -> None:
    if fs.exists(root) and not fs.isdir(root):
        raise StoreError(f"{destination} is a file, not a folder or prefix: choose another"
                         f" destination (nothing was copied).")
    if fs.exists(f"{root}/zarr.json"):
        raise StoreError(f"{destination} already holds a store; choose another destination or"
                         f" delete it first (nothing was copied).")


def copy_store(source: str, destination: str, *, source_options: dict[str, Any] | None = None,
               destination_options: dict[str, Any] | None = None, verify: bool = True,
               progress: ProgressSink = null_progress) -> CopyReport:
    """Copy a complete store from `source` to `destination` (see the module docstring)."""
    started = time.perf_counter()
    _check_source(source, source_options)
    src_fs, src_root = _filesystem(source, source_options)
    dst_fs, dst_root = _filesystem(destination, destination_options)
    _check_destination(dst_fs, dst_root, destination)
    objects = _objects(src_fs, src_root)
    present = _objects(dst_fs, dst_root) if dst_fs.exists(dst_root) else {}
    todo = [key for key, size in sorted(objects.items())
            if key != "zarr.json" and present.get(key) != size]
    report = CopyReport(source, destination, objects=len(objects),
                        already_there=len(objects) - 1 - len(todo))
    task = progress.start(f"copy to {destination}", sum(objects[k] for k in todo)
                          + objects["zarr.json"])
    for batch in _batches(todo, objects):
        _send(src_fs, src_root, dst_fs, dst_root, batch, progress, task, objects, report)
    _send(src_fs, src_root, dst_fs, dst_root, ["zarr.json"], progress, task, objects, report)
    progress.finish(task)
    if verify:
        report.problems = _compare(objects, _objects(dst_fs, dst_root)) + verify_store(
            destination, storage_options=destination_options)
    report.seconds = time.perf_counter() - started
    return report


def _batches(keys: list[str], sizes: dict[str, int]) -> list[list[str]]:
    batches: list[list[str]] = []
    current: list[str] = []
    total = 0
    for key in keys:
        if current and total + sizes[key] > BATCH_BYTES:
            batches.append(current)
            current, total = [], 0
        current.append(key)
        total += sizes[key]
    return batches + ([current] if current else [])


def _send(src_fs: Any, src_root: str, dst_fs: Any, dst_root: str, keys: list[str],
          progress: ProgressSink, task: int, sizes: dict[str, int], report: CopyReport) -> None:
    data = src_fs.cat([f"{src_root}/{key}" for key in keys])
    dst_fs.pipe({f"{dst_root}/{key}": data[f"{src_root}/{key}"] for key in keys})
    sent = sum(sizes[key] for key in keys)
    report.bytes += sent
    progress.advance(task, sent)


def _compare(source: dict[str, int], destination: dict[str, Any]) -> list[str]:
    missing = sorted(set(source) - set(destination))
    differ = sorted(k for k in set(source) & set(destination) if source[k] != destination[k])
    problems = [f"copy: {key} is missing at the destination" for key in missing[:10]]
    problems += [f"copy: {key} has another size at the destination" for key in differ[:10]]
    if len(missing) + len(differ) > 20:
        problems.append(f"copy: {len(missing)} objects missing, {len(differ)} of another size")
    return problems
