"""One fit run: train SAFE for one (store, shots, seed), every grid configuration at once.

Training samples are the stored augmented views of the K-shot train rows (held in memory,
float16), validation is the min(K, 4)-shot val rows (center view), test is the whole test split,
streamed (evaluate.py). All lr x wd configurations train together (grid.py) with AdamW + cosine;
every `eval_every` iterations each configuration keeps its state if its val accuracy is strictly
better; the best states are restored and the configuration is chosen by val accuracy. The loss is
the fine-tuned branch's cross-entropy against the text classifier; validation, selection and test
use the blend `beta * original + finetuned` (blend, then normalise, as the paper writes it;
`blend="each"` normalises each branch first). The adapters (adapters.py) then run on the same
features.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._version import __version__
from ..data.datasets import load_spec
from ..errors import DatasetError, SafeCacheError
from ..model.backbone import head_from_config
from ..model.heads import GridHead
from ..model.inference import blend_features
from ..runtime.device import resolve_device
from ..runtime.progress import ProgressSink, null_progress
from ..store import FeatureStore
from . import adapters
from .config import FitConfig
from .evaluate import evaluate_safe, pooled_split
from .grid import BestState, StackedHeads, grid_optimizer
from .results import RunResult


def original_head(store: FeatureStore) -> GridHead:
    """The original pooling head (AttnPool_O), rebuilt from the weights the store keeps in
    `head/`: fitting needs the store alone, not the backbone's weights file."""
    state, model_config = store.head_state()
    head = head_from_config(model_config, store.manifest["backbone"])
    head.load_state_dict({name: torch.from_numpy(values) for name, values in state.items()})
    return head


class RunData:
    """The (shots, seed) run's tensors: train samples (all views) and val, read once."""

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


def train_grid(stacked: StackedHeads, data: RunData, classifier: torch.Tensor, scale: float,
               config: FitConfig, seed: int, device: torch.device,
               progress: ProgressSink, description: str) -> BestState:
    """Train every configuration of `stacked` on the same minibatches; returns the best states
    (already restored into `stacked`)."""
    grid = len(config.lrs) * len(config.wds)
    optimizer, scheduler = grid_optimizer(
        stacked, [lr for lr in config.lrs for _ in config.wds],
        [wd for _ in config.lrs for wd in config.wds], config.iters)
    best = BestState(stacked.stacked)
    generator = torch.Generator().manual_seed(seed)
    val_dense, val_pooled = data.val_dense.to(device), data.val_pooled.to(device)
    val_labels = data.val_labels.to(device)
    task = progress.start(description, config.iters)
    for step in range(1, config.iters + 1):
        pick = torch.randint(0, len(data.train_labels), (config.batch_size,), generator=generator)
        x = data.train_dense[pick].to(device).float()
        y = data.train_labels[pick].to(device)
        logits = scale * F.normalize(stacked(x), dim=-1) @ classifier.T  # (G, B, classes)
        loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(grid)) * grid
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
    return best


