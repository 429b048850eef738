"""Where a command's tasks run, said once for the whole command: one `Execution`, one executor.

extract and fit both cut their work into small, picklable tasks (a group of write units, one
(store, shots, seed) run) and hand them to `run_tasks`, which runs them in this process or as
dask tasks on a cluster's workers. Before this module each of them wrote both branches itself,
and the execution settings sat on every per-store config, so fit over several stores silently
took the first config's (img2dataset's lesson: one distributor signature for every job).

A task function is `fn(task, progress) -> result`: a module-level function (dask pickles it by
name), given a task that carries only data (URLs, configs, rows), never an open store or a
model. What a process may keep between tasks (the backbone, an open store) it keeps itself:
`local_resources` lets the calling process lend the task functions what it already holds (the
store under its lease, the loaded backbone), so running in-process never opens or loads twice;
a worker process finds the registry empty and opens its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from ..errors import ClusterError, ConfigError
from .cluster import JobProgress, WorkerProgress, connect, gather_as_completed
from .progress import ProgressSink

K = TypeVar("K")
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Execution:
    """Where tasks run: in this process (the default), on a running dask scheduler's workers
    (`scheduler`, an address like tcp://10.0.0.5:8786), or on a LocalCluster of
    `local_workers` processes started for the command."""

    scheduler: str | None = None
    local_workers: int = 0

    def __post_init__(self) -> None:
        if self.scheduler and self.local_workers:
            raise ClusterError("Give either --scheduler or --local-workers, not both.")
        if isinstance(self.local_workers, bool) or not isinstance(self.local_workers, int) \
                or not 0 <= self.local_workers <= 1024:
            raise ConfigError(f"local_workers must be a whole number from 0 to 1024, not"
                              f" {self.local_workers!r} (--local-workers N).")

    @property
    def distributed(self) -> bool:
        """Whether tasks leave this process (so a task should be small enough to balance)."""
        return bool(self.scheduler or self.local_workers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Execution:
        unknown = sorted(set(data) - {"scheduler", "local_workers"})
        if unknown:
            raise ConfigError(f"'{unknown[0]}' is not an execution setting (scheduler,"
                              f" local_workers).")
        return cls(**data)


IN_PROCESS = Execution()


def run_tasks(tasks: Mapping[K, T], fn: Callable[[T, ProgressSink], R],
              progress: ProgressSink, execution: Execution = IN_PROCESS, *,
              sizes: Mapping[K, int], description: str, what: str,
              client: Any = None) -> dict[K, R]:
    """Run `fn(task, progress)` for every task; the results by key, in `tasks`' order.

    In this process each task reports to `progress` itself (its own bars). On dask (`client`,
    else `execution`'s cluster) each task reports to its worker's event stream and the client
    shows one bar of `sizes` (the units each task counts to) for the whole job. A failed task
    stops the job with its error; finished tasks' writes are kept (the callers' outputs are
    resumable), so the same command goes on.
    """
    if client is None and not execution.distributed:
        return {key: fn(task, progress) for key, task in tasks.items()}
    with connect(execution.scheduler, execution.local_workers) if client is None \
            else contextlib.nullcontext(client) as client:
        return _on_dask(client, tasks, fn, progress, sizes, description, what)


def _on_dask(client: Any, tasks: Mapping[K, T], fn: Callable[[T, ProgressSink], R],
             progress: ProgressSink, sizes: Mapping[K, int], description: str,
             what: str) -> dict[K, R]:
    keys = list(tasks)
    parts = {key: str(index) for index, key in enumerate(keys)}
    done: dict[K, R] = {}
    with JobProgress(client, progress, description, sum(sizes.values())) as bar:
        futures = {key: client.submit(fn, tasks[key], WorkerProgress(bar.job, parts[key]),
                                      key=f"safe-cache-{bar.job}-{parts[key]}", pure=False)
                   for key in keys}
        for key, result in gather_as_completed(client, futures, what):
            bar.update(parts[key], sizes[key])
            done[key] = result
    return {key: done[key] for key in keys}


_LOCAL: dict[tuple[str, Any], Any] = {}


@contextlib.contextmanager
def local_resources(resources: Mapping[tuple[str, Any], Any]) -> Iterator[None]:
    """Lend this process's open resources (keyed by what a task would open them from) to the
    task functions run in it, for the duration of the block."""
    added = {key: value for key, value in resources.items() if key not in _LOCAL}
    _LOCAL.update(added)
    try:
        yield
    finally:
        for key in added:
            _LOCAL.pop(key, None)


def local_resource(key: tuple[str, Any], make: Callable[[], R]) -> R:
    """What the calling process lent under `key`, else `make()` (a worker opening its own)."""
    if key in _LOCAL:
        return _LOCAL[key]
    return make()
