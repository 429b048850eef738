"""Stage 2: train SAFE and the adapters from a store.

config (FitConfig), grid (the stacked lr x wd grid, its optimizer and best states), train (one
run), evaluate (accuracy, streamed splits, the beta curve), adapters (Tip-Adapter(-F), SAFE-A,
linear probe), results (the result record and the method list), ood (ImageNet variants), runs
(every run of a job, in process or on dask). Never imports extract/.

The names below load on first use, so reading a result record (`fit.results`) imports no torch.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "FitConfig": "config", "DEFAULT_BETAS": "config",
    "fit": "runs", "fit_stores": "runs", "fit_and_save": "runs",
    "fit_one": "train", "original_head": "train",
    "RunResult": "results", "result_path": "results", "load_result": "results",
    "load_results": "results", "METHODS": "results", "OPTIONAL_METHODS": "results",
}

__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
