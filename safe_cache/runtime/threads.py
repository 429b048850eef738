"""How many threads torch's intra-op pool gets, chosen for a machine other processes share.

Why: torch's intra-op pool is as wide as the machine and its threads spin between ops. Beside
other busy processes, each op then waits for its slowest, preempted thread: on 2 cores beside
two busy processes a 300-iteration fit ran 5.4x slower than alone, where a fair share of the
cores is 2x; with one thread it ran 1.9x slower (docs/performance.md, benchmarks/contention.py).
What a second thread buys alone depends on the op size (benchmarks/threads.py): little for the
tiny heads, more for RN50's and ViT-B/16's steps.

The policy (`ThreadPolicy`):
- the cores this process may use: its CPU affinity (taskset, SLURM's cpu binding), capped by a
  cgroup CPU quota (containers, SLURM's cgroup plugin), at least 1 (`usable_cores`);
- of those, the ones other processes leave idle, measured from /proc/stat over the last few
  seconds (our own CPU time, spinning included, does not count against us); re-measured every
  `TICK_S` seconds by a fit's training loop, so a fit started
  beside a busy job widens again when the job ends;
- DataLoader workers a stage starts are subtracted first (`reserve`): workers plus torch threads
  never exceed the usable cores;
- extract does not adapt: it keeps the usable cores less its configured workers for the whole
  run, since the maps it stores must be bitwise the same whether a run was resumed, or ran
  beside a busy job (a convolution's sums depend on the thread count); fit adapts, and its
  numbers may differ in the last bits between runs under different loads;
- `--threads N` / SAFE_CACHE_THREADS=N fixes the count (a benchmark, or bitwise-reproducible
  numbers: a reduction's float sum order depends on the thread count, so results of runs with
  different counts may differ in the last bits).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError

ENV = "SAFE_CACHE_THREADS"
TICK_S = 2.0  # how often a long loop re-measures the idle cores
STAT = Path("/proc/stat")


def usable_cores() -> int:
    """The cores this process may run on: its affinity, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (cgroup v2 `cpu.max`, else v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`); None when unlimited or unreadable."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    return None


def requested_threads(value: int | str | None = None) -> int | None:
    """A fixed thread count: `value` (--threads), else SAFE_CACHE_THREADS; None: adapt."""
    raw = value if value is not None else os.environ.get(ENV)
    if raw is None or raw == "" or raw == "auto":
        return None
    try:
        count = int(raw)
    except (TypeError, ValueError):
        count = 0
    if count < 1 or str(raw).strip() != str(count):
        source = "--threads" if value is not None else ENV
        raise ConfigError(f"{source} {raw!r}: give a whole number of threads >= 1, or auto.")
    return count


class _CpuSampler:
    """Busy time of the cores we may use, from /proc/stat, less our own process's CPU time."""

    def __init__(self) -> None:
        self.cpus = _affinity()
        self.last = self._read()

    def _read(self) -> tuple[float, float, float] | None:
        try:
            lines = STAT.read_text().splitlines()
        except OSError:
            return None
        ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy = 0.0
        for line in lines:
            name, *values = line.split()
            if not name.startswith("cpu") or name == "cpu" or \
                    (self.cpus and int(name[3:]) not in self.cpus):
                continue
            numbers = [int(v) for v in values[:8]]
            busy += sum(numbers) - numbers[3] - numbers[4]  # all but idle and iowait
        own = sum(os.times()[:2])
        return time.monotonic(), busy / ticks, own

    def others_busy(self) -> float | None:
        """Cores other processes kept busy since the last call (None without /proc/stat, or
        when too little time passed to tell)."""
        now = self._read()
        if now is None or self.last is None or now[0] - self.last[0] < 0.05:
            return None
        (t0, busy0, own0), (t1, busy1, own1) = self.last, now
        self.last = now
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))


def _load_average() -> float | None:
    """The 1-minute load average per usable core's worth (our own share included: it errs
    towards fewer threads until the first measurement)."""
    try:
        return os.getloadavg()[0] * usable_cores() / (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return None


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set()


class ThreadPolicy:
    """Sets torch's intra-op thread count now and, on `tick()`, as the machine's load changes
    (see the module docstring). `reserve`: cores kept for DataLoader workers. `adapt=False`:
    the usable cores less `reserve`, whatever the load, for the whole run (extract: its stored
    maps must not depend on a neighbour's load)."""

    def __init__(self, threads: int | str | None = None, *, reserve: int = 0,
                 adapt: bool = True) -> None:
        self.fixed = requested_threads(threads)
        self.cores = usable_cores()
        self.reserve = min(max(0, reserve), self.cores - 1)
        if self.fixed is None and not adapt:
            self.fixed = self.cores - self.reserve
        self.sampler = None if self.fixed else _CpuSampler()
        self.checked = time.monotonic()
        self.history: list[int] = []

    def start(self) -> int:
        """Set the count from the load average (no window has passed yet: waiting for one
        would cost every call); the first tick measures. Returns the count."""
        return self._set(self._choose(first=True))

    def tick(self) -> None:
        """Re-measure and re-set at most every TICK_S seconds (cheap to call every step)."""
        if self.fixed is None and time.monotonic() - self.checked >= TICK_S:
            self._set(self._choose())

    def _choose(self, first: bool = False) -> int:
        ceiling = self.cores - self.reserve
        if self.fixed is not None:
            return self.fixed
        busy = self.sampler.others_busy() if self.sampler and not first else None
        if busy is None:
            busy = _load_average()
        if busy is None:
            return ceiling
        return max(1, min(ceiling, math.floor(ceiling - busy + 0.5)))

    def _set(self, count: int) -> int:
        import torch

        self.checked = time.monotonic()
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)
        self.history.append(count)
        return count

    def record(self) -> dict[str, object]:
        """What a result's `execution` block says about the threads a run used."""
        return {"threads": "fixed" if self.fixed else "adaptive", "usable_cores": self.cores,
                "thread_counts": sorted(set(self.history))}


@contextlib.contextmanager
def thread_policy(threads: int | str | None = None, *, reserve: int = 0, adapt: bool = True
                  ) -> Iterator[ThreadPolicy]:
    """A policy for the block; torch's previous count is restored after it."""
    import torch

    before = torch.get_num_threads()
    policy = ThreadPolicy(threads, reserve=reserve, adapt=adapt)
    policy.start()
    try:
        yield policy
    finally:
        torch.set_num_threads(before)
