"""The methods that run on pooled features: zero-shot, Tip-Adapter(-F), SAFE-A, linear probe.

Tip-Adapter (Zhang et al.) adds a cache model to zero-shot CLIP (its logits: model/inference.py),
whose keys K are the few-shot train features averaged over augmented views and normalised, and
whose values V are their one-hot labels. alpha and gamma are
searched on the validation set over the per-dataset grid; Tip-Adapter-F also trains the keys,
choosing its epoch on validation (the reference implementation chose it on test). SAFE-A is
Tip-Adapter-F whose keys and queries are SAFE's blended features. Everything here takes
features, not images: no trunk is ever needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.inference import tip_logits
from .evaluate import accuracy

# Tip-Adapter's defaults; a dataset spec's `tip_adapter` block overrides them (EuroSAT: 100
# epochs, as Tip-Adapter's configs have it).
DEFAULT_TIP = {"search_scale": [7, 3], "search_step": [200, 20], "init_alpha": 1.17,
               "init_gamma": 1.0, "epochs": 20}


@dataclass
class Split:
    """Normalised query features and labels of one evaluation split."""

    features: torch.Tensor  # (N, D), L2-normalised
    labels: torch.Tensor  # (N,)


def search_grid(search_scale, search_step) -> tuple[list[float], list[float]]:
    """(gammas, alphas): value_i = 0.1 + i * (scale - 0.1) / steps, i < steps."""
    gammas = [0.1 + i * (search_scale[0] - 0.1) / search_step[0] for i in range(search_step[0])]
    alphas = [0.1 + i * (search_scale[1] - 0.1) / search_step[1] for i in range(search_step[1])]
    return gammas, alphas


def search_alpha_gamma(val: Split, classifier, keys, values, scale: float,
                       tip: dict) -> tuple[float, float, float]:
    """The (alpha, gamma) with the best val accuracy (first strictly best, gamma outer).

    Every alpha of one gamma is scored in one batched op: the logits are the same elementwise
    sums as Tip-Adapter's loop (clip + alpha * cache, each rounded as there) and the accuracy the
    same float32 mean, so the choice is theirs exactly (tests/test_adapters.py runs their loop);
    one `accuracy` call per (alpha, gamma) cost 4,000 small ops per search (measured: a tiny
    store's search went from 0.12 s to 0.01 s)."""
    gammas, alphas = search_grid(tip["search_scale"], tip["search_step"])
    clip_logits = scale * val.features @ classifier.T
    affinity = val.features @ keys.T
    alpha_values = torch.tensor(alphas, dtype=clip_logits.dtype)
    block = max(1, _SEARCH_ELEMENTS // max(1, clip_logits.numel()))  # alphas per batched op
    best = (-1.0, tip["init_alpha"], tip["init_gamma"])
    for gamma in gammas:
        cache = torch.exp(-gamma * (1 - affinity)) @ values
        for start in range(0, len(alphas), block):
            scaled = alpha_values[start:start + block, None, None] * cache
            correct = (clip_logits + scaled).argmax(-1).eq(val.labels).float().mean(-1)
            top = int(correct.argmax())  # the first of the block's best
            acc = correct[top].item()
            if acc > best[0]:
                best = (acc, alphas[start + top], gamma)
    return best[1], best[2], best[0]


_SEARCH_ELEMENTS = 1 << 24  # logits elements per batched op of the search (64 MB of float32)


def cache_model(train_features: torch.Tensor, train_labels: torch.Tensor,
                classes: int, keys_average: str = "normalised"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys: per image, the normalised mean of its (normalised) view features; values: one-hot.
    `keys_average="raw"` averages the raw view features before normalising, as Tip-Adapter's
    code does (build_cache_model: the encoder's unnormalised features, mean over the augment
    epochs, then normalised): fit's --protocol reference."""
    if keys_average not in ("normalised", "raw"):
        raise ValueError(f"keys_average must be 'normalised' or 'raw', not {keys_average!r}")
    views = F.normalize(train_features, dim=-1) if keys_average == "normalised" \
        else train_features
    keys = F.normalize(views.mean(dim=1), dim=-1)
    return keys, F.one_hot(train_labels, classes).float()


def tip_adapter(train_features, train_labels, val: Split, test: Split, classifier,
                scale: float, tip: dict, keys_average: str = "normalised", *,
                return_cache: bool = False):
    """Training-free Tip-Adapter: cache from the train views, alpha/gamma searched on val.
    `return_cache`: also the cache (keys, values) the test accuracy was made with, so the OOD
    evaluation can apply the same model to other stores (baselines._tip_predictor)."""
    keys, values = cache_model(train_features, train_labels, classifier.shape[0], keys_average)
    alpha, gamma, val_acc = search_alpha_gamma(val, classifier, keys, values, scale, tip)
    test_acc = accuracy(tip_logits(test.features, classifier, keys, values, alpha, gamma, scale),
                        test.labels)
    summary = {"val_acc": val_acc, "test_acc": test_acc, "alpha": alpha, "gamma": gamma}
    return (summary, (keys, values)) if return_cache else summary


def tip_adapter_f(train_features, train_labels, val: Split, test: Split, classifier,
                  scale: float, tip: dict, *, epochs: int = 20, lr: float = 1e-3,
                  batch_size: int = 256, seed: int = 1, return_cache: bool = False,
                  select_on: str = "val", keys_average: str = "normalised"):
    """Tip-Adapter-F: train the keys (AdamW lr 1e-3, eps 1e-4, wd 0.01, cosine), one epoch per
    augmented view in turn; the epoch is chosen on val (`select_on="test"` reproduces the
    reference code, which chose it on test: such numbers are labelled test-selected); then
    alpha/gamma are searched on val."""
    if select_on not in ("val", "test"):
        raise ValueError(f"select_on must be 'val' or 'test', not {select_on!r}")
    selection = val if select_on == "val" else test
    images, views, _ = train_features.shape
    keys, values = cache_model(train_features, train_labels, classifier.shape[0], keys_average)
    keys = torch.nn.Parameter(keys.clone())
    optimizer = torch.optim.AdamW([keys], lr=lr, eps=1e-4, weight_decay=0.01)
    steps = epochs * math.ceil(images / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    alpha, gamma = tip["init_alpha"], tip["init_gamma"]
    best_acc, best_keys, best_epoch = -1.0, keys.detach().clone(), 0
    for epoch in range(epochs):
        features = F.normalize(train_features[:, epoch % views], dim=-1)  # a fresh view
        order = torch.randperm(images, generator=generator)
        for start in range(0, images, batch_size):
            batch = order[start:start + batch_size]
            logits = tip_logits(features[batch], classifier, keys, values, alpha, gamma, scale)
            loss = F.cross_entropy(logits, train_labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        with torch.no_grad():
            acc = accuracy(tip_logits(selection.features, classifier, keys, values, alpha,
                                      gamma, scale), selection.labels)
        if acc > best_acc:
            best_acc, best_keys, best_epoch = acc, keys.detach().clone(), epoch + 1
    with torch.no_grad():
        alpha, gamma, val_acc = search_alpha_gamma(val, classifier, best_keys, values, scale, tip)
        test_acc = accuracy(tip_logits(test.features, classifier, best_keys, values, alpha,
                                       gamma, scale), test.labels)
    summary = {"val_acc": val_acc, "test_acc": test_acc, "alpha": alpha, "gamma": gamma,
               "best_epoch": best_epoch, "epochs": epochs, "selected_on": select_on}
    return (summary, (best_keys, values)) if return_cache else summary


def linear_probe(train: Split, val: Split, test: Split, classes: int,
                 cs: tuple[float, ...] = tuple(10.0 ** k for k in range(-3, 7)),
                 return_weight: bool = False):
    """Multinomial logistic regression on features (L-BFGS, L2 penalty 1/(C n)); C on val.
    `return_weight`: also the chosen (D + 1, classes) weight, bias last."""
    best: dict = {"val_acc": -1.0}
    for c in cs:
        weight = _logistic_regression(train.features, train.labels, classes, c)
        acc = accuracy(val.features @ weight[:-1] + weight[-1], val.labels)
        if acc > best["val_acc"]:
            best = {"val_acc": acc, "C": c, "weight": weight}
    weight = best.pop("weight")
    best["test_acc"] = accuracy(test.features @ weight[:-1] + weight[-1], test.labels)
    return (best, weight) if return_weight else best


def _logistic_regression(x: torch.Tensor, y: torch.Tensor, classes: int, c: float,
                         iterations: int = 200) -> torch.Tensor:
    weight = torch.zeros(x.shape[1] + 1, classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ weight[:-1] + weight[-1]
        loss = F.cross_entropy(logits, y) + (weight[:-1] ** 2).sum() / (2 * c * len(y))
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach()
