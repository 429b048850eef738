"""Stage 1: run the frozen trunk once per image and write the dense maps to a store.

reader (DataLoader workers decode images and build the center and augmented views) -> trunk
(main process, on the device) -> writer (a background thread writes whole write units). Work is
cut into the store's write units: a unit is computed in the same batches in every run and
recorded complete only after its data is written, so a run killed at any moment resumes from the
last complete unit and ends with exactly the arrays of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backbone import Backbone, load_backbone
from .cluster import connect, decode_workers
from .datasets import Dataset, open_dataset
from .errors import SafeCacheError, StoreNotFoundError
from .fewshot import FewShot, sample_few_shot
from .progress import ProgressSink, null_progress
from .prompts import class_sentences, prompt_set_name, text_classifier
from .store import FeatureStore, StoreLayout, check_fingerprint, create_store, open_store
from .views import ViewDataset, ViewRecipe


class ExtractError(SafeCacheError):
    """Extraction stopped (an unreadable image, an incompatible store)."""


@dataclass(frozen=True)
class ExtractConfig:
    """Everything `safe-cache extract` takes; defaults are the paper's protocol."""

    dataset: str
    root: str
    model: str = "RN50"
    pretrained: str | None = "openai"
    store: str | None = None
    store_root: str = "stores"  # where the default store path lives
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: tuple[int, ...] = (1, 2, 3)
    views: int = 10
    view_seed: int = 0
    prompts: str = "hand"
    device: str = "auto"
    batch_size: int = 32
    workers: int = 2
    precision: str = "fp32"
    skip_bad: bool = False
    make_split: bool = False
    takeover: bool = False
    cut: str = "pool"
    init_seed: int = 0
    storage_options: dict | None = None
    layout: StoreLayout | None = None  # a new store's chunking (None: default_layout(url))
    scheduler: str | None = None  # a dask scheduler's address: shards run on its workers
    local_workers: int = 0  # or a LocalCluster of this many worker processes
    shard_images: int = 256  # images per distributed task, rounded up to whole write units


@dataclass
class ExtractReport:
    store: str
    rows: dict[str, int] = field(default_factory=dict)
    extracted: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0  # the whole call: loading the backbone, the classifier, the store
    pipeline_seconds: dict[str, float] = field(default_factory=dict)  # per split: read->write


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def weights_label(card: dict[str, Any]) -> str:
    """The pretrained part of a default store name: the tag, the file's hash, or random<seed>."""
    if card["pretrained"] is None:
        return f"random{card['init_seed']}"
    if str(card["pretrained"]).startswith("file:"):
        return f"file-{card['weights_sha256'][:12]}"
    return str(card["pretrained"])


def default_store_url(dataset: str, card: dict[str, Any], root: str = "stores") -> str:
    return f"{root}/{dataset}/{card['model']}-{weights_label(card)}.zarr"


def few_shot_subsets(dataset: Dataset, shots, seeds) -> dict[tuple[int, int], FewShot]:
    if "train" not in dataset.splits:
        return {}
    train = [e.label for e in dataset.splits["train"]]
    val = [e.label for e in dataset.splits["val"]]
    return {(seed, k): sample_few_shot(train, val, k, seed, dataset.classnames)
            for seed in seeds for k in shots}


def wanted_entries(dataset: Dataset, subsets: dict[tuple[int, int], FewShot]) -> dict:
    """Entry indices to extract per split: all of test, the few-shot union of train and val."""
    wanted = {"test": list(range(len(dataset.splits["test"])))}
    if subsets:
        wanted["train"] = sorted({i for s in subsets.values() for i in s.train})
        wanted["val"] = sorted({i for s in subsets.values() for i in s.val})
    return wanted


def extract(config: ExtractConfig, progress: ProgressSink = null_progress,
            client: Any = None) -> ExtractReport:
    """Extract (or complete) a store for one dataset and backbone; see the module docstring.

    With a dask `client` (or `config.scheduler` / `config.local_workers`) the trunk runs on the
    cluster's workers, shard by shard (shards.py); this process holds the store's lease, reserves
    the rows, and writes the classifier, the head and the few-shot rows.
    """
    start = time.perf_counter()
    device = resolve_device(config.device)
    backbone = load_backbone(config.model, config.pretrained, device=device, cut=config.cut,
                             init_seed=config.init_seed)
    dataset = open_dataset(config.dataset, config.root, make_split=config.make_split)
    subsets = few_shot_subsets(dataset, config.shots, config.seeds)
    recipe = ViewRecipe(count=config.views, seed=config.view_seed)
    url = config.store or default_store_url(dataset.spec.name, backbone.card, config.store_root)
    store = _open_or_create(url, backbone, dataset, recipe, config)
    recipe = ViewRecipe(count=store.card["views"]["count"], seed=recipe.seed)  # never fewer
    report = ExtractReport(store=url)
    try:
        plans = {split: _plan_split(store, dataset, split, entries, recipe)
                 for split, entries in wanted_entries(dataset, subsets).items()}
        with connect(config.scheduler, config.local_workers) if client is None \
                else contextlib.nullcontext(client) as client:
            if client is None:
                for split, items in plans.items():
                    started = time.perf_counter()
                    report.extracted[split] = extract_items(
                        store, backbone, split, items, recipe, config, progress, report.skipped)
                    report.pipeline_seconds[split] = time.perf_counter() - started
            else:
                from .shards import extract_on_cluster

                extract_on_cluster(client, store, backbone, plans, recipe, config, progress,
                                   report)
        _write_fewshot(store, dataset, subsets)
        _write_classifier(store, backbone, dataset, config.prompts)
        if "head" not in store.group:
            state = {k: v.detach().cpu().float().numpy() for k, v in
                     backbone.head.state_dict().items()}
            store.write_head(state, backbone.model_config or {})
        report.rows = {s: int(store.readable_rows(s).size) for s in store.splits()}
    finally:
        _record_skipped(store, report.skipped)
        store.close()
    report.seconds = time.perf_counter() - start
    return report


