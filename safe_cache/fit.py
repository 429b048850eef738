"""Stage 2: train SAFE from a store, the paper's protocol, every grid configuration at once.

For each (shots, seed): training samples are the stored augmented views of the K-shot train
rows (held in memory, float16), validation is the min(K, 4)-shot val rows (center view), test
is the whole test split, streamed. All lr x wd configurations train together (grid.py) with
AdamW + cosine; every `eval_every` iterations each configuration keeps its state if its val
accuracy is strictly better; the best states are restored and the configuration is chosen by
val accuracy. The loss is the fine-tuned branch's cross-entropy against the text classifier;
validation, selection and test use the blend `beta * original + finetuned` (blend, then
normalise, as the paper writes it; `blend="each"` normalises each branch first).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from . import __version__
from .adapters import accuracy
from .backbone import original_head
from .cluster import JobProgress, WorkerProgress, connect, gather_as_completed
from .errors import SafeCacheError
from .extract import resolve_device, weights_label
from .grid import BestState, StackedHeads, grid_optimizer
from .progress import ProgressSink, null_progress
from .runtime import tune_cpu_allocator
from .store import FeatureStore, absolute_url, open_store

DEFAULT_BETAS = tuple(round(0.1 * i, 1) for i in range(11))
ALL_METHODS = ("tip_adapter", "tip_adapter_f", "safe_a", "linear_probe")


@dataclass(frozen=True)
class FitConfig:
    store: str
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: tuple[int, ...] = (1, 2, 3)
    lrs: tuple[float, ...] = (1e-4, 1e-5, 1e-6, 1e-7)
    wds: tuple[float, ...] = (0.0, 1e-3, 1e-5)
    iters: int = 12_800
    batch_size: int = 8
    eval_every: int = 100
    beta: float = 0.5
    betas: tuple[float, ...] = DEFAULT_BETAS
    blend: str = "blend"  # or "each": normalise each branch, then blend
    prompts: str = "hand"
    device: str = "auto"
    out: str = "results"
    force: bool = False
    test_chunk: int = 256
    methods: tuple[str, ...] = ALL_METHODS  # besides zero-shot and SAFE, which always run
    tip_epochs: int | None = None  # Tip-Adapter-F / SAFE-A epochs (None: 20, EuroSAT 100)
    eval_ood: tuple[str, ...] = ()  # ImageNet variants (names or store URLs) to test on
    storage_options: dict | None = None
    cache: str | None = None  # a local folder keeping the feature chunks read from the store
    scheduler: str | None = None  # a dask scheduler's address: runs go to its workers
    local_workers: int = 0  # or a LocalCluster of this many worker processes


def blend_features(original: torch.Tensor, finetuned: torch.Tensor, beta: float,
                   mode: str = "blend") -> torch.Tensor:
    """SAFE's inference feature, L2-normalised: normalise(beta * original + finetuned)."""
    if mode == "each":
        original, finetuned = F.normalize(original, dim=-1), F.normalize(finetuned, dim=-1)
    return F.normalize(beta * original + finetuned, dim=-1)


def result_path(out: str, card: dict[str, Any], shots: int, seed: int) -> Path:
    backbone = f"{card['backbone']['model']}-{weights_label(card['backbone'])}"
    return Path(out) / card["dataset"]["name"] / backbone / f"shots{shots}_seed{seed}.json"


def fit(config: FitConfig, progress: ProgressSink = null_progress,
        client: Any = None) -> list[dict[str, Any]]:
    """Every requested (shots, seed); an existing result is kept unless `force`."""
    return fit_stores([config], progress, client)


def fit_stores(configs: list[FitConfig], progress: ProgressSink = null_progress,
               client: Any = None) -> list[dict[str, Any]]:
    """Every (store, shots, seed) of `configs` (one per store), in this process or, with a dask
    `client` (or the first config's `scheduler` / `local_workers`), one task per run on the
    cluster's workers, which write their results into the shared `out` folder."""
    tune_cpu_allocator()
    stores = [_open_for_fit(config) for config in configs]  # each opened once
    results: dict[tuple[int, int, int], dict[str, Any]] = {}
    todo: list[tuple[int, int, int]] = []  # (config index, shots, seed) still to run
    owners: dict[Path, str] = {}
    for index, (config, store) in enumerate(zip(configs, stores, strict=True)):
        for shots in config.shots:
            for seed in config.seeds:
                path = result_path(config.out, store.card, shots, seed)
                if owners.setdefault(path, config.store) != config.store:
                    raise SafeCacheError(f"{config.store} and {owners[path]} hold the same dataset"
                                         f" and backbone: their results would overwrite each"
                                         f" other in {path.parent}. Fit them with different"
                                         f" --out folders.")
                if path.is_file() and not config.force:
                    results[index, shots, seed] = {**json.loads(path.read_text()), "skipped": True}
                else:
                    todo.append((index, shots, seed))
    first = configs[0]
    with connect(first.scheduler, first.local_workers) if client is None \
            else contextlib.nullcontext(client) as client:
        if client is None:
            for index, shots, seed in todo:
                results[index, shots, seed] = fit_and_save(stores[index], shots, seed,
                                                           configs[index], progress)
        else:
            results.update(_fit_on_cluster(client, configs, todo, progress))
    return [results[key] for key in sorted(results)]


