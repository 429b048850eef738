"""What a study needs, before it runs: stores to create or extend, runs to do or skip, missing
data, disk and an estimated time (`study run --dry-run` prints it; `run` checks it first).

A store is one (dataset, backbone); a run one (store, recipe x prompt-set variant, shots,
seed), written to `<out>/results/<variant>/<dataset>/<backbone>/...`. Every dataset folder is
checked up front and every problem is listed at once, so a missing split file is found in
seconds, not hours into the study.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DatasetError, SafeCacheError, SafeCacheWarning, StoreNotFoundError
from ..store.paths import backbone_label, card_model_name, store_root
from .spec import Study, StudyBackbone, resolve_prompts

BYTES_PER_VALUE = 2  # float16 maps
# Throughput the project measured (docs/performance.md), by (model, device kind); None: unknown.
MEASURED = {
    ("RN50", "cpu"): {"extract_images_per_s": 9.33, "fit_seconds_per_iteration": 0.3895},
    ("ViT-B-16", "cpu"): {"extract_images_per_s": None, "fit_seconds_per_iteration": 0.2293},
}


@dataclass
class StoreItem:
    dataset: str
    backbone: StudyBackbone
    url: str
    status: str  # "create", "extend", "present", "no data"
    test_only: bool = False  # an OOD variant: its test split only
    images: int | None = None  # rows to hold
    bytes: int | None = None  # estimated size when complete
    card: dict[str, Any] = field(default_factory=dict)  # the fields that name it (store_card)


@dataclass
class RunItem:
    dataset: str
    backbone: StudyBackbone
    recipe: str
    prompts: str
    variant: str
    shots: int
    seed: int
    path: Path
    status: str  # "todo" or "done"
    store: str = ""
    classifier: str = "text"  # "linear": fit --classifier linear


@dataclass
class StudyPlan:
    study: Study
    root: Path
    out: Path
    stores: list[StoreItem] = field(default_factory=list)
    runs: list[RunItem] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # dataset problems, all of them
    seconds: float | None = None
    estimate_note: str = ""

    @property
    def disk_bytes(self) -> int:
        """About what the stores to create or extend will hold when complete."""
        return sum(s.bytes or 0 for s in self.stores if s.status in ("create", "extend"))

    def as_json(self) -> dict[str, Any]:
        return {
            "study": self.study.name, "root": str(self.root), "out": str(self.out),
            "missing": self.missing, "disk_bytes": self.disk_bytes,
            "estimated_seconds": self.seconds, "estimate_note": self.estimate_note,
            "stores": [{"dataset": s.dataset, "backbone": s.backbone.name, "url": s.url,
                        "status": s.status, "images": s.images, "bytes": s.bytes,
                        "test_only": s.test_only} for s in self.stores],
            "runs": {"todo": sum(r.status == "todo" for r in self.runs),
                     "done": sum(r.status == "done" for r in self.runs),
                     "list": [{"dataset": r.dataset, "backbone": r.backbone.name,
                               "variant": r.variant, "shots": r.shots, "seed": r.seed,
                               "status": r.status, "path": str(r.path)} for r in self.runs]},
        }


def store_card(backbone: StudyBackbone) -> dict[str, Any]:
    """The backbone card fields that name its stores and results (store.paths.backbone_label),
    known before the model is loaded."""
    from ..identity import file_sha256

    pretrained, sha256 = backbone.pretrained, None
    if pretrained is not None and Path(pretrained).is_file():
        pretrained, sha256 = f"file:{Path(pretrained).name}", file_sha256(pretrained)
    return {"model": card_model_name(backbone.model), "pretrained": pretrained,
            "weights_sha256": sha256, "init_seed": 0, "cut": backbone.cut}


def _default(config_class, study_options: dict[str, Any], name: str) -> Any:
    """A study's extract or fit option, else the config class's own default."""
    return study_options.get(name, config_class.__dataclass_fields__[name].default)


def _shapes(backbone: StudyBackbone, cache: dict) -> tuple[int, int]:
    """(T, C) of a backbone's dense map, from its architecture (random weights, no download)."""
    if backbone not in cache:
        from ..model.backbone import load_backbone

        card = load_backbone(backbone.model, None, cut=backbone.cut).card
        cache[backbone] = (card["tokens"], card["channels"])
    return cache[backbone]


