"""Distributed extraction: tasks of whole write units, run on dask.distributed workers.

The client (job.py) holds the store's lease and reserves every row first; then the work is cut
into tasks of whole write units (about `task_images` images each), so no two workers ever write
the same chunk (or Zarr shard object). Each worker loads the backbone once per process (from its
own disk or cache, never pickled from the client), opens the store under the job's lease token,
and writes its units straight into the store, each recorded complete only after its data. A
worker that dies leaves its units incomplete; dask runs the task again on another worker
(`allowed-failures`), which rewrites those units whole. Results carry counts and skipped images
only; the client records skipped images in the manifest, so workers never write the root
metadata.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.views import ViewRecipe
from ..errors import ExtractError
from ..model.backbone import Backbone, load_backbone
from ..runtime.cluster import JobProgress, WorkerProgress, gather_as_completed
from ..runtime.device import resolve_device
from ..runtime.progress import ProgressSink
from ..store import FeatureStore, absolute_url, open_store
from .config import ExtractConfig, ExtractReport
from .pipeline import extract_items


@dataclass(frozen=True)
class ExtractJob:
    """What every task of one extraction shares (small: sent with each task)."""

    url: str
    storage_options: dict | None
    lease_token: str
    fingerprint: str
    config: ExtractConfig
    recipe: ViewRecipe
    progress_job: str


def plan_tasks(items: list[tuple], unit: int, task_images: int) -> list[list[tuple]]:
    """Cut a split's items into tasks of whole write units, about `task_images` each."""
    units_per_task = max(1, -(-task_images // unit))
    tasks: list[list[tuple]] = []
    current: list[tuple] = []
    current_units: set[int] = set()
    for item in items:
        item_unit = item[0] // unit
        if item_unit not in current_units and len(current_units) == units_per_task:
            tasks.append(current)
            current, current_units = [], set()
        current.append(item)
        current_units.add(item_unit)
    return tasks + ([current] if current else [])


@functools.lru_cache(maxsize=2)
def worker_backbone(model: str, pretrained: str | None, device: str, cut: str,
                    init_seed: int, quick_gelu: bool | None = None,
                    cache_dir: str | None = None) -> Backbone:
    """The backbone of this worker process, loaded on its first task and kept."""
    return load_backbone(model, pretrained, device=resolve_device(device), cut=cut,
                         init_seed=init_seed, quick_gelu=quick_gelu, cache_dir=cache_dir)


def extract_task(job: ExtractJob, split: str, items: list[tuple], part: str) -> dict[str, Any]:
    """Run on a worker: extract one task's units into the store; returns counts."""
    config = job.config
    backbone = worker_backbone(config.model, config.pretrained, config.device, config.cut,
                               config.init_seed, config.quick_gelu, config.cache_dir)
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
    """Submit every task of every split, show one bar, and gather counts into `report`."""
    tasks = [(split, [(row, Path(image).absolute(), *rest) for row, image, *rest in task])
             for split, items in plans.items()
             for task in plan_tasks(items, store.layout.unit, config.task_images)]
    report.extracted.update({split: 0 for split in plans})
    total = sum(len(task) for _, task in tasks)
    name = store.manifest["dataset"]["name"]
    with JobProgress(client, progress, f"{name}: {len(tasks)} tasks", total) as bar:
        job = ExtractJob(absolute_url(store.url), store.storage_options or None, store.lease_token,
                       backbone.fingerprint, config, recipe, bar.job)
        futures = {index: client.submit(extract_task, job, split, task, str(index),
                                        key=f"safe-cache-extract-{bar.job}-{index}", pure=False)
                   for index, (split, task) in enumerate(tasks)}
        for index, result in gather_as_completed(client, futures, "An extraction task"):
            bar.update(str(index), len(tasks[index][1]))
            report.extracted[result["split"]] += result["extracted"]
            report.skipped.extend(result["skipped"])
