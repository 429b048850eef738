"""One fit run: train SAFE for one (store, shots, seed), every grid configuration at once.

Training samples are the K-shot train rows' views the recipe names (recipe.py: the center crop
and its mirror by default; held in memory, float16), drawn in batches by the recipe's sampler;
validation is the min(K, 4)-shot val rows (center view), test is the whole test split, streamed
(evaluate.py). All lr x wd configurations train together (grid.py) with AdamW and the recipe's
warmup + cosine schedule, one device-resident step for all (step.py; a CUDA graph on CUDA); at
the recipe's evaluation points each configuration keeps its state if its val accuracy is
strictly better; the best states are restored and the configuration is chosen by val accuracy
(ties: the first). The loss is the fine-tuned branch's cross-entropy against the
frozen text classifier at the recipe's logit scale; validation, selection and test use the blend
`beta * original + finetuned` (blend, then normalise, as the paper writes it; `blend="each"`
normalises each branch first). The adapters (adapters.py) then run on the same features.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from .._version import __version__
from ..data.prompts import stored_prompt_set
from ..errors import RecipeError, SafeCacheError, StoreError
from ..identity import SEAL_FIELD
from ..model.inference import blend_features
from ..runtime.device import resolve_device
from ..runtime.progress import ProgressSink, null_progress
from ..runtime.threads import ThreadPolicy, thread_policy
from ..store import FeatureStore
from ..store.paths import backbone_label, extract_command
from .baselines import RunRows, check_reference_serves, needs_reference_search, run_methods
from .config import FitConfig
from .evaluate import evaluate_safe, pooled_split
from .grid import BestState, StackedHeads
from .identity import identity_sha256
from .original import original_head
from .recipe import Recipe
from .results import RunResult
from .step import GridStep
from .text import (
    check_linear_serves,
    linear_accuracies,
    pool_embeddings,
    run_text,
    stored_text,
    with_digest,
)


def _recipe_error(store: FeatureStore, recipe: Recipe, missing: str) -> RecipeError:
    command = extract_command(store.manifest, store.url)
    return RecipeError(f"{store.url} has no {missing}, which recipe {recipe.name} trains on"
                       f" (--train-views {recipe.train_views}). Add it with `{command}` (with"
                       f" the dataset's --root): extract adds what a store lacks. Or fit with"
                       f" --train-views stored. Nothing was written.")


def check_store_serves(store: FeatureStore, config: FitConfig) -> None:
    """Refuse, before anything runs, a recipe the store cannot serve (a view or the sentence
    embeddings it lacks)."""
    recipe = config.recipe
    if needs_reference_search(config):
        check_reference_serves(store)
    if "prolip" in config.methods:
        from .workbench.prolip import check_store_serves as prolip_serves

        prolip_serves(store)  # a family without a final linear projection: before SAFE trains
    if recipe.train_views in ("center+flip", "all") and not store.center_flip:
        raise _recipe_error(store, recipe, "mirrored center views (flip_dense)")
    if config.prompts == "mined":
        try:
            pool_embeddings(store)
        except StoreError as exc:
            raise RecipeError(f"{exc} (--prompts mined chooses its templates from the pool's"
                              f" sentences). Nothing was written.") from exc
    if config.classifier == "linear":
        check_linear_serves(store, config.shots, config.seeds)
    readers = [name for name in ("clap", "cross_modal_lp") if name in config.methods]
    if recipe.text_average == "raw" or readers:
        try:
            store.sentence_embeddings(stored_prompt_set(config.prompts))
        except StoreError as exc:
            needs = "--text-average raw" if recipe.text_average == "raw" else \
                f"--methods {','.join(readers)}"
            raise RecipeError(f"{exc} ({needs} needs them). Nothing was written.") from exc
    if "cross_modal_lp" in config.methods:
        from .workbench.cross_modal_lp import check_store_serves as cross_modal_serves

        cross_modal_serves(store, config.prompts, config.shots, config.seeds)


class RunData:
    """The (shots, seed) run's tensors: the recipe's train samples, and val; read once."""

    def __init__(self, store: FeatureStore, shots: int, seed: int, recipe: Recipe) -> None:
        train_rows, val_rows = (np.sort(r) for r in store.fewshot(seed, shots))
        if not train_rows.size or not val_rows.size:
            raise SafeCacheError(f"{store.url}: no readable few-shot rows for {shots} shots,"
                                 f" seed {seed}.")
        store.check_rows("train", train_rows)  # a missing chunk would read as zeros
        store.check_rows("val", val_rows)
        classes = store.manifest["dataset"]["num_classes"]
        read = {split: store.read_rows(split, "label", rows).astype(np.int64)
                for split, rows in (("train", train_rows), ("val", val_rows))}
        for split, split_labels in read.items():
            if split_labels.min() < 0 or split_labels.max() >= classes:
                raise StoreError(f"{store.url}: fewshot seed {seed} shots {shots} names {split}"
                                 f" rows whose labels are not classes 0..{classes - 1} (padding"
                                 f" or damage); run `safe-cache verify {store.url}`.")
        labels = read["train"]
        parts = []  # (dense samples, their labels), in Cross-Modal's order: centers, flips, ...
        if recipe.train_views in ("center+flip", "all"):
            if not store.center_flip:
                raise _recipe_error(store, recipe, "mirrored center views (flip_dense)")
            for name in ("dense", "flip_dense"):
                parts.append((store.read_rows("train", name, train_rows), labels))
        if recipe.train_views in ("stored", "all"):
            if store.view_count("train"):
                dense = store.read_rows("train", "aug_dense", train_rows)
                parts.append((dense.reshape(-1, *dense.shape[2:]),
                              np.repeat(labels, dense.shape[1])))
            elif recipe.train_views == "stored":  # a store without views: the center view
                parts.append((store.read_rows("train", "dense", train_rows), labels))
        self.train_dense = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        self.train_labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        self.train_rows, self.image_labels = train_rows, torch.from_numpy(labels)
        self.val_rows = val_rows
        self.val_dense = torch.from_numpy(store.read_rows("val", "dense", val_rows))
        self.val_pooled = torch.from_numpy(store.read_rows("val", "pooled", val_rows))
        self.val_labels = torch.from_numpy(read["val"])
        self.store = store


class BatchSampler:
    """Minibatch indices into the train samples, seeded. "epoch": a fresh permutation each
    epoch, cut into full batches (the last partial batch is dropped, as Cross-Modal's
    DataLoader(shuffle=True, drop_last=True) does; fewer samples than a batch give one batch of
    all of them); "replace": every batch drawn with replacement."""

    def __init__(self, samples: int, batch_size: int, mode: str, seed: int,
                 device: torch.device | str = "cpu") -> None:
        self.samples, self.batch_size, self.mode = samples, batch_size, mode
        self.size = batch_size if mode == "replace" else min(batch_size, samples)  # per batch
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.order, self.position = torch.empty(0, dtype=torch.long), 0

    def next(self) -> torch.Tensor:
        """The next batch's indices, drawn on the sampler's device (no host round trip)."""
        if self.mode == "replace":
            return torch.randint(0, self.samples, (self.batch_size,), generator=self.generator,
                                 device=self.device)
        size = self.size
        if self.position + size > len(self.order):
            self.order = torch.randperm(self.samples, generator=self.generator,
                                        device=self.device)
            self.position = 0
        batch = self.order[self.position:self.position + size]
        self.position += size
        return batch


def evaluation_points(iters: int, every: int, first: bool) -> list[int]:
    """0-based iterations after whose update val accuracy is measured: i % every == 0 from 0
    (Cross-Modal), or every `every`-th update and the last."""
    if first:
        return list(range(0, iters, every))
    return sorted({i - 1 for i in range(every, iters + 1, every)} | {iters - 1})


def train_grid(stacked: StackedHeads, data: RunData, classifier: torch.Tensor, scale: float,
               config: FitConfig, seed: int, device: torch.device,
               progress: ProgressSink, description: str, threads: ThreadPolicy | None = None,
               ) -> tuple[BestState, dict[str, list], dict[str, Any]]:
    """Train every configuration of `stacked` on the same minibatches (step.py); returns the
    best states (already restored into `stacked`), the curves (per evaluation: the number of
    updates, every configuration's val accuracy and mean training loss since the last
    evaluation) and how the step ran (`_capture`). `threads` re-measures the machine's idle
    cores as it trains (runtime/threads.py)."""
    threads = threads or ThreadPolicy(torch.get_num_threads())  # none given: fixed, as now
    recipe = config.recipe
    best = BestState(stacked.stacked)
    sampler = BatchSampler(len(data.train_labels), config.batch_size, recipe.sampling, seed,
                           device)
    # The run's samples live on the device (float16), so a step copies nothing from the host.
    step = GridStep(stacked, data.train_dense.to(device), data.train_labels.to(device),
                    classifier, scale, [lr for lr, _ in config.grid],
                    [wd for _, wd in config.grid], config.iters, recipe, sampler.size)
    execution = _capture(step, config, device)
    val_dense, val_pooled = data.val_dense.to(device), data.val_pooled.to(device)
    val_labels = data.val_labels.to(device)
    points = set(evaluation_points(config.iters, config.eval_every, recipe.eval_first))
    curves: dict[str, list] = {"iters": [], "val_acc": [], "train_loss": []}
    count = 0
    task = progress.start(description, config.iters, unit="it")
    for i in range(config.iters):
        threads.tick()
        step.step(sampler.next())
        count += 1
        if i in points:
            with torch.no_grad():
                finetuned = stacked(val_dense.float())
                blended = blend_features(val_pooled, finetuned, config.beta, config.blend)
                acc = (blended @ classifier.T).argmax(-1).eq(val_labels).float().mean(-1)
            best.update(acc, i + 1)
            curves["iters"].append(i + 1)
            curves["val_acc"].append(acc.tolist())
            curves["train_loss"].append((step.take_running() / count).tolist())
            count = 0
            progress.note(task, f"best val {100 * best.accuracy.max().item():.1f}%")
        progress.advance(task, 1)
    progress.finish(task)
    best.restore()
    return best, curves, execution


def _capture(step: GridStep, config: FitConfig, device: torch.device) -> dict[str, Any]:
    """Capture the step as a CUDA graph where it can be (CUDA, `cuda_graph` on); a capture
    torch refuses leaves the run eager, at its start, and says why in the result."""
    execution: dict[str, Any] = {"device": str(device), "graphed": False}
    if device.type != "cuda" or not config.cuda_graph:
        return execution
    try:
        step.capture()
    except torch.OutOfMemoryError:
        raise  # fit's one-line out-of-memory error, not a silent eager run
    except RuntimeError as exc:
        execution["why_eager"] = f"CUDA graph capture failed: {str(exc).splitlines()[0]:.160}"
        return execution
    execution["graphed"] = True
    return execution


def run_classifier(store: FeatureStore, prompts: str, recipe: Recipe) -> torch.Tensor:
    """The frozen text classifier of a stored prompt set, its templates averaged as the recipe
    says (the stored classifier is the normalised average); a run that mined its templates or
    fine-tuned its classifier saved its own (result_classifier)."""
    return stored_text(store, prompts, recipe).classifier


def store_block(store: FeatureStore, prompts: str, shots: int, seed: int) -> dict[str, Any]:
    """The `store` block of a run's result: where, which backbone, which sealed manifest, how
    many test rows it held, and the digests of the run's few-shot rows and prompt set (all part
    of the run's identity: a store re-extracted from another split, or a prompt file of the
    same name, is another run)."""
    return {"url": store.url, "fingerprint": store.fingerprint,
            "manifest_sha256": store.manifest[SEAL_FIELD], "store_sha256": store.content_sha256,
            "test_rows": int(store.readable_rows("test").size),
            "fewshot_sha256": store.fewshot_sha256(seed, shots),
            "prompts_sha256": store.classifier_sha256(stored_prompt_set(prompts))}


def backbone_block(card: dict[str, Any]) -> dict[str, Any]:
    """The `backbone` block of a result: the names it is reported under, and its folder."""
    return {**{k: card.get(k) for k in ("model", "pretrained", "cut", "init_seed",
                                        "weights_sha256")}, "label": backbone_label(card)}


def fit_one(store: FeatureStore, shots: int, seed: int, config: FitConfig,
            progress: ProgressSink = null_progress
            ) -> tuple[RunResult, torch.nn.Module, dict[str, torch.Tensor] | None]:
    """One run: (its result record, the chosen fine-tuned head, SAFE-A's trained cache), under
    a thread policy for a shared machine (runtime/threads.py), recorded in its result."""
    with thread_policy() as threads:
        record, head, cache = _fit_one(store, shots, seed, config, progress, threads)
    record.execution = {**(record.execution or {}), **threads.record()}
    record.identity = record.run_identity
    record.identity_sha256 = identity_sha256(record.identity)
    return record, head, cache


def _fit_one(store: FeatureStore, shots: int, seed: int, config: FitConfig,
             progress: ProgressSink, threads: ThreadPolicy
             ) -> tuple[RunResult, torch.nn.Module, dict[str, torch.Tensor] | None]:
    started = time.perf_counter()
    device = resolve_device(config.device)
    manifest, recipe = store.manifest, config.recipe
    test_rows = store.readable_rows("test") if config.partial else store.check_complete("test")
    store.check_rows("test", test_rows, ("dense", "pooled"))  # before training
    clip_scale = float(manifest["backbone"]["logit_scale"])  # zero-shot CLIP, Tip-Adapter
    scale = recipe.logit_scale or clip_scale  # SAFE's training loss
    data = RunData(store, shots, seed, recipe)
    text = run_text(store, config.prompts, config.classifier, recipe,
                    train_rows=data.train_rows, train_labels=data.image_labels,
                    val_features=data.val_pooled, val_labels=data.val_labels, scale=clip_scale,
                    seed=seed, device=device)
    classifier = text.classifier
    grid = config.grid
    stacked = StackedHeads(original_head(store).to(device), len(grid))
    loaded = time.perf_counter()
    best, curves, execution = train_grid(
        stacked, data, classifier, scale, config, seed, device, progress,
        f"{manifest['dataset']['name']} shots {shots} seed {seed}", threads)
    chosen = int(torch.argmax(best.accuracy).item())  # first of the best: ties go to larger lr
    head = stacked.config_head(chosen).eval()
    trained = time.perf_counter()
    val = (data.val_pooled.to(device), _no_grad(head, data.val_dense.to(device).float()),
           data.val_labels.to(device))
    test = pooled_split(store, "test", head, config.test_chunk, device, checked=True)
    summary = evaluate_safe(val, test, classifier, config.beta, config.betas, config.blend,
                            zero_shot=text.zero_shot)
    methods = summary.pop("methods")
    if text.initial is not None:  # Linear Fine-tuning: the tuned classifier's own accuracy
        text = replace(text, record=linear_accuracies(text, test))
    rows = RunRows(data.train_rows, data.image_labels, data.val_rows, test_rows)
    extra = run_methods(store, head, rows, {"val": val, "test": test}, text, clip_scale,
                        config, seed, device)
    methods.update(extra.results)
    predictors, cache = extra.predictors, extra.cache
    lr, wd = grid[chosen]
    methods["safe"].update({"lr": lr, "wd": wd, "beta": config.beta,
                            "best_iter": int(best.step[chosen].item())})
    ood = None
    if config.eval_ood:
        from .ood import BetaCurve, evaluate_ood, resolve_ood_stores

        stores = resolve_ood_stores(config.eval_ood, store.url, manifest["backbone"])
        curve = BetaCurve(classifier, config.betas, config.blend, config.beta)
        ood = evaluate_ood(head, predictors, stores, store.fingerprint, manifest["backbone"],
                           config.test_chunk, device, curve)
    record = RunResult(
        dataset=manifest["dataset"]["name"], shots=shots, seed=seed,
        backbone=backbone_block(manifest["backbone"]),
        store=store_block(store, config.prompts, shots, seed),
        methods=methods, beta_curve=summary["beta_curve"],
        grid=[{"lr": g[0], "wd": g[1], "val_acc": float(best.accuracy[i].item()),
               "best_iter": int(best.step[i].item())} for i, g in enumerate(grid)],
        config={**config.to_dict(), "storage_options": None},
        versions={"safe_cache": __version__, "torch": torch.__version__},
        timings={"load_s": loaded - started, "train_s": trained - loaded,
                 "evaluate_s": time.perf_counter() - trained, "methods_s": extra.seconds,
                 "train_iters_per_s": config.iters / max(trained - loaded, 1e-9)},
        train_samples=len(data.train_labels), test_images=summary["test_images"],
        norm_ratio_finetuned_over_original=summary["norm_ratio_finetuned_over_original"],
        ood=ood, recipe={**recipe.record(), "loss_logit_scale": scale}, curves=curves,
        execution=execution, partial=_partial(store, test_rows) if config.partial else None,
        text=None if text.record is None else with_digest(text.record, classifier),
    )
    if text.record is not None:  # saved beside the result (runs.py): export reads it back
        record.classifier_weights = classifier.detach().to("cpu", torch.float32)
    return record, head, cache


def _partial(store: FeatureStore, rows) -> dict[str, int] | None:
    """{rows, expected} of a test split evaluated incomplete (None when it was whole)."""
    expected = store.expected_rows("test")
    return None if expected is None or len(rows) >= expected else \
        {"rows": len(rows), "expected": int(expected)}


@torch.no_grad()
def _no_grad(head, dense: torch.Tensor) -> torch.Tensor:
    return head(dense)
