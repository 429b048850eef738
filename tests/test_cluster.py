"""Beyond one machine: a LocalCluster of 2 worker processes extracts and fits; local and s3://
(moto on 127.0.0.1) stores; a worker killed mid-job; the chunk cache; `safe-cache copy`."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from factories import raw_split, whole
from miniatures import write_split_zhou
from safetensors.numpy import load_file

from safe_cache import SafeCacheError, StoreError
from safe_cache.cli import main
from safe_cache.data.views import WorkItem
from safe_cache.extract import ExtractConfig, extract, tasks
from safe_cache.extract.tasks import plan_tasks
from safe_cache.fit import FitConfig, fit, fit_stores
from safe_cache.runtime import cluster
from safe_cache.runtime.cluster import ClusterError, connect
from safe_cache.store import StoreLayout, open_store
from safe_cache.store.transfer import copy_store
from safe_cache.store.verify import verify_store

pytestmark = pytest.mark.slow  # LocalClusters of worker processes: seconds each

COUNTS = {"train": 6, "val": 4, "test": 10}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cluster")
    write_split_zhou(root, "food101", classes=4, counts=COUNTS)
    return root


def config(data: Path, store: str, **overrides) -> ExtractConfig:
    values = dict(dataset="food101", root=str(data), model="safe-cache-tiny-vit",
                  pretrained=None, store=store, shots=(1, 2), seeds=(1, 2), views=2, workers=0,
                  batch_size=2, layout=StoreLayout(chunk_images=4), task_images=4)
    values.update(overrides)
    return ExtractConfig(**values)


@pytest.fixture(scope="module")
def client():
    with connect(local_workers=2) as client:
        yield client


@pytest.fixture(scope="module")
def reference(data) -> str:
    """The in-process extraction everything distributed is compared with."""
    url = str(data / "in_process.zarr")
    extract(config(data, url))
    return url


def s3_options(endpoint: str) -> dict:
    """Credentials in the options, not the environment: worker processes get them too."""
    return {"key": "test", "secret": "test", "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


def assert_same_store(url: str, reference: str, options: dict | None = None) -> None:
    a, b = open_store(url, storage_options=options), open_store(reference)
    assert a.splits() == b.splits()
    for split in b.splits():
        assert a.readable_rows(split).tolist() == b.readable_rows(split).tolist()
        raw_a, raw_b = raw_split(url, split, options), raw_split(reference, split)
        for name in raw_b.array_keys():
            assert np.array_equal(raw_a[name][:], raw_b[name][:]), f"{split}/{name}"
    for seed in (1, 2):
        for shots in (1, 2):
            for x, y in zip(a.fewshot(seed, shots), b.fewshot(seed, shots), strict=True):
                assert np.array_equal(x, y)
    assert np.array_equal(a.classifier(), b.classifier())
    assert verify_store(url, storage_options=options) == []


def test_tasks_are_whole_write_units():
    items = [WorkItem(row, None, str(row), 0, False) for row in [0, 1, 2, 5, 6, 8, 9, 10, 11, 13]]
    tasks = plan_tasks(items, unit=4, task_images=8)  # two units per task
    assert [[i[0] for i in task] for task in tasks] == [[0, 1, 2, 5, 6], [8, 9, 10, 11, 13]]
    units = [{i[0] // 4 for i in task} for task in tasks]
    assert all(not (a & b) for n, a in enumerate(units) for b in units[n + 1:])
    assert len(plan_tasks(items, unit=4, task_images=1)) == 4  # never less than a unit


def test_distributed_extraction_equals_in_process(data, reference, client):
    url = str(data / "distributed.zarr")
    report = extract(config(data, url), client=client)
    assert report.extracted == report.rows  # every row extracted now, by the workers
    assert report.rows["test"] == 4 * COUNTS["test"]
    loads = client.run(lambda: tasks.worker_backbone.cache_info())  # per worker process
    task_count = sum(len(plan_tasks([WorkItem(r, None, "", 0, False) for r in range(n)], 4, 4))
                     for n in report.rows.values())  # rows are contiguous here
    assert all(info.misses == 1 for info in loads.values())  # the backbone loaded once each
    assert sum(info.hits + info.misses for info in loads.values()) == task_count
    assert_same_store(url, reference)
    again = extract(config(data, url), client=client)  # complete: nothing submitted
    assert sum(again.extracted.values()) == 0


def test_distributed_extraction_into_s3(data, reference, client, s3_endpoint):
    options = s3_options(s3_endpoint)
    url = f"s3://stores/{uuid.uuid4().hex[:8]}.zarr"
    extract(config(data, url, storage_options=options,
                   layout=StoreLayout(chunk_images=4, shard_images=8), task_images=16),
            client=client)
    store = open_store(url, storage_options=options)
    assert store.layout.shard_images == 8
    reference_store = open_store(reference)
    for split in reference_store.splits():  # other write units: compare the readable rows
        a, b = store.split(split).load(), reference_store.split(split).load()
        assert a.sizes == b.sizes
        for name in b.variables:
            assert np.array_equal(a[name].values, b[name].values), f"{split}/{name}"
    assert verify_store(url, storage_options=options) == []


def fit_config(store: str, out: Path, **overrides) -> FitConfig:
    values = dict(store=store, shots=(1,), seeds=(1, 2), lrs=(1e-3, 1e-4), wds=(0.0,), iters=20,
                  eval_every=10, methods=("tip_adapter",), out=str(out), device="cpu")
    values.update(overrides)
    return FitConfig(**values)


def _heads(out: Path) -> dict[str, dict[str, np.ndarray]]:
    return {p.name: load_file(p) for p in sorted(out.rglob("shots*.safetensors"))}


def test_distributed_fit_over_two_seeds_equals_in_process(tmp_path, reference, client):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a dask worker (OMP_NUM_THREADS=1): the same sums
    try:
        local = fit(fit_config(reference, tmp_path / "local"))
    finally:
        torch.set_num_threads(threads)
    remote = fit(fit_config(reference, tmp_path / "cluster"), client=client)
    assert [(r.shots, r.seed) for r in remote] == [(1, 1), (1, 2)]
    for a, b in zip(local, remote, strict=True):
        assert a.methods == b.methods and a.grid == b.grid
    heads_a, heads_b = _heads(tmp_path / "local"), _heads(tmp_path / "cluster")
    assert heads_a.keys() == heads_b.keys() and len(heads_a) == 2
    for name, state in heads_a.items():
        for key, value in state.items():
            np.testing.assert_array_equal(heads_b[name][key], value)
    written = sorted(p.name for p in (tmp_path / "cluster").rglob("*.json"))
    assert [re.sub(r"_o[0-9a-f]{8}", "", name) for name in written] == \
        ["shots1_seed1_safe.json", "shots1_seed2_safe.json"]  # (the test's options' suffix)
    assert len({name.rsplit("_", 1)[1] for name in written}) == 1  # one identity but the seed
    skipped = fit(fit_config(reference, tmp_path / "cluster"), client=client)
    assert all(r.skipped for r in skipped)  # existing results are not run again


def test_several_stores_fit_in_one_job(tmp_path, data, reference, client):
    write_split_zhou(tmp_path, "dtd", classes=3, counts={"train": 4, "val": 2, "test": 2})
    other = str(tmp_path / "dtd.zarr")
    extract(ExtractConfig(dataset="dtd", root=str(tmp_path), model="safe-cache-tiny-vit",
                          pretrained=None, store=other, shots=(1,), seeds=(1,), views=1,
                          workers=0))
    results = fit_stores([fit_config(reference, tmp_path / "out", seeds=(1,)),
                          fit_config(other, tmp_path / "out", seeds=(1,))], client=client)
    assert [r.dataset for r in results] == ["food101", "dtd"]
    assert {p.parent.parent.name for p in (tmp_path / "out").rglob("*.json")} == {"food101",
                                                                                 "dtd"}
    copy_store(reference, str(tmp_path / "twin.zarr"))
    with pytest.raises(SafeCacheError, match="overwrite each other"):
        fit_stores([fit_config(reference, tmp_path / "out"),
                    fit_config(str(tmp_path / "twin.zarr"), tmp_path / "out")])


def test_copy_to_s3_then_fit_through_a_chunk_cache(tmp_path, reference, s3_endpoint):
    options = s3_options(s3_endpoint)
    url = f"s3://stores/{uuid.uuid4().hex[:8]}.zarr"
    report = copy_store(reference, url, destination_options=options)
    assert report.problems == [] and report.already_there == 0  # compared and verified
    cache = tmp_path / "cache"
    local = fit(fit_config(reference, tmp_path / "local", seeds=(1,)))
    remote = fit(fit_config(url, tmp_path / "remote", seeds=(1,), storage_options=options,
                            cache=str(cache)))
    assert local[0].methods == remote[0].methods
    cached = [p for p in cache.rglob("*") if p.is_file()]
    assert cached and all("/c/" in str(p) for p in cached)  # feature chunks only, no metadata
    again = open_store(url, storage_options=options, cache=str(cache))
    whole(again, "test", "dense")  # zarr here (a dask read would run on the cluster)
    assert again.cache_counts()["hits"] > 0 and again.cache_counts()["misses"] == 0


def test_an_interrupted_copy_resumes_and_a_store_is_never_overwritten(tmp_path, reference):
    target = tmp_path / "copy.zarr"
    copy_store(reference, str(target))
    (target / "zarr.json").unlink()  # as if stopped before the card: no store yet
    (target / "test" / "dense" / "c" / "1" / "0" / "0").unlink()
    with pytest.raises(StoreError, match="No store"):
        open_store(str(target))
    report = copy_store(reference, str(target))
    assert report.problems == [] and report.already_there == report.objects - 2
    assert_same_store(str(target), reference)
    with pytest.raises(StoreError, match="already holds a store"):
        copy_store(reference, str(target))


def test_copy_refuses_a_store_being_written(tmp_path, reference):
    writer = open_store(reference, "a")
    try:
        with pytest.raises(StoreError, match="being written"):
            copy_store(reference, str(tmp_path / "x.zarr"))
    finally:
        writer.close()
    assert not (tmp_path / "x.zarr").exists()


def test_cli_extract_on_local_workers_and_copy(tmp_path, data, reference):
    url = str(tmp_path / "cli.zarr")
    runner = CliRunner()
    result = runner.invoke(main, [
        "extract", "--dataset", "food101", "--root", str(data), "--model", "safe-cache-tiny-vit",
        "--pretrained", "none", "--store", url, "--shots", "1,2", "--seeds", "1,2", "--views",
        "2", "--workers", "0", "--batch-size", "2", "--local-workers", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"]["test"] == 40
    copied = runner.invoke(main, ["copy", url, str(tmp_path / "published.zarr"), "--json"])
    assert copied.exit_code == 0, copied.output
    assert json.loads(copied.stdout)["problems"] == []
    assert verify_store(str(tmp_path / "published.zarr")) == []


def test_a_scheduler_that_does_not_answer_is_named(monkeypatch):
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 1.0)
    address = "tcp://127.0.0.1:9"
    with pytest.raises(ClusterError, match=re.escape(address)), connect(address):
        pass


def test_a_cluster_without_workers_stops_the_job_with_a_message(monkeypatch):
    from distributed import Client, LocalCluster

    monkeypatch.setattr(cluster, "POLL_S", 0.1)
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as local, \
            Client(local) as client:
        futures = {0: client.submit(sum, [1, 2])}
        with pytest.raises(ClusterError, match=r"no worker for 0 s.*dask worker"):
            list(cluster.gather_as_completed(client, futures, "A task", no_workers_s=0.3))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_readme_scheduler_and_worker_commands(data, reference, tmp_path):
    """docs/scaling.md's steps 1-3 as written: `dask scheduler`, a `dask worker` process with
    daemon workers off, and an extraction sent to the scheduler's address."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    processes = [subprocess.Popen(["dask", "scheduler", "--port", str(port), "--dashboard-address",
                                   ":0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        processes.append(subprocess.Popen(
            ["dask", "worker", address, "--nworkers", "1", "--nthreads", "1", "--name", "w0"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        url = str(tmp_path / "scheduler.zarr")
        with connect(address) as client:
            client.wait_for_workers(1, timeout=60)
            assert client.run(lambda: __import__("multiprocessing").current_process().daemon) \
                == {next(iter(client.scheduler_info()["workers"])): False}
            extract(config(data, url), client=client)
        assert_same_store(url, reference)
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=30)