def _open_or_create(url: str, backbone: Backbone, dataset: Dataset, recipe: ViewRecipe,
                    config: ExtractConfig) -> FeatureStore:
    options = config.storage_options
    try:
        store = open_store(url, "a", storage_options=options, takeover=config.takeover)
    except StoreNotFoundError:
        if "://" not in url:
            Path(url).parent.mkdir(parents=True, exist_ok=True)
        return create_store(url, backbone.card, backbone.fingerprint, dataset.card,
                            views=recipe.card(), layout=config.layout, storage_options=options,
                            takeover=config.takeover)
    try:
        check_fingerprint(store, backbone.fingerprint, backbone.card)
        stored = store.card
        if stored["dataset"]["name"] != dataset.spec.name or \
                stored["dataset"]["classnames"] != dataset.classnames:
            raise ExtractError(f"{url} holds dataset {stored['dataset']['name']}, not"
                               f" {dataset.spec.name} (or its classes differ).")
        if stored["views"]["seed"] != recipe.seed or \
                stored["views"]["scale"] != list(recipe.scale):
            raise ExtractError(f"{url} holds views of another recipe ({stored['views']});"
                               f" use another --store for --views with seed {recipe.seed}.")
        store.add_views(recipe.count)  # more views than stored: the new ones are extracted
    except SafeCacheError:
        store.close()
        raise
    return store


def _row_index(store: FeatureStore, split: str, readable_only: bool = False) -> dict[str, int]:
    """path -> row of every row reserved in the store (padding rows have no path), or only of
    the readable ones (complete and not skipped)."""
    if split not in store.group:
        return {}
    paths = store.arrays(split)["path"][:]
    rows = store.readable_rows(split) if readable_only else range(len(paths))
    return {str(paths[row]): int(row) for row in rows if paths[row]}


def _plan_split(store: FeatureStore, dataset: Dataset, split: str, wanted: list[int],
                recipe: ViewRecipe) -> list[tuple]:
    """Reserve rows for the wanted entries not yet in the store; return what is still to
    extract: (row, image file, path in the store, first missing view) per image, unit by unit."""
    entries = dataset.splits[split]
    known = _row_index(store, split)
    new = [i for i in wanted if entries[i].path not in known]
    if new:
        store.append_rows(split, [entries[i].path for i in new],
                          [entries[i].label for i in new])
    group = store.arrays(split)
    labels, paths = group["label"][:], group["path"][:]
    unit, views = store.layout.unit, recipe.count if split == "train" else 0
    first_view = _first_missing_view(group, views)  # per unit: 0 = everything to do
    return [(row, dataset.image_root / str(paths[row]), str(paths[row]), int(first_view[u]))
            for u in np.flatnonzero(first_view < max(views, 1))
            for row in range(u * unit, min((u + 1) * unit, len(labels))) if labels[row] >= 0]


def extract_items(store: FeatureStore, backbone: Backbone, split: str, items: list[tuple],
                  recipe: ViewRecipe, config: ExtractConfig, progress: ProgressSink,
                  skipped: list[dict[str, str]]) -> int:
    """Decode, encode and write `items` (whole write units of one split); returns their count.
    Unreadable images stop the run, or with `skip_bad` become padding and go to `skipped`."""
    if not items:
        return 0
    unit, views = store.layout.unit, recipe.count if split == "train" else 0
    group = store.arrays(split)
    total_rows = group["label"].shape[0]
    # Starting worker processes costs ~0.3 s: not worth it for a split of a batch or two.
    workers = decode_workers(config.workers if len(items) > 2 * config.batch_size else 0)
    loader = torch.utils.data.DataLoader(
        ViewDataset(items, backbone.preprocess, backbone.card,
                    recipe if views else None),
        batch_sampler=_unit_batches(items, unit, config.batch_size),
        num_workers=workers, persistent_workers=False,
        pin_memory=backbone.device.type == "cuda",
    )
    task = progress.start(f"{store.card['dataset']['name']} {split}", len(items))
    with _Writer(store, split) as writer:
        current: dict[str, Any] | None = None
        for rows, centers, augmented, errors, first in loader:
            rows, first = rows.tolist(), int(first[0])
            _check_errors(split, rows, errors, config, skipped, group)
            features = _encode(backbone, None if first else centers, augmented, config.precision)
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