def fit_one(store: FeatureStore, shots: int, seed: int, config: FitConfig,
            progress: ProgressSink = null_progress
            ) -> tuple[RunResult, torch.nn.Module, dict[str, torch.Tensor] | None]:
    """One run: (its result record, the chosen fine-tuned head, SAFE-A's trained cache)."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    manifest = store.manifest
    scale = float(manifest["backbone"]["logit_scale"])
    classifier = torch.from_numpy(store.classifier(config.prompts)).float().to(device)
    data = RunData(store, shots, seed)
    grid = [(lr, wd) for lr in config.lrs for wd in config.wds]
    stacked = StackedHeads(original_head(store).to(device), len(grid))
    loaded = time.perf_counter()
    best = train_grid(stacked, data, classifier, scale, config, seed, device, progress,
                      f"{manifest['dataset']['name']} shots {shots} seed {seed}")
    chosen = int(torch.argmax(best.accuracy).item())  # first of the best: ties go to larger lr
    head = stacked.config_head(chosen).eval()
    trained = time.perf_counter()
    val = (data.val_pooled.to(device), _no_grad(head, data.val_dense.to(device).float()),
           data.val_labels.to(device))
    test = pooled_split(store, "test", head, config.test_chunk, device)
    summary = evaluate_safe(val, test, classifier, config.beta, config.betas, config.blend)
    methods = summary.pop("methods")
    extra, cache = _adapters(store, head, data, {"val": val, "test": test}, classifier, scale,
                             config, seed, device)
    methods.update(extra)
    lr, wd = grid[chosen]
    methods["safe"].update({"lr": lr, "wd": wd, "beta": config.beta,
                            "best_iter": int(best.step[chosen].item())})
    ood = None
    if config.eval_ood:
        from .ood import evaluate_ood, resolve_ood_stores

        stores = resolve_ood_stores(config.eval_ood, store.url, manifest["backbone"])
        ood = evaluate_ood(
            head, classifier, scale, lambda o, t: blend_features(o, t, config.beta, config.blend),
            stores, store.fingerprint, manifest["backbone"], config.test_chunk, device)
    record = RunResult(
        dataset=manifest["dataset"]["name"], shots=shots, seed=seed,
        backbone={k: manifest["backbone"][k] for k in ("model", "pretrained", "cut")},
        store={"url": store.url, "fingerprint": store.fingerprint},
        methods=methods, beta_curve=summary["beta_curve"],
        grid=[{"lr": g[0], "wd": g[1], "val_acc": float(best.accuracy[i].item()),
               "best_iter": int(best.step[i].item())} for i, g in enumerate(grid)],
        config={**asdict(config), "storage_options": None},
        versions={"safe_cache": __version__, "torch": torch.__version__},
        timings={"load_s": loaded - started, "train_s": trained - loaded,
                 "evaluate_s": time.perf_counter() - trained,
                 "train_iters_per_s": config.iters / max(trained - loaded, 1e-9)},
        train_samples=len(data.train_labels), test_images=summary["test_images"],
        norm_ratio_finetuned_over_original=summary["norm_ratio_finetuned_over_original"],
        ood=ood,
    )
    return record, head, cache


@torch.no_grad()
def _no_grad(head, dense: torch.Tensor) -> torch.Tensor:
    return head(dense)


def tip_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """Tip-Adapter's settings for the store's dataset (search ranges, init, epochs): its spec's,
    as the store recorded them. A store written before specs carried `epochs` takes them from
    the shipped spec of the same name."""
    recorded = manifest["dataset"].get("tip_adapter") or {}
    tip = {**adapters.DEFAULT_TIP, **recorded}
    if "epochs" not in recorded:
        with contextlib.suppress(DatasetError):  # a user dataset without a shipped spec
            tip["epochs"] = load_spec(manifest["dataset"]["name"]).tip_adapter.get(
                "epochs", tip["epochs"])
    return tip


@torch.no_grad()
def _train_views(store: FeatureStore, head, data: RunData, config: FitConfig, device
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


def _adapters(store, head, data: RunData, features, classifier, scale, config: FitConfig,
              seed: int, device) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Tip-Adapter, Tip-Adapter-F, SAFE-A and the linear probe on this run's features; returns
    their results and SAFE-A's trained cache (keys, values) for export."""
    if not config.methods:
        return {}, None
    tip = tip_settings(store.manifest)
    epochs = config.tip_epochs or tip["epochs"]
    original, blended, center, labels = _train_views(store, head, data, config, device)
    split = {name: (adapters.Split(F.normalize(o, dim=-1), y),
                    adapters.Split(blend_features(o, t, config.beta, config.blend), y))
             for name, (o, t, y) in features.items()}
    out: dict[str, Any] = {}
    cache = None
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
        cache = {"keys": keys.detach().cpu(), "values": values.cpu()}
    if "linear_probe" in config.methods:
        train = adapters.Split(F.normalize(center, dim=-1), labels)
        out["linear_probe"] = adapters.linear_probe(train, split["val"][0], split["test"][0],
                                                    classifier.shape[0])
    return out, cache
