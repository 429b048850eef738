"""`fit --methods gda,lp_pp` end to end: fit_one on test_fit's generated store runs both
workbench methods beside SAFE and records each one's result and seconds."""

from __future__ import annotations

import pytest
from test_fit import CLASSES, COUNTS, synthetic_store

from safe_cache.fit import FitConfig
from safe_cache.fit.train import fit_one
from safe_cache.store import open_store


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_fit_one_runs_gda_and_lp_pp(tmp_path):
    path = synthetic_store(str(tmp_path / "spots.zarr"))
    config = FitConfig(store=path, shots=(8,), seeds=(1,), lrs=(1e-2,), wds=(0.0,), iters=20,
                       eval_every=10, betas=(0.0, 0.5), methods=("gda", "lp_pp"),
                       out=str(tmp_path / "results"))
    result, _, cache = fit_one(open_store(path), 8, 1, config)
    assert set(result.methods) == {"zero_shot", "safe", "gda", "lp_pp"} and cache is None
    assert set(result.timings["methods_s"]) == {"gda", "lp_pp"}
    assert all(s >= 0 for s in result.timings["methods_s"].values())
    for name in ("gda", "lp_pp"):
        method = result.methods[name]
        assert 0 <= method["val_acc"] <= 1 and 0 <= method["test_acc"] <= 1, name
    assert result.methods["gda"]["samples"] == CLASSES * COUNTS["train"] * 2  # 2 views each
    assert 1 <= result.methods["lp_pp"]["epoch"] <= result.methods["lp_pp"]["epochs"]
