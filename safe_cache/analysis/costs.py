"""What each method cost: mean seconds per run, by backbone, method and shots, from the
results' timings (SAFE: its grid's training, `timings.train_s`; every other method: the
seconds fit measured around it, `timings.methods_s`). The workbench study's page prints it
beside the accuracy tables: the comparison with its price."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from ..fit.results import METHODS, RunResult
from .report import base_method, method_label, setting_label


def method_seconds(run: RunResult) -> dict[str, float]:
    """{method: seconds} of one run (results written before methods_s carry SAFE's only)."""
    timings = run.timings or {}
    seconds = {"safe": float(timings.get("train_s", 0.0))} if "train_s" in timings else {}
    seconds.update({name: float(value) for name, value in
                    (timings.get("methods_s") or {}).items() if name in run.methods})
    return seconds


def cost_rows(runs: list[RunResult]) -> list[dict[str, Any]]:
    """One row per backbone x setting x method x shots: mean and max seconds per run, and how
    many. Settings and protocols stay apart, as in the accuracy tables (report.py's labels)."""
    groups: dict[tuple[str, str, str, int], list[float]] = defaultdict(list)
    for run in runs:
        setting = setting_label(run)
        for method, seconds in method_seconds(run).items():
            label = method_label(method, run.methods[method])
            groups[run.backbone_label, setting, label, run.shots].append(seconds)
    order = {m: i for i, m in enumerate(METHODS)}
    return [{"backbone": backbone, "setting": setting, "method": method, "shots": shots,
             "seconds": statistics.fmean(values), "max_seconds": max(values),
             "runs": len(values)}
            for (backbone, setting, method, shots), values in sorted(
                groups.items(), key=lambda item: (item[0][0], item[0][1],
                                                  order.get(base_method(item[0][2]), 99),
                                                  item[0][2], item[0][3]))]