def _open_for_fit(config: FitConfig) -> FeatureStore:
    return open_store(config.store, storage_options=config.storage_options, cache=config.cache)


def fit_and_save(store: FeatureStore, shots: int, seed: int, config: FitConfig,
                 progress: ProgressSink = null_progress) -> dict[str, Any]:
    """One run, written as <out>/<dataset>/<backbone>/shots<K>_seed<S>.json (+ the head's and
    SAFE-A's safetensors); the JSON last, so a result that exists is whole."""
    result, head = fit_one(store, shots, seed, config, progress)
    path = result_path(config.out, store.card, shots, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
              str(path.with_suffix(".safetensors")),
              metadata={"store_fingerprint": store.fingerprint, "beta": str(config.beta)})
    cache = result["methods"].get("safe_a", {}).pop("_cache", None)
    if cache is not None:  # SAFE-A's trained cache, for export
        save_file({k: v.contiguous() for k, v in cache.items()},
                  str(path.with_suffix(".safe_a.safetensors")))
    temporary = path.with_suffix(".json.part")
    temporary.write_text(json.dumps(result, indent=2))
    temporary.replace(path)
    return result


def fit_task(config: FitConfig, shots: int, seed: int, progress_job: str,
             part: str) -> dict[str, Any]:
    """Run on a dask worker: one (shots, seed) run of one store, saved into `config.out`."""
    tune_cpu_allocator()
    return fit_and_save(_open_for_fit(config), shots, seed, config,
                        WorkerProgress(progress_job, part))


def _fit_on_cluster(client: Any, configs: list[FitConfig], todo: list[tuple[int, int, int]],
                    progress: ProgressSink) -> dict[tuple[int, int, int], dict[str, Any]]:
    """One task per (config index, shots, seed) of `todo`; returns the results by that key."""
    # Workers may run in another working directory: send absolute local paths.
    remote = [replace(c, store=absolute_url(c.store), out=os.path.abspath(c.out),
                      cache=c.cache and os.path.abspath(c.cache)) for c in configs]
    out = {}
    total = sum(configs[index].iters for index, _, _ in todo)
    with JobProgress(client, progress, f"fit: {len(todo)} runs", total) as bar:
        futures = {(index, shots, seed): client.submit(
            fit_task, remote[index], shots, seed, bar.job, f"{index}/{shots}/{seed}",
            key=f"safe-cache-fit-{bar.job}-{index}-{shots}-{seed}", pure=False)
            for index, shots, seed in todo}
        for key, result in gather_as_completed(client, futures, "A fit run"):
            bar.update("/".join(map(str, key)), configs[key[0]].iters)
            out[key] = result
    return out


class _Data:
    """The (shots, seed) run's tensors: train samples (all views), val, and test streaming."""

    def __init__(self, store: FeatureStore, shots: int, seed: int) -> None:
        train_rows, val_rows = (np.sort(r) for r in store.fewshot(seed, shots))
        if not train_rows.size or not val_rows.size:
            raise SafeCacheError(f"{store.url}: no readable few-shot rows for {shots} shots,"
                                 f" seed {seed}.")
        train, val = store.arrays("train"), store.arrays("val")
        if "aug_dense" in train and train["aug_dense"].shape[1]:
            dense = train["aug_dense"].get_orthogonal_selection((train_rows,))
            views = dense.shape[1]
            self.train_dense = torch.from_numpy(dense.reshape(-1, *dense.shape[2:]))
        else:
            views = 1
            self.train_dense = torch.from_numpy(train["dense"].get_orthogonal_selection(
                (train_rows,)))
        labels = train["label"].get_orthogonal_selection((train_rows,)).astype(np.int64)
        self.train_rows, self.image_labels = train_rows, torch.from_numpy(labels)
        self.train_labels = torch.from_numpy(np.repeat(labels, views))
        self.val_dense = torch.from_numpy(val["dense"].get_orthogonal_selection((val_rows,)))
        self.val_pooled = torch.from_numpy(val["pooled"].get_orthogonal_selection((val_rows,)))
        self.val_labels = torch.from_numpy(
            val["label"].get_orthogonal_selection((val_rows,)).astype(np.int64))
        self.store = store


