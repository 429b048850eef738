"""Evaluation on pooled features: accuracy, streaming a split, and a run's SAFE numbers.

The test split (tens of thousands of dense maps) never sits in memory whole: `stream_split` reads
it a chunk of rows at a time, and only the pooled outputs are kept. fit's test evaluation and the
OOD evaluation on ImageNet's variants both read through it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..errors import StoreError
from ..model.inference import blend_features
from ..store import FeatureStore


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return logits.argmax(-1).eq(labels).float().mean().item()


def stream_split(store: FeatureStore, split: str, chunk: int = 256,
                 rows: np.ndarray | None = None, *, checked: bool = False
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(dense float32, original pooled, labels int64) of the split's readable rows (or of
    `rows`), `chunk` rows at a time, on the CPU. Every chunk object they need is checked to
    exist first (a missing one would read as zeros), unless the caller did (`checked`)."""
    rows = store.readable_rows(split) if rows is None else rows
    classes = store.manifest["dataset"]["num_classes"]
    if not checked:
        store.check_rows(split, rows, ("dense", "pooled"))
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        dense = torch.from_numpy(store.read_rows(split, "dense", part)).float()
        pooled = torch.from_numpy(store.read_rows(split, "pooled", part))
        labels = torch.from_numpy(store.read_rows(split, "label", part)).long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= classes):
            raise StoreError(f"{store.url}: {split} holds labels outside 0..{classes - 1}"
                             f" (damaged); run `safe-cache verify {store.url}`.")
        yield dense, pooled, labels


@torch.no_grad()
def pooled_split(store: FeatureStore, split: str, head, chunk: int, device, *,
                 checked: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(original pooled, fine-tuned pooled, labels) of a whole split, on `device`."""
    originals, finetuned, labels = [], [], []
    for dense, pooled, label in stream_split(store, split, chunk, checked=checked):
        finetuned.append(head(dense.to(device)))
        originals.append(pooled)
        labels.append(label)
    return (torch.cat(originals).to(device), torch.cat(finetuned),
            torch.cat(labels).to(device))


@torch.no_grad()
def evaluate_safe(val: tuple, test: tuple, classifier: torch.Tensor, beta: float,
                  betas: tuple[float, ...], blend: str,
                  zero_shot: torch.Tensor | None = None) -> dict[str, Any]:
    """Zero-shot, SAFE at `beta`, and the beta curve on val and test; each split is
    (original pooled, fine-tuned pooled, labels). `zero_shot`: the classifier zero-shot CLIP
    uses where it is not SAFE's (a fine-tuned one's run: the prompt set's own)."""
    plain = classifier if zero_shot is None else zero_shot

    def acc(split: tuple, at: float) -> float:
        original, tuned, labels = split
        return accuracy(blend_features(original, tuned, at, blend) @ classifier.T, labels)

    ratio = (test[1].norm(dim=-1) / test[0].norm(dim=-1)).mean().item()
    return {
        "methods": {
            "zero_shot": {"val_acc": accuracy(val[0] @ plain.T, val[2]),
                          "test_acc": accuracy(test[0] @ plain.T, test[2])},
            "safe": {"val_acc": acc(val, beta), "test_acc": acc(test, beta)},
        },
        "beta_curve": [{"beta": b, "val_acc": acc(val, b), "test_acc": acc(test, b)}
                       for b in betas],
        "norm_ratio_finetuned_over_original": ratio,
        "test_images": len(test[2]),
    }
