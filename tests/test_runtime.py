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
x = torch.randn(8, backbone.card["T"], backbone.card["C"]).relu()
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
