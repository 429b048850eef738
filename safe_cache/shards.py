"""Distributed extraction: shards of whole write units, run on dask.distributed workers.

The client (extract.py) holds the store's lease and reserves every row first; then the work is
cut into shards of whole write units, so no two workers ever write the same chunk (or shard
object). Each worker loads the backbone once per process (from its own disk or cache, never
pickled from the client), opens the store under the job's lease token, and writes its units
straight into the store, each recorded complete only after its data. A worker that dies leaves
its units incomplete; dask runs the task again on another worker (`allowed-failures`), which
rewrites those units whole. Results carry counts and skipped images only; the client records
skipped images in the card, so workers never write the root metadata.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backbone import Backbone, load_backbone
from .cluster import JobProgress, WorkerProgress, gather_as_completed
from .extract import ExtractConfig, ExtractError, ExtractReport, extract_items, resolve_device
from .progress import ProgressSink
from .store import FeatureStore, absolute_url, open_store
from .views import ViewRecipe


@dataclass(frozen=True)
class ShardJob:
    """What every shard of one extraction shares (small: sent with each task)."""

    url: str
    storage_options: dict | None
    lease_token: str
    fingerprint: str
    config: ExtractConfig
    recipe: ViewRecipe
    progress_job: str


def plan_shards(items: list[tuple], unit: int, shard_images: int) -> list[list[tuple]]:
    """Cut a split's items into shards of whole write units, about `shard_images` each."""
    units_per_shard = max(1, -(-shard_images // unit))
    shards: list[list[tuple]] = []
    current: list[tuple] = []
    current_units: set[int] = set()
    for item in items:
        item_unit = item[0] // unit
        if item_unit not in current_units and len(current_units) == units_per_shard:
            shards.append(current)
            current, current_units = [], set()
        current.append(item)
        current_units.add(item_unit)
    return shards + ([current] if current else [])


@functools.lru_cache(maxsize=2)
def worker_backbone(model: str, pretrained: str | None, device: str, cut: str,
                    init_seed: int) -> Backbone:
    """The backbone of this worker process, loaded on its first shard and kept."""
    return load_backbone(model, pretrained, device=resolve_device(device), cut=cut,
                         init_seed=init_seed)


def extract_shard(job: ShardJob, split: str, items: list[tuple], part: str) -> dict[str, Any]:
    """Run on a worker: extract one shard's units into the store; returns counts."""
    config = job.config
    backbone = worker_backbone(config.model, config.pretrained, config.device, config.cut,
                               config.init_seed)
    if backbone.fingerprint != job.fingerprint:
        raise ExtractError(f"This worker's backbone {config.model} ({config.pretrained}) has"
                           f" fingerprint {backbone.fingerprint[:12]}, not the job's"
                           f" {job.fingerprint[:12]}: its weights file differs from the"
                           f" client's. Give every worker the same weights.")
    store = open_store(job.url, "a", storage_options=job.storage_options,
                       job_token=job.lease_token)
    skipped: list[dict[str, str]] = []
    done = extract_items(store, backbone, split, items, job.recipe, config,
                         WorkerProgress(job.progress_job, part), skipped)
    return {"split": split, "extracted": done, "skipped": skipped}


def extract_on_cluster(client: Any, store: FeatureStore, backbone: Backbone,
                       plans: dict[str, list[tuple]], recipe: ViewRecipe, config: ExtractConfig,
                       progress: ProgressSink, report: ExtractReport) -> None:
    """Submit every shard of every split, show one bar, and gather counts into `report`."""
    shards = [(split, [(row, Path(image).absolute(), *rest) for row, image, *rest in shard])
              for split, items in plans.items()
              for shard in plan_shards(items, store.layout.unit, config.shard_images)]
    report.extracted.update({split: 0 for split in plans})
    total = sum(len(shard) for _, shard in shards)
    name = store.card["dataset"]["name"]
    with JobProgress(client, progress, f"{name}: {len(shards)} shards", total) as bar:
        job = ShardJob(absolute_url(store.url), store.storage_options or None, store.lease_token,
                       backbone.fingerprint, config, recipe, bar.job)
        futures = {index: client.submit(extract_shard, job, split, shard, str(index),
                                        key=f"safe-cache-extract-{bar.job}-{index}", pure=False)
                   for index, (split, shard) in enumerate(shards)}
        for index, result in gather_as_completed(client, futures, "An extraction shard"):
            bar.update(str(index), len(shards[index][1]))
            report.extracted[result["split"]] += result["extracted"]
            report.skipped.extend(result["skipped"])