def _wanted_rows(study: Study, dataset_name: str, root: Path, test_only: bool):
    """(rows per split) the store must hold, or a problem string."""
    from ..data.datasets import open_dataset
    from ..extract.job import few_shot_subsets, wanted_entries

    try:
        dataset = open_dataset(study.dataset_ref(dataset_name), root,
                               make_split=bool(study.extract.get("make_split")))
        with warnings.catch_warnings():  # short classes: extract warns when it samples them
            warnings.simplefilter("ignore", SafeCacheWarning)
            subsets = {} if test_only else few_shot_subsets(dataset, study.shots, study.seeds)
    except DatasetError as exc:  # its first sentence; the fetch command where there is one
        first = str(exc).split(". ")[0].rstrip(".")
        hint = f"`safe-cache datasets fetch {dataset_name} --root {root}`" \
            if "datasets fetch" in str(exc) else "see `safe-cache datasets`"
        return f"{first} ({hint})"
    full_val = bool(study.extract.get("full_val")) and not test_only
    return {split: len(rows) for split, rows in
            wanted_entries(dataset, subsets, full_val).items()}


def _store_status(url: str, rows: dict[str, int], study: Study, dataset: str,
                  root: str | Path) -> str:
    from ..extract.config import ExtractConfig
    from ..store import open_store

    try:
        store = open_store(url)
    except StoreNotFoundError:
        return "create"
    except SafeCacheError:
        return "extend"
    try:
        complete = all(int(store.readable_rows(split).size) >= count
                       for split, count in rows.items())
        views = store.manifest["views"]["count"] >= _default(ExtractConfig, study.extract,
                                                               "views")
        prompts = all(_has_classifier(store, resolve_prompts(p, dataset, root))
                      for p in study.prompts)
    except SafeCacheError:
        return "extend"
    finally:
        store.close()
    return "present" if complete and views and prompts else "extend"


def _has_classifier(store, prompts: str) -> bool:
    from ..data.prompts import stored_prompt_set

    try:
        store.classifier(stored_prompt_set(prompts))
    except (SafeCacheError, KeyError):
        return False
    return True


def _run_status(path: Path, config, shots: int, seed: int) -> str:
    """"done" when the result there is whole and of the identity fit would give the run now
    (the store may have changed under it), else "todo" (fit then runs it again)."""
    from ..fit.results import ood_gaps, whole_result
    from ..fit.runs import wanted_identity
    from ..store import open_store

    try:
        existing = whole_result(path)
        if existing is None or ood_gaps(existing):  # fit runs one without them again
            return "todo"
        with contextlib.closing(open_store(config.store)) as store:
            return "done" if existing.run_identity == wanted_identity(
                config, store, shots, seed) else "todo"
    except SafeCacheError:  # malformed, or a store not there yet: fit decides, naming it
        return "todo"


def fit_config(study: Study, store: str, dataset: str, recipe: str, prompts: str,
               out: str | Path, classifier: str = "text"):
    """The FitConfig of one (store, variant) of the study: what its runs are named by (the
    plan) and run with (the runner). By name: the OOD variant stores lie beside the source
    store, where fit looks for them."""
    from ..fit.config import FitConfig
    from ..fit.recipe import PRESETS

    optional = tuple(m for m in study.methods if m not in ("zero_shot", "safe"))
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in study.fit.items()}
    eval_ood = tuple(study.ood) if dataset == "imagenet" else ()
    return FitConfig(store=store, shots=tuple(study.shots), seeds=tuple(study.seeds),
                     prompts=prompts, out=str(out), methods=optional, recipe=PRESETS[recipe],
                     eval_ood=eval_ood, classifier=classifier, **options)


