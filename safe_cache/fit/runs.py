"""Stage 2's jobs: every (store, shots, seed) run, each one task of runtime.execution's
`run_tasks` (in this process or on dask workers), saved as its result record plus the
fine-tuned head (and SAFE-A's cache)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..atomic import atomic_write_with
from ..errors import DeviceMemoryError, ResultFormatError, SafeCacheError
from ..runtime.allocator import tune_cpu_allocator
from ..runtime.device import out_of_memory_reason
from ..runtime.execution import IN_PROCESS, Execution, local_resource, local_resources, run_tasks
from ..runtime.progress import ProgressSink, null_progress
from ..store import FeatureStore, absolute_url, open_store
from . import identity as run_id
from .config import FitConfig
from .ood import ood_seals
from .results import (
    NAME_SCHEME,
    RunResult,
    cache_file,
    classifier_file,
    expected_name,
    head_file,
    load_result,
    ood_gaps,
    result_path,
    whole_result,
    write_result,
)
from .train import check_store_serves, fit_one, store_block

Key = tuple[int, int, int]  # (config index, shots, seed)


def fit(config: FitConfig, progress: ProgressSink = null_progress,
        execution: Execution = IN_PROCESS, client: Any = None) -> list[RunResult]:
    """Every requested (shots, seed); an existing result is kept unless `force`."""
    return fit_stores([config], progress, execution, client)


@dataclass(frozen=True)
class FitRun:
    """One (store, shots, seed) run as a task carries it: data only (see execution.py)."""

    config: FitConfig
    shots: int
    seed: int


def fit_stores(configs: list[FitConfig], progress: ProgressSink = null_progress,
               execution: Execution = IN_PROCESS, client: Any = None) -> list[RunResult]:
    """Every (store, shots, seed) of `configs` (one per store), one task per run (`execution`:
    in this process, or on dask workers, which write their results into the shared `out`
    folder; a dask `client` given here wins)."""
    tune_cpu_allocator()
    stores = [_open_for_fit(config) for config in configs]  # each opened once
    for config, store in zip(configs, stores, strict=True):
        check_store_serves(store, config)  # before any run: nothing is written on refusal
        if not config.partial:
            store.check_complete("test")
    seals = [ood_seals(c.eval_ood, s.url, s.manifest["backbone"], c.partial)
             for c, s in zip(configs, stores, strict=True)]
    results, todo, notes = _plan_runs(configs, stores, seals)
    shipped = configs
    if client is not None or execution.distributed:  # workers may run in another directory
        shipped = [replace(c, store=absolute_url(c.store), out=os.path.abspath(c.out),
                           cache=c.cache and os.path.abspath(c.cache)) for c in configs]
    tasks = {key: FitRun(shipped[key[0]], key[1], key[2]) for key in todo}
    with local_resources({_store_key(c): s for c, s in zip(configs, stores, strict=True)}):
        results.update(run_tasks(tasks, fit_task, progress, execution,
                                 sizes={key: configs[key[0]].iters for key in todo},
                                 description=f"fit: {len(todo)} runs", what="A fit run",
                                 client=client))
    for key, note in notes.items():
        results[key].note = note
    return [results[key] for key in sorted(results)]


def _plan_runs(configs: list[FitConfig], stores: list[FeatureStore], seals: list
               ) -> tuple[dict[Key, RunResult], list[Key], dict[Key, str]]:
    """(results kept, runs to do, why a run that had a result runs again): a result is kept
    only when its recorded identity is the one this run would record."""
    results: dict[Key, RunResult] = {}
    todo: list[Key] = []  # (config index, shots, seed) still to run
    notes: dict[Key, str] = {}  # why a run that had a result runs again
    owners: dict[Path, str] = {}
    for index, (config, store) in enumerate(zip(configs, stores, strict=True)):
        for shots in config.shots:
            for seed in config.seeds:
                path = run_path(config, store, shots, seed)
                if owners.setdefault(path, config.store) != config.store:
                    raise SafeCacheError(f"{config.store} and {owners[path]} hold the same dataset"
                                         f" and backbone: their results would overwrite each"
                                         f" other in {path.parent}. Fit them with different"
                                         f" --out folders.")
                try:
                    existing = None if config.force else whole_result(path)
                except ResultFormatError:  # safe-cache 0.1's: not this run's, recompute it
                    existing = None
                    notes[index, shots, seed] = (
                        f"{path.name}: recomputed, the result there was not this run's (a"
                        f" result of safe-cache 0.1, no longer read)")
                wanted = None if existing is None else \
                    wanted_identity(config, store, shots, seed, seals[index])
                gaps = [] if existing is None else ood_gaps(existing)
                if existing is not None and existing.run_identity == wanted and not gaps:
                    results[index, shots, seed] = replace(existing, skipped=True)
                    continue
                # new, forced, left half-written by a killed run, or of another identity (the
                # store changed under it): run it (again)
                todo.append((index, shots, seed))
                if wanted is not None:  # a result was there: say why it runs again
                    changes = run_id.differences(existing.run_identity, wanted)
                    if not changes and gaps:
                        changes = [f"no OOD accuracy for {', '.join(gaps)}"]
                    notes[index, shots, seed] = (
                        f"{path.name}: recomputed, the result there was not this run's"
                        f" ({'; '.join(changes[:3]) or 'its identity differs'})")
    return results, todo, notes


def wanted_identity(config: FitConfig, store: FeatureStore, shots: int, seed: int,
                    seals: dict[str, Any] | None = None) -> dict[str, Any]:
    """The identity a run of `config` on `store` would record (`seals`: its OOD stores', from
    ood_seals; resolved here when not given): what an existing result must equal to be
    reused."""
    if seals is None:
        seals = ood_seals(config.eval_ood, store.url, store.manifest["backbone"], True)
    return run_id.run_identity(store_block(store, config.prompts, shots, seed),
                               store.manifest["dataset"]["name"], shots, seed,
                               _config_block(config), config.recipe.record(), seals,
                               store.manifest["backbone"])


def run_path(config: FitConfig, store: FeatureStore, shots: int, seed: int) -> Path:
    """The result file of one run of `config` on `store`."""
    return config_result_path(config, store.manifest, shots, seed)


def config_result_path(config: FitConfig, manifest: dict[str, Any], shots: int,
                       seed: int) -> Path:
    """The result file of one run of `config` on a store of this manifest (its dataset name
    and backbone card suffice): the recipe's name, and a short suffix when the options differ
    from a default fit's (identity.options_suffix). What a study's plan names its runs by."""
    suffix = run_id.options_suffix(run_id.options_of(_config_block(config)))
    return result_path(config.out, manifest, shots, seed, config.recipe.name,
                       config.select_on, suffix)


def _config_block(config: FitConfig) -> dict[str, Any]:
    """The `config` block a result records (what its identity is computed from)."""
    return {**config.to_dict(), "storage_options": None}


def beside_note(record: RunResult, path: Path) -> str | None:
    """What tells a new result from the others of its shots, seed and recipe in its folder
    (the options that differ), for fit's table; None when it stands alone."""
    plain = expected_name(record, suffixed=False)
    for other in sorted(path.parent.glob(f"{plain.removesuffix('.json')}*.json")):
        if other == path or not NAME_SCHEME.match(other.name):
            continue
        try:
            theirs = load_result(other)
        except SafeCacheError:
            continue
        if expected_name(theirs, suffixed=False) != plain:  # another recipe or selection
            continue
        changes = run_id.differences(theirs.run_identity, record.run_identity)
        if changes:
            return f"{path.name}: new, beside {other.name} ({'; '.join(changes[:4])})"
    return None


