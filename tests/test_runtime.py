"""tune_cpu_allocator keeps freed gradient buffers in the heap: no page faults per training step."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

# Ten fwd+bwd steps of a RN50 fast head (its gradients are 8-16 MB each), page faults per step.
SCRIPT = """
import json, resource, sys, torch
from safe_cache import load_backbone
from safe_cache.runtime.allocator import tune_cpu_allocator
tuned = tune_cpu_allocator() if sys.argv[1] == "tune" else False
backbone = load_backbone("RN50")
head = backbone.new_head()
x = torch.randn(8, backbone.card["tokens"], backbone.card["channels"]).relu()
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    head(x).square().mean().backward()
    head.zero_grad(set_to_none=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def page_faults(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
@pytest.mark.slow
def test_tuned_allocator_removes_per_step_page_faults():
    plain, tuned = page_faults("plain"), page_faults("tune")
    assert tuned["tuned"] is True
    gradient_pages = 4 * 2048 * 2048 * 4 // 4096  # four C x C gradients of RN50's attnpool
    # glibc returns freed gradients to the OS, so later steps keep faulting pages in again ...
    assert statistics.median(plain["faults"][-6:]) > gradient_pages // 8
    # ... unless the heap keeps them: then a typical step reuses its pages (the median ignores
    # the odd step in which the heap grows to a new peak)
    assert statistics.median(tuned["faults"][-6:]) < gradient_pages // 50


# --- one executor: runtime/execution.py -------------------------------------------------------

def test_in_process_tasks_run_in_order_with_the_callers_progress():
    from safe_cache.runtime.execution import IN_PROCESS, run_tasks

    seen = []

    class Sink:
        def start(self, description, total, unit=None):
            return 0

    sink = Sink()
    out = run_tasks({"b": 2, "a": 1}, lambda task, progress: seen.append((task, progress))
                    or task * 10, sink, IN_PROCESS, sizes={"b": 1, "a": 1},
                    description="x", what="A task")
    assert out == {"b": 20, "a": 10} and list(out) == ["b", "a"]
    assert seen == [(2, sink), (1, sink)]


def test_an_execution_is_checked_and_round_trips():
    from safe_cache.errors import ClusterError, ConfigError
    from safe_cache.runtime.execution import Execution

    assert not Execution().distributed and Execution(local_workers=2).distributed
    assert Execution.from_dict(Execution(scheduler="tcp://h:1").to_dict()).scheduler == "tcp://h:1"
    with pytest.raises(ClusterError, match="either --scheduler or --local-workers"):
        Execution(scheduler="tcp://h:1", local_workers=2)
    for bad in (-1, 2.5, True, 5000):
        with pytest.raises(ConfigError, match="local_workers"):
            Execution(local_workers=bad)
    with pytest.raises(ConfigError, match="'workers' is not an execution setting"):
        Execution.from_dict({"workers": 2})


def test_lent_resources_are_found_in_the_block_only():
    from safe_cache.runtime.execution import local_resource, local_resources

    made = []
    with local_resources({("store", "a"): "open-a"}):
        assert local_resource(("store", "a"), lambda: made.append(1)) == "open-a"
        with local_resources({("store", "a"): "other"}):  # the outer lender keeps its own
            assert local_resource(("store", "a"), lambda: "x") == "open-a"
        assert local_resource(("store", "a"), lambda: "x") == "open-a"
    assert local_resource(("store", "a"), lambda: "opened") == "opened" and made == []


def test_configs_carry_no_execution_and_old_results_still_read():
    from dataclasses import fields

    from safe_cache.extract.config import ExtractConfig
    from safe_cache.fit.config import FitConfig

    for config in (ExtractConfig, FitConfig):
        assert not {"scheduler", "local_workers"} & {f.name for f in fields(config)}
    recorded = {**FitConfig(store="s.zarr", device="cpu").to_dict(), "scheduler": None,
                "local_workers": 0}  # as 0.2.0 wrote a result's config (fit/compat.py)
    assert FitConfig.from_dict(recorded).store == "s.zarr"
