"""Table III as rows: 16-shot ImageNet runs tested on its variants, beside the paper's numbers.

Kept apart from report.py (the in-distribution tables) so each stays a readable size. Each row
is one backbone x setting x method: the mean and std over seeds (%) per column (the source
ImageNet, then -V2, -Sketch, -A, -R), and the paper's Table III entry of the same method and
backbone with our delta, where the run is the paper's setting (report.paper_reasons). A method
is compared only with its own published entry: the training-free Tip-Adapter, which Table III
does not list, gets no number, never Tip-Adapter-F's. Table III's methods that need the full
encoders (CoOp, CoCoOp, WiSE-FT, Cross-Modal fine-tuning, CALIP-FS) stand as published-only
rows beside the runs of the paper's setting, as Table I's do (literature.py).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from ..fit.results import RunResult
from .literature import TABLE_III_FULL_ENCODER_METHODS, safe_paper
from .report import base_method, method_label, paper_reasons, setting_label

OOD_COLUMNS = ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
TABLE_III = "table_3"


def ood_rows(runs: list[RunResult]) -> list[dict[str, Any]]:
    """Table III: per backbone, setting and method, ImageNet (source) and variant accuracy (%)
    of the 16-shot runs (the table's setting; other shot counts are left out): `columns` means
    over seeds (also as top-level keys), `std`, and `paper` / `delta` per column beside runs of
    its setting (RN50 and ViT-B-16); then the published-only rows of each such backbone."""
    table = safe_paper()[TABLE_III]
    paper, shots = table["backbones"], table["shots"]
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    first: dict[tuple, RunResult] = {}
    for run in runs:
        if not run.ood or run.dataset != "imagenet" or run.shots != shots:
            continue
        for method, values in run.methods.items():
            if not all(method in variant for variant in run.ood.values()):
                continue
            key = (run.backbone_label, run.group, method_label(method, values))
            first.setdefault(key, run)
            groups[key]["imagenet"].append(100 * values["test_acc"])
            for name, variant in run.ood.items():
                groups[key][name].append(100 * variant[method])
    rows = []
    for key, columns in sorted(groups.items(), key=lambda item: (item[0][0], item[0][2])):
        run, method = first[key], key[2]
        reasons = paper_reasons(run, tuple(paper))
        entry = paper.get(run.backbone["model"], {}).get(base_method(method))
        means = {c: statistics.fmean(columns[c]) if columns.get(c) else None
                 for c in OOD_COLUMNS}
        published = {c: None if reasons or not entry else entry.get(c) for c in OOD_COLUMNS}
        rows.append({"backbone": key[0], "model": run.backbone["model"],
                     "recipe": run.recipe_name, "setting": setting_label(run), "method": method,
                     **means, "std": {c: _std(columns.get(c, [])) for c in OOD_COLUMNS},
                     "seeds": len(columns["imagenet"]), "paper": published,
                     "delta": {c: _delta(means[c], published[c]) for c in OOD_COLUMNS},
                     "reasons": reasons,
                     "paper_note": "; ".join(reasons) if reasons and entry else None,
                     "published": False})
    return rows + _published_only(rows, paper)


def _std(values: list[float]) -> float | None:
    """The std over seeds (0 for one seed, None for none), as report.aggregate's."""
    return statistics.stdev(values) if len(values) > 1 else 0.0 if values else None


def _delta(ours: float | None, paper: float | None) -> float | None:
    return None if ours is None or paper is None else ours - paper


def _published_only(rows: list[dict[str, Any]], paper: dict[str, Any]) -> list[dict[str, Any]]:
    """Table III's full-encoder methods, one row each per backbone and setting among `rows`
    that are the paper's setting (no reasons), in the paper's order: never averaged with ours."""
    settings = dict.fromkeys((r["backbone"], r["model"], r["setting"])
                             for r in rows if not r["reasons"])
    out = []
    for backbone, model, setting in settings:
        for method in TABLE_III_FULL_ENCODER_METHODS:
            entry = paper.get(model, {}).get(method)
            if not entry:
                continue
            out.append({"backbone": backbone, "model": model, "recipe": "published",
                        "setting": setting, "method": method,
                        **dict.fromkeys(OOD_COLUMNS), "std": dict.fromkeys(OOD_COLUMNS),
                        "seeds": 0, "paper": {c: entry.get(c) for c in OOD_COLUMNS},
                        "delta": dict.fromkeys(OOD_COLUMNS), "reasons": [],
                        "paper_note": None, "published": True,
                        "source": f"{safe_paper()['source']}, Table III"})
    return out

