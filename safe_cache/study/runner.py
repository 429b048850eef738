"""Run a study: extract what is missing, fit what has no result, write the report.

Every level resumes: `extract` completes a store where it stopped (per-unit writes, a lease),
`fit` skips runs whose result is whole (the JSON is written last), and the report is rebuilt
from the result files. A study killed at any point and run again therefore finishes with the
same result files as an uninterrupted run, and a finished study run again does no work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DatasetError
from ..runtime.execution import IN_PROCESS, Execution
from ..runtime.progress import ProgressSink, null_progress
from .plan import StudyPlan, fit_config, plan_study
from .spec import Study, load_study, resolve_prompts


@dataclass
class StudyResult:
    """What `run` did, and the report's data (the page is written from it)."""

    plan: StudyPlan
    extracted: list[str] = field(default_factory=list)  # store URLs extracted or extended
    fitted: int = 0
    skipped: int = 0
    seconds: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)
    pages: list[Path] = field(default_factory=list)


def _extract_config(study: Study, item, root: Path, prompts: str):
    from ..extract.config import ExtractConfig

    return ExtractConfig(dataset=study.dataset_ref(item.dataset), root=str(root),
                         model=item.backbone.model, pretrained=item.backbone.pretrained,
                         store=item.url,
                         cut=item.backbone.cut, quick_gelu=item.backbone.quick_gelu,
                         shots=study.shots, seeds=study.seeds,
                         prompts=prompts, **study.extract)


def _fit_configs(plan: StudyPlan) -> list:
    """One FitConfig per (store, variant) that has runs to do."""
    configs, seen = [], set()
    for run in plan.runs:
        key = (run.store, run.variant)
        if run.status != "todo" or key in seen:
            continue
        seen.add(key)
        configs.append(fit_config(plan.study, run.store, run.dataset, run.recipe, run.prompts,
                                  plan.out / "results" / run.variant, run.classifier))
    return configs


def run(study: Study | str | Path, root: str | Path, *, stores: str | None = None,
        out: str | Path = "study-out", execution: Execution = IN_PROCESS,
        progress: ProgressSink = null_progress, device: str = "cpu") -> StudyResult:
    """Run `study` (a Study, a shipped name or a file) over the data under `root`; returns what
    was done and the report's data. Missing data is refused before any work, all of it listed.
    Each extraction is one job of `execution`'s; every fit run of the study one more."""
    from ..extract.job import extract
    from ..fit.runs import fit_stores
    from .page import write_report

    study = study if isinstance(study, Study) else load_study(study)
    started = time.perf_counter()
    plan = plan_study(study, root, stores=stores, out=out, device=device)
    if plan.missing:
        raise DatasetError(f"Study {study.name}: {len(plan.missing)} dataset(s) cannot be read"
                           f" under {root}; nothing was run:\n- " + "\n- ".join(plan.missing))
    result = StudyResult(plan)
    todo_stores = [s for s in plan.stores if s.status != "present"]
    todo_runs = [r for r in plan.runs if r.status == "todo"]
    task = progress.start(f"study {study.name}", len(todo_stores) + len(todo_runs),
                          unit="steps")
    for item in todo_stores:
        for prompts in study.prompts:  # the first extracts; the others add a classifier
            progress.note(task, f"extract {item.dataset} / {item.backbone.name}")
            prompts = resolve_prompts(prompts, item.dataset, root)
            extract(_extract_config(study, item, Path(root), prompts), progress, execution)
        result.extracted.append(item.url)
        progress.advance(task, 1)
    configs = _fit_configs(plan)
    if configs:  # one job: on dask every run of every store balances across the workers
        progress.note(task, f"fit {len(configs)} store x variant(s)")
        runs = fit_stores(configs, progress, execution)
        done = sum(not r.skipped for r in runs)
        result.fitted += done
        result.skipped += len(runs) - done
        progress.advance(task, done)
    progress.finish(task)
    result.skipped += sum(r.status == "done" for r in plan.runs)
    result.report, result.pages = write_report(plan)
    result.seconds = time.perf_counter() - started
    return result
