"""What each method cost: mean seconds per run, by backbone, method and shots, from the
results' timings (SAFE: its grid's training, `timings.train_s`; every other method: the
seconds fit measured around it, `timings.methods_s`). The workbench study's page prints it
beside the accuracy tables: the comparison with its price."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from ..fit.results import METHODS, RunResult


def method_seconds(run: RunResult) -> dict[str, float]:
    """{method: seconds} of one run (results written before methods_s carry SAFE's only)."""
    timings = run.timings or {}
    seconds = {"safe": float(timings.get("train_s", 0.0))} if "train_s" in timings else {}
    seconds.update({name: float(value) for name, value in
                    (timings.get("methods_s") or {}).items() if name in run.methods})
    return seconds


def cost_rows(runs: list[RunResult]) -> list[dict[str, Any]]:
    """One row per backbone x method x shots: mean and max seconds per run, and how many."""
    groups: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for run in runs:
        for method, seconds in method_seconds(run).items():
            groups[run.backbone_label, method, run.shots].append(seconds)
    order = {m: i for i, m in enumerate(METHODS)}
    return [{"backbone": backbone, "method": method, "shots": shots,
             "seconds": statistics.fmean(values), "max_seconds": max(values),
             "runs": len(values)}
            for (backbone, method, shots), values in sorted(
                groups.items(), key=lambda item: (item[0][0], order.get(item[0][1], 99),
                                                  item[0][2]))]
