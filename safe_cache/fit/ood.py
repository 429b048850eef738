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
from ..model.inference import blend_features
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


# How an OOD beta curve is made, written beside it in every result (the paper's Fig. 5 does
# not say; a curve over heads trained at each beta would differ)
CURVE_MADE = ("post hoc: the one head fit trained, early-stopped and chose at beta = {beta},"
              " evaluated at each beta on the variant's test split")


@torch.no_grad()
def evaluate_ood(head, predictors: dict[str, Callable], stores: dict[str, str],
                 fingerprint: str, card: dict[str, Any], chunk: int = 256,
                 device: torch.device | str = "cpu",
                 curve: BetaCurve | None = None) -> dict[str, dict[str, Any]]:
    """Every method's test accuracy on each variant store, and SAFE's beta curve there
    (`curve`). `predictors[method](original pooled, fine-tuned pooled)` gives logits over the
    source's classes; a variant with a class subset (A, R) is scored on its classes' columns
    only. The curve comes from the same chunks: one pass over each variant's maps."""
    results = {}
    betas = curve.betas if curve else ()
    for name, url in stores.items():
        store = open_store(url)
        check_fingerprint(store, fingerprint, card)
        subset = store.manifest["dataset"].get("class_subset")
        hits = dict.fromkeys(predictors, 0.0)
        curve_hits = [0.0] * len(betas)
        images, classes = 0, None
        for dense, original, labels in stream_split(store, "test", chunk):
            original, labels = original.to(device), labels.to(device)
            tuned = head(dense.to(device))
            for method, predict in predictors.items():
                logits = predict(original, tuned)
                logits = logits[:, subset] if subset else logits
                classes = logits.shape[1]
                hits[method] += accuracy(logits, labels) * len(labels)
            for index, beta in enumerate(betas):
                assert curve is not None
                logits = curve.logits(original, tuned, beta)
                logits = logits[:, subset] if subset else logits
                curve_hits[index] += accuracy(logits, labels) * len(labels)
            images += len(labels)
        results[name] = {"store": url, "store_sha256": store.content_sha256,
                         "manifest_sha256": store.manifest[SEAL_FIELD],
                         "images": images,
                         "classes": classes if classes is not None else len(subset or []),
                         **{k: v / max(images, 1) for k, v in hits.items()}}
        if curve:
            results[name]["beta_curve"] = {
                "made": CURVE_MADE.format(beta=curve.trained_at),
                "points": [{"beta": b, "test_acc": h / max(images, 1)}
                           for b, h in zip(betas, curve_hits, strict=True)]}
    return results


class BetaCurve:
    """SAFE's logits at any beta (the blend of original and fine-tuned pooled features, as fit's
    own beta curve), the betas to evaluate and the beta the head was trained and chosen at."""

    def __init__(self, classifier: torch.Tensor, betas: tuple[float, ...], blend: str,
                 trained_at: float) -> None:
        self.classifier, self.betas, self.blend = classifier, tuple(betas), blend
        self.trained_at = trained_at

    def logits(self, original: torch.Tensor, tuned: torch.Tensor, beta: float) -> torch.Tensor:
        return blend_features(original, tuned, beta, self.blend) @ self.classifier.T
