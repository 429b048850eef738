"""The in-process extraction pipeline: reader -> trunk -> writer, unit by unit.

reader (DataLoader workers decode images and build the center and augmented views, or with
`--decode device` read the files and leave decoding and views to the device) -> trunk
(this process, on the device: `Backbone.forward_features`, then the original head's
`forward_head` for the pooled features) -> writer (a background thread writes whole write
units). Work is cut into the store's write units: a unit is computed in the same batches in
every run and recorded complete only after its data is written, so a run killed at any moment
resumes from the last complete unit and ends with exactly the arrays of an uninterrupted run.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypedDict

import numpy as np
import torch

from ..data.datasets import Dataset
from ..data.device_views import DeviceViews, EncodedDataset, collate_encoded
from ..data.views import ViewDataset, ViewRecipe, WorkItem
from ..errors import DeviceMemoryError, ExtractError
from ..model.backbone import Backbone
from ..runtime.cluster import auto_workers, decode_workers
from ..runtime.device import out_of_memory_reason
from ..runtime.progress import ProgressSink
from ..runtime.threads import thread_policy
from ..store import FeatureStore
from .config import ExtractConfig


def row_index(store: FeatureStore, split: str, readable_only: bool = False) -> dict[str, int]:
    """path -> row of every row reserved in the store (padding rows have no path), or only of
    the readable ones (complete and not skipped)."""
    if not store.has_split(split):
        return {}
    paths = store.row_paths(split)
    rows = store.readable_rows(split) if readable_only else range(len(paths))
    return {str(paths[row]): int(row) for row in rows if paths[row]}


def plan_split(store: FeatureStore, dataset: Dataset, split: str, wanted: list[int],
               recipe: ViewRecipe) -> list[WorkItem]:
    """Reserve rows for the wanted entries not yet in the store; return what is still to
    extract, image by image, unit by unit."""
    entries = dataset.splits[split]
    known = row_index(store, split)
    new = [i for i in wanted if entries[i].path not in known]
    if new:
        store.append_rows(split, [entries[i].path for i in new],
                          [entries[i].label for i in new])
    labels, paths = store.row_labels(split), store.row_paths(split)
    unit, views = store.layout.unit, recipe.count if split == "train" else 0
    status = store.unit_status(split)
    first_view = status.first_missing_view()  # per unit: 0 = everything to do
    flip = status.flip_missing()
    return [WorkItem(row, dataset.image_root / str(paths[row]), str(paths[row]),
                     int(first_view[u]), bool(flip[u]))
            for u in np.flatnonzero((first_view < max(views, 1)) | flip).tolist()
            for row in range(u * unit, min((u + 1) * unit, len(labels))) if labels[row] >= 0]


def extract_items(store: FeatureStore, backbone: Backbone, split: str, items: list[WorkItem],
                  recipe: ViewRecipe, config: ExtractConfig, progress: ProgressSink,
                  skipped: list[dict[str, str]]) -> int:
    """Decode, encode and write `items` (whole write units of one split); returns their count.
    Unreadable images stop the run, or with `skip_bad` become padding and go to `skipped`."""
    if not items:
        return 0
    unit, views = store.layout.unit, recipe.count if split == "train" else 0
    total_rows = store.row_count(split)
    # Starting worker processes costs ~0.3 s: not worth it for a split of a batch or two.
    workers = decode_workers(auto_workers(config.workers)
                             if len(items) > 2 * config.batch_size else 0)
    loader, make_views = _loader(items, backbone, recipe if views else None, config, unit, workers)
    task = progress.start(f"{store.manifest['dataset']['name']} {split}", len(items),
                          unit="img")
    # The configured decoding workers' cores first (workers + torch threads <= the cores we
    # may use), one count for the whole run and never from the load: a convolution's float
    # sums depend on the thread count, and a resumed or distributed extraction must store
    # bitwise the maps an uninterrupted one stores (tests/test_extract.py kills one midway).
    with _Writer(store, split, config.writer_threads) as writer, \
            thread_policy(reserve=auto_workers(config.workers), adapt=False) as threads:
        current: dict[str, Any] | None = None
        for batch in loader:
            threads.tick()
            try:
                rows, centers, augmented, errors, first, flip = make_views(batch)
                rows, first, flip = rows.tolist(), int(first[0]), bool(flip[0])
                _check_errors(store, split, rows, errors, config, skipped)
                features = _encode(backbone, centers, augmented, config.precision,
                                   center=first == 0, flip=flip)
            except torch.OutOfMemoryError as exc:
                raise _out_of_memory(backbone, config, split, exc) from None
            unit_index = rows[0] // unit
            if current is None or current["unit"] != unit_index:
                if current is not None:
                    writer.put(current)
                current = _new_unit(unit_index, unit, total_rows, features, first)
            for name, values in features.items():
                current["features"][name][np.asarray(rows) - unit_index * unit] = values
            progress.advance(task, len(rows))
        if current is not None:
            writer.put(current)
    progress.finish(task)
    return len(items)


class _LoaderOptions(TypedDict):
    """What both readers' DataLoaders share."""

    batch_sampler: list[list[int]]
    num_workers: int
    persistent_workers: bool
    pin_memory: bool