def _first_missing_view(group, views: int) -> np.ndarray:
    """Per unit: 0 when the unit needs everything (center and all views), v when only views
    v.. are missing (added to the store later), `views` (or 1 without views) when done."""
    complete = group["complete"][:] == 1
    if not views:
        return np.where(complete, 1, 0)
    written = group["aug_complete"][:] == 1
    first = np.where(written.all(axis=1), views, written.argmin(axis=1))
    return np.where(complete, first, 0)


def _unit_batches(items, unit: int, batch_size: int) -> Iterator[list[int]]:
    """Batches of item positions that never cross a write unit: identical in every run."""
    batches, current, current_unit = [], [], None
    for position, (row, *_) in enumerate(items):
        if current and (row // unit != current_unit or len(current) == batch_size):
            batches.append(current)
            current = []
        current.append(position)
        current_unit = row // unit
    if current:
        batches.append(current)
    return batches


def _new_unit(index: int, unit: int, total: int, features: dict[str, np.ndarray],
              first_view: int) -> dict:
    rows = min(unit, total - index * unit)
    return {"unit": index, "first_view": first_view, "features": {
        name: np.zeros((rows, *values.shape[1:]), dtype=np.float32)
        for name, values in features.items()}}


def _check_errors(split, rows, errors, config, skipped, group) -> None:
    for row, error in zip(rows, errors, strict=True):
        if not error:
            continue
        if not config.skip_bad:
            raise ExtractError(f"Unreadable image in {split}: {error}. Nothing of its write unit"
                               f" was recorded. Fix or remove the image, or pass --skip-bad to"
                               f" record it in the store's card and go on.")
        group["label"][row] = -1  # the row becomes padding: never readable (its unit's chunk)
        skipped.append({"split": split, "row": int(row), "error": error})


def _record_skipped(store: FeatureStore, skipped: list[dict[str, str]]) -> None:
    """Note skipped images in the card: by the lease holder only, once, so a job's workers
    never write the root object at the same time."""
    if not skipped:
        return
    card = store.card
    card.setdefault("skipped_images", []).extend(
        {"split": s["split"], "error": s["error"]} for s in skipped)
    store.group.attrs["safe_cache"] = card


@torch.no_grad()
def _encode(backbone: Backbone, centers: torch.Tensor | None, augmented: torch.Tensor,
            precision: str) -> dict[str, np.ndarray]:
    """Trunk + original head on the center views (unless None) and the augmented views."""
    device = backbone.device
    out = {}
    if centers is not None:
        dense, pooled = _trunk_and_head(backbone, centers.to(device, non_blocking=True),
                                        precision)
        out["dense"], out["pooled"] = dense, pooled
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
            dense = backbone.trunk(images)
    else:
        dense = backbone.trunk(images)
    dense = dense.float()
    pooled = backbone.head(dense)
    return dense.cpu().numpy(), pooled.float().cpu().numpy()


class _Writer:
    """A background thread that writes whole units, so decoding and the trunk never wait on
    compression and I/O; at most two units wait in its queue (bounded memory)."""

    def __init__(self, store: FeatureStore, split: str) -> None:
        self.store, self.split = store, split
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="safe-cache-writer")

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    if item["first_view"]:
                        features = item["features"]
                        self.store.write_views(self.split, item["unit"], item["first_view"],
                                               features["aug_dense"], features["aug_pooled"])
                    else:
                        self.store.write_unit(self.split, item["unit"], item["features"])
                except BaseException as exc:  # re-raised in the main thread
                    self.error = exc

    def put(self, item: dict) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def __enter__(self) -> _Writer:
        self.thread.start()
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None and exc_type is None:
            raise self.error


def _write_fewshot(store: FeatureStore, dataset: Dataset, subsets) -> None:
    rows = {split: _row_index(store, split, readable_only=True) for split in ("train", "val")
            if split in store.group}
    for (seed, shots), subset in subsets.items():
        train = [rows["train"][p] for p in (dataset.splits["train"][i].path for i in subset.train)
                 if p in rows["train"]]
        val = [rows["val"][p] for p in (dataset.splits["val"][i].path for i in subset.val)
               if p in rows["val"]]
        store.write_fewshot(seed, shots, train, val)


def _write_classifier(store: FeatureStore, backbone: Backbone, dataset: Dataset,
                      prompts: str) -> None:
    name = prompt_set_name(prompts)
    if f"text/{name}" in store.group:
        return
    sentences = class_sentences(prompts, dataset.classnames, dataset.spec.templates)
    weights = text_classifier(backbone.model, backbone.tokenizer(), sentences)
    store.write_classifier(name, weights.numpy(), sentences)