def _open_for_fit(config: FitConfig) -> FeatureStore:
    return open_store(config.store, storage_options=config.storage_options, cache=config.cache)


def fit_and_save(store: FeatureStore, shots: int, seed: int, config: FitConfig,
                 progress: ProgressSink = null_progress) -> RunResult:
    """One run, written as <out>/<dataset>/<backbone>/shots<K>_seed<S>.json (+ the head's and
    SAFE-A's safetensors); the JSON last, so a result that exists is whole."""
    try:
        record, head, cache = fit_one(store, shots, seed, config, progress)
    except torch.OutOfMemoryError as exc:
        raise DeviceMemoryError(
            f"Out of memory fitting {store.manifest['dataset']['name']} {shots} shots seed"
            f" {seed} on {config.device} ({out_of_memory_reason(exc)}). Try --test-chunk"
            f" {max(1, config.test_chunk // 2)} (test maps per evaluation step), fewer"
            f" configurations at once (--lr / --wd), or --device cpu. Finished runs are kept:"
            f" run the same command again to go on.") from None
    record.run_id = uuid.uuid4().hex  # in every file of the run: a mix is detected on read
    path = run_path(config, store, shots, seed)
    metadata = {"run_id": record.run_id, "store_fingerprint": store.fingerprint,
                "beta": str(config.beta)}
    _save_atomic({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
                 head_file(path), metadata)
    if cache is not None:  # SAFE-A's trained cache, for export
        _save_atomic({k: v.contiguous() for k, v in cache.items()}, cache_file(path), metadata)
    if record.text is not None:  # the classifier the run made (fit/text.py), for export
        _save_atomic({"classifier": record.classifier_weights.contiguous()},
                     classifier_file(path), metadata)
    write_result(record, path)  # last: a result whose JSON exists is whole
    record.note = beside_note(record, path)
    return record


def _save_atomic(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    atomic_write_with(path, lambda temporary: save_file(tensors, str(temporary),
                                                        metadata=metadata))


def fit_task(run: FitRun, progress: ProgressSink) -> RunResult:
    """One task: the run's store (the calling process's open one, or opened here on a worker),
    fitted and saved into `run.config.out`."""
    tune_cpu_allocator()
    store = local_resource(_store_key(run.config), lambda: _open_for_fit(run.config))
    return fit_and_save(store, run.shots, run.seed, run.config, progress)


def _store_key(config: FitConfig) -> tuple[str, Any]:
    return ("fit-store", (config.store, config.cache))
