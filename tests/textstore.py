"""A real small store holding what the text-using workbench methods read from it (every
sentence's raw embedding, optionally the train split's mirrored center views), and synthetic
MethodInputs beside it: class clusters on the unit sphere, a text classifier near them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from factories import fill, new_store, random_features, toy_card, toy_dataset

from safe_cache.data.prompts import class_average
from safe_cache.fit.adapters import Split
from safe_cache.fit.workbench import MethodInputs
from safe_cache.store import FeatureStore, open_store


def text_store(path: Path, raw: np.ndarray, counts: list[int], *, labels: np.ndarray | None = None,
               flips: np.ndarray | None = None) -> FeatureStore:
    """A store whose "hand" prompt set has `counts[c]` sentences for class c with the raw
    embeddings `raw` (its classifier their normalised average); `flips`: the train split's
    flip_pooled, one per `labels` row."""
    dim = raw.shape[1]
    card = toy_card(embed_dim=dim)
    with new_store(str(path), card, dataset=toy_dataset(num_classes=len(counts)),
                   center_flip=flips is not None) as store:
        if flips is not None and labels is not None:
            values = random_features(len(labels), card, 0)
            values.update(flip_dense=values["dense"], flip_pooled=flips)
            fill(store, "train", labels.tolist(), values)
        classifier = class_average(torch.from_numpy(raw).float(), counts).numpy()
        sentences = [[f"class {c} template {t}" for t in range(n)] for c, n in enumerate(counts)]
        store.write_classifier("hand", classifier, sentences, raw)
    return open_store(str(path))


def synthetic_inputs(path: Path, *, classes: int = 4, dim: int = 8, shots: int = 4,
                     views: int = 2, templates: int = 1, test_per: int = 10, seed: int = 1,
                     noise: float = 0.8, offset: float = 0.8, text_norm: float = 3.0,
                     flip: bool = True, data_seed: int = 0) -> MethodInputs:
    """MethodInputs of a K-shot problem (val min(K, 4) per class), its store at `path`."""
    g = torch.Generator().manual_seed(data_seed)
    means = F.normalize(torch.randn(classes, dim, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(means + offset * F.normalize(torch.randn(classes, dim, generator=g,
                                                                dtype=torch.float64), dim=-1), -1)
    raw = text[:, None] * text_norm + 0.3 * torch.randn(classes, templates, dim, generator=g,
                                                         dtype=torch.float64)
    raw = raw.reshape(classes * templates, dim).float()

    def draw(per_class: int, *more: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(classes).repeat_interleave(per_class)
        shape = (len(labels), *more, dim)
        base = means[labels].reshape(len(labels), *[1] * len(more), dim)
        x = (base + noise * torch.randn(shape, generator=g, dtype=torch.float64) / dim ** .5)
        return (x * 4).float(), labels

    train_views, labels = draw(shots, views)
    center = train_views.mean(1) * 1.1
    flips = (center + 0.1 * torch.randn(center.shape, generator=g)).numpy() if flip else None
    store = text_store(path, raw.numpy(), [templates] * classes, labels=labels.numpy(),
                       flips=flips)
    vx, vy = draw(min(shots, 4))
    tx, ty = draw(test_per)
    return MethodInputs(
        train_views=train_views, center=center, labels=labels,
        val=Split(F.normalize(vx, dim=-1), vy), test=Split(F.normalize(tx, dim=-1), ty),
        classifier=torch.from_numpy(store.classifier("hand")), scale=100.0, seed=seed,
        device=torch.device("cpu"), store=store, prompts="hand",
        train_rows=np.arange(len(labels)), val_rows=np.arange(len(vy)),
        test_rows=np.arange(len(ty)), test_chunk=256)


def zero_shot_accuracy(inputs: MethodInputs, split: Split) -> float:
    return (split.features @ inputs.classifier.T).argmax(-1).eq(split.labels).float().mean().item()