def _loader(items: list[WorkItem], backbone: Backbone, recipe: ViewRecipe | None,
            config: ExtractConfig, unit: int, workers: int
            ) -> tuple[torch.utils.data.DataLoader[Any], Callable[[Any], Any]]:
    """The reader: (DataLoader, batch -> views). `--decode workers`: the workers decode with
    PIL and build every view (ViewDataset); `--decode device`: they read the files' bytes, and
    the views are decoded and cut on the trunk's device (device_views.py)."""
    common: _LoaderOptions = {"batch_sampler": _unit_batches(items, unit, config.batch_size),
                              "num_workers": workers, "persistent_workers": False,
                              "pin_memory": backbone.device.type == "cuda"}
    if config.decode == "device":
        decoder = DeviceViews(backbone.card, backbone.preprocess, recipe, backbone.device)
        return torch.utils.data.DataLoader(EncodedDataset(items, config.max_pixels),
                                           collate_fn=collate_encoded, **common), decoder
    dataset = ViewDataset(items, backbone.preprocess, backbone.card, recipe, config.max_pixels)
    return torch.utils.data.DataLoader(dataset, **common), _as_is


def _as_is(batch: Any) -> Any:
    return batch


def _out_of_memory(backbone: Backbone, config: ExtractConfig, split: str,
                   exc: BaseException) -> DeviceMemoryError:
    """One line: where, the fixes, and that the store resumes."""
    first = out_of_memory_reason(exc)
    fixes = [f"--batch-size {max(1, config.batch_size // 2)}"]
    if config.precision == "fp32" and backbone.device.type == "cuda":
        fixes.append("--precision fp16")
    fixes.append("fewer --workers (each holds a batch of decoded images)")
    return DeviceMemoryError(
        f"Out of memory on {backbone.device} extracting {split} at batch size"
        f" {config.batch_size} ({first}). Try {', '.join(fixes)}. The units written so far are"
        f" kept: run the same command again to resume.")


def _unit_batches(items: list[WorkItem], unit: int, batch_size: int) -> list[list[int]]:
    """Batches of item positions that never cross a write unit: identical in every run."""
    batches: list[list[int]] = []
    current: list[int] = []
    current_unit: int | None = None
    for position, item in enumerate(items):
        if current and (item.row // unit != current_unit or len(current) == batch_size):
            batches.append(current)
            current = []
        current.append(position)
        current_unit = item.row // unit
    if current:
        batches.append(current)
    return batches


def _new_unit(index: int, unit: int, total: int, features: dict[str, np.ndarray],
              first_view: int) -> dict:
    rows = min(unit, total - index * unit)
    return {"unit": index, "first_view": first_view, "features": {
        name: np.zeros((rows, *values.shape[1:]), dtype=values.dtype)
        for name, values in features.items()}}


def _check_errors(store, split, rows, errors, config, skipped) -> None:
    for row, error in zip(rows, errors, strict=True):
        if not error:
            continue
        if not config.skip_bad:
            raise ExtractError(f"Unreadable image in {split}: {error}. Nothing of its write unit"
                               f" was recorded. Fix or remove the image, or pass --skip-bad to"
                               f" record it in the store's card and go on.")
        store.mark_padding(split, row)  # never readable; its unit is written without it
        skipped.append({"split": split, "row": int(row), "error": error})


@torch.no_grad()
def _encode(backbone: Backbone, centers: torch.Tensor, augmented: torch.Tensor,
            precision: str, *, center: bool, flip: bool) -> dict[str, np.ndarray]:
    """Trunk + original head on the center views (if `center`), their mirror images (if
    `flip`: the center crop flipped left-right) and the augmented views."""
    device = backbone.device
    out = {}
    if center:
        dense, pooled = _trunk_and_head(backbone, centers.to(device, non_blocking=True),
                                        precision)
        out["dense"], out["pooled"] = dense, pooled
    if flip:
        mirrored = centers.flip(-1).to(device, non_blocking=True)
        out["flip_dense"], out["flip_pooled"] = _trunk_and_head(backbone, mirrored, precision)
    if augmented.shape[1]:
        batch, views = augmented.shape[:2]
        flat = augmented.flatten(0, 1).to(device, non_blocking=True)
        dense, pooled = _trunk_and_head(backbone, flat, precision)
        out["aug_dense"] = dense.reshape(batch, views, *dense.shape[1:])
        out["aug_pooled"] = pooled.reshape(batch, views, -1)
    return out


def _trunk_and_head(backbone: Backbone, images: torch.Tensor, precision: str):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    if dtype is not None and images.device.type == "cuda":
        with torch.autocast("cuda", dtype=dtype):
            dense = backbone.forward_features(images)
    else:
        dense = backbone.forward_features(images)
    dense = dense.float()
    pooled = backbone.forward_head(dense)
    # The store keeps maps in float16: cast on the device (the same round-to-nearest as numpy),
    # so the copy to the host moves half the bytes and the writer threads skip the cast.
    return dense.half().cpu().numpy(), pooled.float().cpu().numpy()


class _Writer:
    """Background threads that write whole units, so decoding and the trunk never wait on
    compression and I/O; at most two units per thread wait in the queue (bounded memory).

    Several threads write different units at once: each unit's chunks (or shard) are its own
    objects, and blosc compression and file I/O release the GIL; the per-unit completion flags
    share chunks, so the store serialises their updates (FeatureStore's bookkeeping lock).
    """

    def __init__(self, store: FeatureStore, split: str, threads: int = 1) -> None:
        self.store, self.split = store, split
        self.queue: queue.Queue = queue.Queue(maxsize=2 * threads)
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._run, daemon=True,
                                         name=f"safe-cache-writer-{i}") for i in range(threads)]

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    if item["first_view"]:  # only what an existing unit lacks
                        self.store.write_parts(self.split, item["unit"], item["features"],
                                               item["first_view"])
                    else:
                        self.store.write_unit(self.split, item["unit"], item["features"])
                except BaseException as exc:  # re-raised in the main thread
                    self.error = exc

    def put(self, item: dict) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def __enter__(self) -> _Writer:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        for _thread in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()
        if self.error is not None and exc_type is None:
            raise self.error
