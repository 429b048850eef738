"""Extraction as tasks of whole write units, for runtime.execution's `run_tasks`.

The calling process (job.py) holds the store's lease and reserves every row first; then the work
is cut into tasks of whole write units, so no two tasks ever write the same chunk (or Zarr shard
object). In this process a split is one task (one DataLoader, no restart cost); on dask workers
a task is about `task_images` images, so the work balances. A task carries data only: a worker
loads the backbone once per process (from its own disk or cache, never pickled from the client),
opens the store under the job's lease token, and writes its units straight into the store, each
recorded complete only after its data; in this process the task uses the lease holder's open
store and loaded backbone (`local_resources`). A worker that dies leaves its units incomplete;
dask runs the task again on another worker (`allowed-failures`), which rewrites those units
whole. Results carry counts and skipped images only; the lease holder records skipped images in
the manifest, so workers never write the root metadata.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.views import ViewRecipe, WorkItem
from ..errors import ExtractError
from ..model.backbone import Backbone, load_backbone
from ..runtime.device import resolve_device
from ..runtime.execution import Execution, local_resource, local_resources, run_tasks
from ..runtime.progress import ProgressSink
from ..store import FeatureStore, absolute_url, open_store
from .config import ExtractConfig, ExtractReport
from .pipeline import extract_items


@dataclass(frozen=True)
class ExtractJob:
    """What every task of one extraction shares (small: sent with each task)."""

    url: str
    storage_options: dict[str, Any] | None
    lease_token: str
    fingerprint: str
    config: ExtractConfig
    recipe: ViewRecipe


@dataclass(frozen=True)
class ExtractTask:
    """Whole write units of one split, in row order."""

    job: ExtractJob
    split: str
    items: list[WorkItem]


def plan_tasks(items: list[WorkItem], unit: int, task_images: int) -> list[list[WorkItem]]:
    """Cut a split's items into tasks of whole write units, about `task_images` each."""
    units_per_task = max(1, -(-task_images // unit))
    tasks: list[list[WorkItem]] = []
    current: list[WorkItem] = []
    current_units: set[int] = set()
    for item in items:
        item_unit = item.row // unit
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


def _task_backbone(job: ExtractJob) -> Backbone:
    config = job.config
    backbone = worker_backbone(config.model, config.pretrained, config.device, config.cut,
                               config.init_seed, config.quick_gelu, config.cache_dir)
    if backbone.fingerprint != job.fingerprint:
        raise ExtractError(f"This worker's backbone {config.model} ({config.pretrained}) has"
                           f" fingerprint {backbone.fingerprint[:12]}, not the job's"
                           f" {job.fingerprint[:12]}: its weights file differs from the"
                           f" client's. Give every worker the same weights.")
    return backbone


def _store_key(job: ExtractJob) -> tuple[str, tuple[str, str]]:
    """What the lease holder lends its open store under, and a task looks it up by."""
    return "extract-store", (job.url, job.lease_token)


def _job(store: FeatureStore, backbone: Backbone, recipe: ViewRecipe,
         config: ExtractConfig) -> ExtractJob:
    """What every task shares: the store by URL and the lease token its workers write under."""
    token = store.lease_token
    assert token is not None, "job.py creates or opens the store with mode='a': it holds the lease"
    return ExtractJob(absolute_url(store.url), store.storage_options or None, token,
                      backbone.fingerprint, config, recipe)


def extract_task(task: ExtractTask, progress: ProgressSink) -> dict[str, Any]:
    """One task: its units decoded, encoded and written; returns counts and skipped images."""
    job = task.job
    backbone = local_resource(("backbone", job.fingerprint), lambda: _task_backbone(job))
    store = local_resource(_store_key(job), lambda: open_store(
        job.url, "a", storage_options=job.storage_options, job_token=job.lease_token))
    started = time.perf_counter()
    skipped: list[dict[str, str]] = []
    done = extract_items(store, backbone, task.split, task.items, job.recipe, job.config,
                         progress, skipped)
    return {"split": task.split, "extracted": done, "skipped": skipped,
            "seconds": time.perf_counter() - started}


def extract_plans(store: FeatureStore, backbone: Backbone, plans: dict[str, list[WorkItem]],
                  recipe: ViewRecipe, config: ExtractConfig, progress: ProgressSink,
                  report: ExtractReport, execution: Execution, client: Any = None) -> None:
    """Every split's planned items as tasks (see the module docstring); counts, skipped images
    and each split's pipeline seconds (summed over its tasks) go into `report`."""
    distributed = client is not None or execution.distributed
    job = _job(store, backbone, recipe, config)
    tasks: dict[int, ExtractTask] = {}
    for split, items in plans.items():
        if distributed:  # workers may run in another directory
            items = [item._replace(file=Path(item.file).absolute()) for item in items]
        size = config.task_images if distributed else max(1, len(items))
        for chunk in plan_tasks(items, store.layout.unit, size):
            tasks[len(tasks)] = ExtractTask(job, split, chunk)
    report.extracted.update({split: 0 for split in plans})
    lent: dict[tuple[str, Any], object] = {_store_key(job): store,
                                           ("backbone", backbone.fingerprint): backbone}
    with local_resources(lent):
        results = run_tasks(tasks, extract_task, progress, execution,
                            sizes={index: len(task.items) for index, task in tasks.items()},
                            description=f"{store.manifest['dataset']['name']}: {len(tasks)}"
                                        f" tasks", what="An extraction task", client=client)
    for result in results.values():
        split = result["split"]
        report.extracted[split] += result["extracted"]
        report.skipped.extend(result["skipped"])
        report.pipeline_seconds[split] = report.pipeline_seconds.get(split, 0.0) \
            + result["seconds"]
