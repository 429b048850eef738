"""The thread policy for a shared machine (runtime/threads.py): the cores we may use, the idle
ones among them, the override, and that the stages obey it."""

from __future__ import annotations

import pytest
import torch

from safe_cache.errors import ConfigError
from safe_cache.runtime import threads
from safe_cache.runtime.threads import ThreadPolicy, cgroup_quota, requested_threads


def test_a_cgroup_quota_caps_the_usable_cores(tmp_path, monkeypatch):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 cores: SLURM --cpus-per-task
    assert cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_quota(v1) == 2.0
    monkeypatch.setattr(threads, "cgroup_quota", lambda: 1.5)
    assert threads.usable_cores() == 1  # floor, at least 1
    monkeypatch.setattr(threads, "cgroup_quota", lambda: 0.2)
    assert threads.usable_cores() == 1


@pytest.mark.parametrize("value, expected", [("3", 3), (2, 2), ("auto", None), (None, None)])
def test_the_override_is_a_whole_number_or_auto(value, expected, monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    assert requested_threads(value) == expected


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "two", " 2x"])
def test_a_bad_override_names_where_it_came_from(value, monkeypatch):
    with pytest.raises(ConfigError, match=r"--threads .*whole number of threads >= 1"):
        requested_threads(value)
    monkeypatch.setenv(threads.ENV, value)
    with pytest.raises(ConfigError, match="SAFE_CACHE_THREADS"):
        requested_threads()


class FakeSampler:
    def __init__(self, busy):
        self.busy = busy

    def others_busy(self):
        return self.busy


@pytest.mark.parametrize("cores, reserve, busy, expected", [
    (2, 0, 0.0, 2),   # idle: every core
    (2, 0, 1.3, 1),   # beside two busy processes (they get 4/3 of the cores): one thread
    (2, 0, 2.0, 1),   # never fewer than one
    (8, 0, 3.0, 5),   # the cores others leave idle
    (8, 3, 0.0, 5),   # decoding workers' cores first
    (8, 3, 4.0, 1),
])
def test_the_policy_takes_the_idle_cores_less_the_workers(cores, reserve, busy, expected,
                                                          monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    policy = ThreadPolicy(reserve=reserve)
    policy.sampler = FakeSampler(busy)
    assert policy._choose() == expected


def test_tick_adapts_at_most_every_tick_and_the_block_restores_torchs_count(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    before = torch.get_num_threads()
    with threads.thread_policy() as policy:
        policy.sampler = FakeSampler(1.3)
        policy.checked = 0.0  # the last measurement long ago
        policy.tick()
        assert torch.get_num_threads() == 1
        policy.sampler = FakeSampler(0.0)
        policy.tick()  # within TICK_S of the last: unchanged
        assert torch.get_num_threads() == 1
        policy.checked = 0.0
        policy.tick()
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    assert policy.record() == {"threads": "adaptive", "usable_cores": 2,
                               "thread_counts": sorted(set(policy.history))}


def test_a_fixed_count_is_set_and_never_changed(monkeypatch):
    monkeypatch.setenv(threads.ENV, "1")
    with threads.thread_policy() as policy:
        policy.checked = 0.0
        policy.tick()
        assert torch.get_num_threads() == 1 and policy.sampler is None
    assert policy.record()["threads"] == "fixed"


def test_the_sampler_does_not_count_our_own_cpu_time():
    sampler = threads._CpuSampler()
    if sampler.last is None:
        pytest.skip("no /proc/stat here")
    sampler.last = (sampler.last[0] - 1.0, *sampler.last[1:])  # a window of about a second
    x = torch.randn(400, 400)
    for _ in range(50):
        x @ x  # our own work in the window
    busy = sampler.others_busy()
    assert busy is not None and 0.0 <= busy <= len(threads._affinity() or {0}) + 0.5


@pytest.mark.slow
def test_fit_records_the_thread_policy(monkeypatch, tmp_path):
    from test_fit import synthetic_store

    from safe_cache.fit import FitConfig, fit

    monkeypatch.setenv(threads.ENV, "1")
    url = synthetic_store(str(tmp_path / "s.zarr"))
    [result] = fit(FitConfig(store=url, shots=(8,), seeds=(1,), iters=4, eval_every=2,
                             lrs=(1e-3,), wds=(0.0,), device="cpu", out=str(tmp_path / "r"),
                             methods=()))
    assert result.execution["threads"] == "fixed" and result.execution["thread_counts"] == [1]


def test_a_bad_thread_count_names_where_it_came_from_on_the_cli(monkeypatch):
    from click.testing import CliRunner

    from safe_cache.cli import main

    result = CliRunner().invoke(main, ["fit", "--threads", "0", "--store", "x.zarr"])
    assert result.exit_code == 2 and "whole number of threads >= 1" in result.output
    assert "SAFE_CACHE_THREADS" not in result.output
    result = CliRunner().invoke(main, ["fit", "--store", "x.zarr"],
                                env={"SAFE_CACHE_THREADS": "abc"})
    assert result.exit_code == 2 and "SAFE_CACHE_THREADS='abc'" in result.output


def test_extracts_policy_never_follows_the_load(monkeypatch):
    """Stored maps must not depend on a neighbour's load: extract's count is the usable cores
    less its workers, fixed for the run, however busy the machine is."""
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    policy = ThreadPolicy(reserve=1, adapt=False)
    assert policy.sampler is None  # nothing measures the load
    policy.sampler = FakeSampler(3.5)  # and were it measured, it is not consulted
    assert policy._choose() == 3
    policy.checked = 0.0
    policy.tick()
    assert policy.history == []  # tick does nothing for a fixed count
