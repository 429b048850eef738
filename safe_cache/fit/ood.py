"""Out-of-distribution evaluation: heads trained on ImageNet, tested on its variants' stores.

ImageNet-V2 and -Sketch share ImageNet's 1000 classes; ImageNet-A and -R hold 200 of them, and
their store's dataset description lists which rows of the 1000-class classifier they use
(`class_subset`). Every variant store must hold the same backbone's features (fingerprint).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..identity import SEAL_FIELD, card_fingerprint
from ..store import check_fingerprint, default_store_url, open_store
from ..store.paths import backbone_label
from .evaluate import accuracy, stream_split

VARIANTS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def resolve_ood_stores(names: tuple[str, ...], source_url: str, card: dict[str, Any]) -> dict:
    """Variant name or store URL -> URL; names resolve beside the source store
    (stores/<variant>/<model>-<pretrained>.zarr)."""
    root = str(Path(source_url).parent.parent)
    return {_variant_name(n, card):
            n if ("://" in n or n.endswith(".zarr")) else default_store_url(n, card, root)
            for n in names}


def _variant_name(name: str, card: dict[str, Any]) -> str:
    """A variant's key in results: its name, or a store URL's file stem; a store in the default
    layout (`<variant>/<backbone>.zarr`) is named by its folder, not by the backbone."""
    if not name.endswith(".zarr"):
        return name
    path = Path(name)
    return path.parent.name if path.stem == backbone_label(card) else path.stem


def ood_seals(names: tuple[str, ...], source_url: str, card: dict[str, Any],
              partial: bool = False) -> dict[str, dict[str, Any]]:
    """Each variant's store seal (part of the run's identity), the stores opened and checked
    (same backbone; test split complete unless `partial`) before any run starts."""
    out = {}
    for name, url in resolve_ood_stores(names, source_url, card).items():
        store = open_store(url)
        check_fingerprint(store, card_fingerprint(card), card)
        if not partial:
            store.check_complete("test")
        out[name] = {"store_sha256": store.content_sha256,
                     "manifest_sha256": store.manifest[SEAL_FIELD]}
    return out


@torch.no_grad()
def evaluate_ood(head, predictors: dict[str, Callable], stores: dict[str, str],
                 fingerprint: str, card: dict[str, Any], chunk: int = 256,
                 device: torch.device | str = "cpu") -> dict[str, dict[str, Any]]:
    """Every method's test accuracy on each variant store. `predictors[method](original pooled,
    fine-tuned pooled)` gives logits over the source's classes; a variant with a class subset
    (A, R) is scored on its classes' columns only."""
    results = {}
    for name, url in stores.items():
        store = open_store(url)
        check_fingerprint(store, fingerprint, card)
        subset = store.manifest["dataset"].get("class_subset")
        hits = dict.fromkeys(predictors, 0.0)
        images, classes = 0, None
        for dense, original, labels in stream_split(store, "test", chunk):
            original, labels = original.to(device), labels.to(device)
            tuned = head(dense.to(device))
            for method, predict in predictors.items():
                logits = predict(original, tuned)
                logits = logits[:, subset] if subset else logits
                classes = logits.shape[1]
                hits[method] += accuracy(logits, labels) * len(labels)
            images += len(labels)
        results[name] = {"store": url, "store_sha256": store.content_sha256,
                         "manifest_sha256": store.manifest[SEAL_FIELD],
                         "images": images,
                         "classes": classes if classes is not None else len(subset or []),
                         **{k: v / max(images, 1) for k, v in hits.items()}}
    return results