def fit_one(store: FeatureStore, shots: int, seed: int, config: FitConfig,
            progress: ProgressSink = null_progress) -> tuple[dict[str, Any], torch.nn.Module]:
    started = time.perf_counter()
    device = resolve_device(config.device)
    card = store.card
    scale = float(card["backbone"]["logit_scale"])
    classifier = torch.from_numpy(store.classifier(config.prompts)).float().to(device)
    data = _Data(store, shots, seed)
    template = original_head(store).to(device)
    grid = [(lr, wd) for lr in config.lrs for wd in config.wds]
    stacked = StackedHeads(template, len(grid))
    optimizer, scheduler = grid_optimizer(stacked, [g[0] for g in grid], [g[1] for g in grid],
                                          config.iters)
    best = BestState(stacked.stacked)
    generator = torch.Generator().manual_seed(seed)
    loaded = time.perf_counter()
    val_dense, val_pooled = data.val_dense.to(device), data.val_pooled.to(device)
    val_labels = data.val_labels.to(device)
    task = progress.start(f"{card['dataset']['name']} shots {shots} seed {seed}", config.iters)
    for step in range(1, config.iters + 1):
        pick = torch.randint(0, len(data.train_labels), (config.batch_size,), generator=generator)
        x = data.train_dense[pick].to(device).float()
        y = data.train_labels[pick].to(device)
        logits = scale * F.normalize(stacked(x), dim=-1) @ classifier.T  # (G, B, classes)
        loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(grid))) * len(grid)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % config.eval_every == 0 or step == config.iters:
            with torch.no_grad():
                finetuned = stacked(val_dense.float())
                blended = blend_features(val_pooled, finetuned, config.beta, config.blend)
                acc = (blended @ classifier.T).argmax(-1).eq(val_labels).float().mean(-1)
            best.update(acc, step)
            progress.note(task, f"best val {100 * best.accuracy.max().item():.1f}%")
        progress.advance(task, 1)
    progress.finish(task)
    best.restore()
    chosen = int(torch.argmax(best.accuracy).item())  # first of the best: ties go to larger lr
    head = stacked.config_head(chosen).eval()
    trained = time.perf_counter()
    result, features = _evaluate(store, head, data, classifier, config, device)
    result["methods"].update(_adapters(store, head, data, features, classifier, scale, config,
                                       shots, seed, device))
    lr, wd = grid[chosen]
    result["methods"]["safe"].update({"lr": lr, "wd": wd, "beta": config.beta,
                                      "best_iter": int(best.step[chosen].item())})
    result["grid"] = [{"lr": g[0], "wd": g[1], "val_acc": float(best.accuracy[i].item()),
                       "best_iter": int(best.step[i].item())} for i, g in enumerate(grid)]
    if config.eval_ood:
        from .ood import evaluate_ood, resolve_ood_stores

        stores = resolve_ood_stores(config.eval_ood, store.url, card["backbone"])
        result["ood"] = evaluate_ood(
            head, classifier, scale, lambda o, t: blend_features(o, t, config.beta, config.blend),
            stores, store.fingerprint, card["backbone"], config.test_chunk, device)
    result.update({
        "dataset": card["dataset"]["name"], "shots": shots, "seed": seed,
        "backbone": {k: card["backbone"][k] for k in ("model", "pretrained", "cut")},
        "store": {"url": store.url, "fingerprint": store.fingerprint},
        "config": {**asdict(config), "storage_options": None},
        "versions": {"safe_cache": __version__, "torch": torch.__version__},
        "timings": {"load_s": loaded - started, "train_s": trained - loaded,
                    "evaluate_s": time.perf_counter() - trained,
                    "train_iters_per_s": config.iters / max(trained - loaded, 1e-9)},
        "train_samples": len(data.train_labels),
    })
    return result, head