# Last in the module: it kills processes, so nothing else shares its cluster or its timing.
class _KillOnFirstEvent:
    """A progress sink that, at the first event from a worker, has another thread kill
    (SIGKILL) a worker process that is running a shard at that moment."""

    def __init__(self, client) -> None:
        self.client = client
        self.pids = client.run(os.getpid)
        self.started = threading.Event()
        self.killed: list[int] = []
        self.thread = threading.Thread(target=self._kill, daemon=True)
        self.thread.start()

    def _kill(self) -> None:
        self.started.wait(60)
        busy = [addr for addr, keys in self.client.processing().items() if keys]
        if busy:
            os.kill(self.pids[busy[0]], signal.SIGKILL)
            self.killed.append(self.pids[busy[0]])

    def start(self, description, total):
        return 0

    def advance(self, task, amount):
        self.started.set()  # called on the client's event loop: the kill happens elsewhere

    def note(self, task, text):
        pass

    def finish(self, task):
        pass


def test_a_worker_killed_mid_job_still_completes_the_store(data, reference):
    url = str(data / "killed.zarr")
    with connect(local_workers=2) as client:
        killer = _KillOnFirstEvent(client)
        extract(config(data, url), killer, client=client)
        killer.thread.join(10)
    assert killer.killed, "no worker was busy when the first progress event came"
    with pytest.raises(ProcessLookupError):
        os.kill(killer.killed[0], 0)
    assert_same_store(url, reference)
