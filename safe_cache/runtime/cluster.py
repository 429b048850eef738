"""Running extraction tasks and fit runs on dask.distributed instead of in this process.

`connect` gives a Client for a running scheduler (`--scheduler ADDRESS`) or for a LocalCluster of
N worker processes (`--local-workers N`), or None (the default: in-process, no cluster). Workers
report progress as dask events (`Worker.log_event`), a few per second; `JobProgress` on the
client adds them up into one bar for the whole job. A part (an extraction task, a fit run)
reports its running count, so a part restarted after its worker died counts from zero again
rather than twice.

Dask worker processes are daemonic by default, and a daemonic process may not start the image
decoding processes of a DataLoader: the LocalCluster here is started with daemon workers off, and
`decode_workers` falls back to decoding in the worker's own process where they are on.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from ..errors import ClusterError, SafeCacheError
from .progress import ProgressSink

TOPIC = "safe-cache-progress"
REPORT_EVERY_S = 0.25
POLL_S = 5.0
CONNECT_TIMEOUT_S = 10.0
NO_WORKERS_S = 300.0


@contextlib.contextmanager
def connect(scheduler: str | None = None, local_workers: int = 0) -> Iterator[Any]:
    """A dask Client for `scheduler`, or for a new LocalCluster of `local_workers` processes;
    None when neither is asked for. Closed (and the LocalCluster stopped) on exit."""
    if scheduler and local_workers:
        raise ClusterError("Give either --scheduler or --local-workers, not both.")
    if not scheduler and not local_workers:
        yield None
        return
    import dask
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"No dask scheduler answers at {scheduler} ({exc}). Start one with"
                               f" `dask scheduler`, or use --local-workers N.") from exc
        except (ValueError, TypeError) as exc:  # not an address at all
            raise ClusterError(f"--scheduler {scheduler!r} is not a scheduler address ({exc});"
                               f" give one like tcp://10.0.0.5:8786.") from exc
        with client:
            yield client
        return
    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = LocalCluster(n_workers=local_workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=logging.ERROR)
    with cluster, Client(cluster) as client:
        client.wait_for_workers(local_workers, timeout=120)
        yield client


def auto_workers(workers: int | str | None) -> int:
    """Worker processes: a number as given; "auto" (or None) = every core this process may use
    (threads.usable_cores: affinity, cgroup quota) but the one feeding the main loop (at least
    1)."""
    if workers in ("auto", None):
        from .threads import usable_cores

        return max(1, usable_cores() - 1)
    return int(workers)


def decode_workers(requested: int) -> int:
    """Image decoding processes a task may start: none inside a daemonic process."""
    return 0 if multiprocessing.current_process().daemon else requested


class WorkerProgress:
    """A ProgressSink on a worker: sends the part's running count to the client as events."""

    def __init__(self, job: str, part: str) -> None:
        self.job, self.part = job, part
        self.done, self.sent_at = 0, 0.0

    def start(self, description: str, total: int, unit: str | None = None) -> int:
        return 0

    def advance(self, task: int, amount: int) -> None:
        self.done += amount
        if time.monotonic() - self.sent_at >= REPORT_EVERY_S:
            self._send()

    def note(self, task: int, text: str) -> None:
        pass

    def finish(self, task: int) -> None:
        self._send()

    def _send(self) -> None:
        from distributed import get_worker

        self.sent_at = time.monotonic()
        get_worker().log_event(TOPIC, {"job": self.job, "part": self.part, "done": self.done})


class JobProgress:
    """One client-side bar for a distributed job, fed by its workers' events."""

    def __init__(self, client: Any, progress: ProgressSink, description: str, total: int) -> None:
        self.job = uuid.uuid4().hex
        self.client, self.progress = client, progress
        self.task = progress.start(description, total)
        self.parts: dict[str, int] = {}
        self.shown = 0
        self.lock = threading.Lock()

    def __enter__(self) -> JobProgress:
        self.client.subscribe_topic(TOPIC, self._on_event)
        return self

    def __exit__(self, *exc) -> None:
        self.client.unsubscribe_topic(TOPIC)
        if exc[0] is None:
            self.progress.finish(self.task)

    def _on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        message = event[1]
        if message.get("job") == self.job:
            self.update(message["part"], message["done"])

    def update(self, part: str, done: int) -> None:
        """Set a part's count (also called by the client when a part's result arrives)."""
        with self.lock:
            self.parts[part] = done
            total = sum(self.parts.values())
            self.progress.advance(self.task, total - self.shown)
            self.shown = total


def gather_as_completed(client: Any, futures: dict[Any, Any], what: str,
                        no_workers_s: float = NO_WORKERS_S) -> Iterator[Any]:
    """(key, result) of each future as it completes; a failed task stops the job with its error
    (a SafeCacheError raised on a worker keeps its class and message). A cluster left without
    any worker for `no_workers_s` seconds stops the job too, instead of waiting forever."""
    from distributed import wait

    keys = {future.key: key for key, future in futures.items()}
    pending, without_workers = set(futures.values()), 0.0
    try:
        while pending:
            started = time.monotonic()
            try:
                done, pending = wait(pending, timeout=POLL_S, return_when="FIRST_COMPLETED")
            except TimeoutError:  # nothing finished within POLL_S
                done = set()
            for future in done:
                yield keys[future.key], future.result()
            if done or client.scheduler_info(n_workers=1).get("n_workers", 1):
                without_workers = 0.0
                continue
            without_workers += time.monotonic() - started
            if without_workers > no_workers_s:
                raise ClusterError(f"The dask cluster has had no worker for {no_workers_s:.0f} s"
                                   f" ({len(pending)} tasks of the job still to run). Start"
                                   f" workers (`dask worker ADDRESS`) and run the command again:"
                                   f" completed work is kept.")
    except SafeCacheError:
        raise
    except Exception as exc:
        name = type(exc).__name__
        raise ClusterError(f"{what} failed on a dask worker: {name}: {exc}") from exc
    finally:
        client.cancel([f for f in futures.values() if not f.done()])