@torch.no_grad()
def _evaluate(store, head, data: _Data, classifier, config: FitConfig, device) -> dict:
    """Zero-shot, SAFE at beta, and the beta curve on val and the streamed test split."""
    val_original = data.val_pooled.to(device)
    val_finetuned = head(data.val_dense.to(device).float())
    val_labels = data.val_labels.to(device)
    test = store.arrays("test")
    rows = store.readable_rows("test")
    originals, finetuned, labels = [], [], []
    for start in range(0, len(rows), config.test_chunk):
        chunk = rows[start:start + config.test_chunk]
        dense = torch.from_numpy(test["dense"].get_orthogonal_selection((chunk,)))
        finetuned.append(head(dense.to(device).float()))
        originals.append(torch.from_numpy(test["pooled"].get_orthogonal_selection((chunk,))))
        labels.append(torch.from_numpy(test["label"].get_orthogonal_selection((chunk,))))
    test_original = torch.cat(originals).to(device)
    test_finetuned = torch.cat(finetuned)
    test_labels = torch.cat(labels).long().to(device)

    def acc(original, tuned, labels, beta):
        return accuracy(blend_features(original, tuned, beta, config.blend) @ classifier.T,
                        labels)

    curve = [{"beta": beta,
              "val_acc": acc(val_original, val_finetuned, val_labels, beta),
              "test_acc": acc(test_original, test_finetuned, test_labels, beta)}
             for beta in config.betas]
    ratio = (test_finetuned.norm(dim=-1) / test_original.norm(dim=-1)).mean().item()
    features = {"val": (val_original, val_finetuned, val_labels),
                "test": (test_original, test_finetuned, test_labels)}
    return {
        "methods": {
            "zero_shot": {
                "val_acc": accuracy(val_original @ classifier.T, val_labels),
                "test_acc": accuracy(test_original @ classifier.T, test_labels),
            },
            "safe": {"val_acc": acc(val_original, val_finetuned, val_labels, config.beta),
                     "test_acc": acc(test_original, test_finetuned, test_labels, config.beta)},
        },
        "beta_curve": curve,
        "norm_ratio_finetuned_over_original": ratio,
        "test_images": len(rows),
    }, features


@torch.no_grad()
def _train_views(store: FeatureStore, head, data: _Data, config, device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per train image and view: original pooled and SAFE blended features; center pooled."""
    train_rows, train = data.train_rows, store.arrays("train")  # rows and labels: read once
    labels = data.image_labels.to(device)
    center = torch.from_numpy(train["pooled"].get_orthogonal_selection((train_rows,))).to(device)
    if "aug_pooled" in train and train["aug_pooled"].shape[1]:
        original = torch.from_numpy(train["aug_pooled"].get_orthogonal_selection((train_rows,)))
    else:
        original = center.cpu()[:, None]
    original = original.to(device)
    tuned = torch.cat([head(data.train_dense[i:i + 256].to(device).float())
                       for i in range(0, len(data.train_dense), 256)])
    tuned = tuned.reshape(original.shape)
    blended = blend_features(original, tuned, config.beta, config.blend)
    return original, blended, center, labels


def _adapters(store, head, data, features, classifier, scale, config, shots, seed,
              device) -> dict[str, Any]:
    """Tip-Adapter, Tip-Adapter-F, SAFE-A and the linear probe on this run's features."""
    from . import adapters

    if not config.methods:
        return {}
    card = store.card
    tip = {**adapters.DEFAULT_TIP, **(card["dataset"].get("tip_adapter") or {})}
    epochs = config.tip_epochs or (100 if card["dataset"]["name"] == "eurosat" else 20)
    original, blended, center, labels = _train_views(store, head, data, config, device)
    split = {name: (adapters.Split(F.normalize(o, dim=-1), y),
                    adapters.Split(blend_features(o, t, config.beta, config.blend), y))
             for name, (o, t, y) in features.items()}
    out: dict[str, Any] = {}
    if "tip_adapter" in config.methods:
        out["tip_adapter"] = adapters.tip_adapter(original, labels, split["val"][0],
                                                  split["test"][0], classifier, scale, tip)
    if "tip_adapter_f" in config.methods:
        out["tip_adapter_f"] = adapters.tip_adapter_f(original, labels, split["val"][0],
                                                      split["test"][0], classifier, scale, tip,
                                                      epochs=epochs, seed=seed)
    if "safe_a" in config.methods:
        out["safe_a"], (keys, values) = adapters.tip_adapter_f(
            blended, labels, split["val"][1], split["test"][1], classifier, scale, tip,
            epochs=epochs, seed=seed, return_cache=True)
        out["safe_a"]["_cache"] = {"keys": keys.detach().cpu(), "values": values.cpu()}
    if "linear_probe" in config.methods:
        train = adapters.Split(F.normalize(center, dim=-1), labels)
        out["linear_probe"] = adapters.linear_probe(train, split["val"][0], split["test"][0],
                                                    classifier.shape[0])
    return out