def plan_study(study: Study, root: str | Path, *, stores: str | None = None,
               out: str | Path = "study-out", device: str = "cpu") -> StudyPlan:
    """Every store and run of the study with its status; touches nothing."""
    from ..extract.config import ExtractConfig
    from ..fit.runs import config_result_path

    plan = StudyPlan(study, Path(root), Path(out))
    base = store_root(stores)
    shapes: dict = {}
    views = _default(ExtractConfig, study.extract, "views") + \
        int(_default(ExtractConfig, study.extract, "center_flip")) + 1  # + the center view
    wanted = [(d, False) for d in study.datasets] + [(v, True) for v in study.ood]
    for dataset, test_only in wanted:
        rows = _wanted_rows(study, dataset, Path(root), test_only)
        if isinstance(rows, str):
            plan.missing.append(rows)
        for prompts in study.prompts:
            resolved = resolve_prompts(prompts, dataset, root)
            if resolved != prompts and not Path(resolved).is_file():
                plan.missing.append(f"{dataset}: no prompt file {resolved} (prompt set"
                                    f" {prompts} of the study)")
        for backbone in study.backbones:
            card = store_card(backbone)
            url = f"{base}/{dataset}/{backbone_label(card)}.zarr"
            item = StoreItem(dataset, backbone, url, "no data", test_only, card=card)
            if not isinstance(rows, str):
                tokens, channels = _shapes(backbone, shapes)
                per_row = tokens * channels * BYTES_PER_VALUE
                item.images = sum(rows.values())
                item.bytes = per_row * (rows.get("test", 0) + rows.get("val", 0)
                                        + views * rows.get("train", 0))
                item.status = _store_status(url, rows, study, dataset, root)
            plan.stores.append(item)
    for item in plan.stores:
        if item.test_only:
            continue
        for recipe, prompts, classifier in study.variants:
            variant = study.variant_name(recipe, prompts, classifier)
            resolved = resolve_prompts(prompts, item.dataset, root)
            config = fit_config(study, item.url, item.dataset, recipe, resolved,
                                plan.out / "results" / variant, classifier)
            manifest = {"dataset": {"name": item.dataset}, "backbone": item.card}
            for shots in study.shots:
                for seed in study.seeds:
                    path = config_result_path(config, manifest, shots, seed)
                    plan.runs.append(RunItem(item.dataset, item.backbone, recipe, resolved,
                                             variant, shots, seed, path,
                                             _run_status(path, config, shots, seed), item.url,
                                             classifier))
    plan.seconds, plan.estimate_note = _estimate(plan, device)
    return plan


def _estimate(plan: StudyPlan, device: str) -> tuple[float | None, str]:
    """Seconds from the throughput the project measured, or None with the reason."""
    from ..fit.config import FitConfig

    kind = "cuda" if device.startswith("cuda") else "cpu"
    iters = _default(FitConfig, plan.study.fit, "iters")
    seconds, unknown = 0.0, set()
    for item in plan.stores:
        if item.status in ("create", "extend") and item.images:
            rate = MEASURED.get((item.backbone.model, kind), {}).get("extract_images_per_s")
            if rate is None:
                unknown.add(f"extract {item.backbone.model}")
            else:
                seconds += item.images / rate
    for run in plan.runs:
        if run.status == "todo":
            per = MEASURED.get((run.backbone.model, kind), {}).get("fit_seconds_per_iteration")
            if per is None:
                unknown.add(f"fit {run.backbone.model}")
            else:
                seconds += per * iters
    if unknown:
        return None, (f"no measured throughput on {kind} for {', '.join(sorted(unknown))}"
                      f" (docs/performance.md)")
    return seconds, f"from the throughput measured on {kind} (docs/performance.md)" + \
        _not_estimated(plan)


def _not_estimated(plan: StudyPlan) -> str:
    """What the estimate leaves out: work of the runs to do besides extract and SAFE's grid."""
    from ..fit.methods import WORKBENCH_METHODS

    todo = [run for run in plan.runs if run.status == "todo"]
    left = []
    if any(run.classifier == "linear" for run in todo):
        left.append("the classifier's Linear Fine-tuning")
    if todo and set(WORKBENCH_METHODS) & set(plan.study.methods):
        left.append("the workbench methods")
    return f"; not counted: {' and '.join(left)}" if left else ""
