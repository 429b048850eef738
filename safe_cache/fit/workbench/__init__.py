"""The workbench: today's cache-based and linear-probe few-shot CLIP methods beside SAFE, each
from the store alone, under one protocol.

The protocol, the same for every method (and why it is ours, not each paper's): the K-shot train
images with their stored views, the min(K, 4)-shot val set (center view) and the whole test
split, all of one store and one seed; every hyperparameter a method has is chosen on that val
set, never on test (Tip-Adapter-F, CaFo and AMU pick their epoch on test; GDA, APE and ProKeR
search the whole val split, on ImageNet its test). Each method is one module that registers one
function (`@register_method`), timm-style: a new method is one file, and the registry, `fit
--methods`, the result record, report and the study page take it up. Each module's docstring
cites the authors' repository and file its recipe is pinned to (docs/methods.md lists them).

A method takes `MethodInputs` (features only: no trunk, and no image is decoded) and returns a
`MethodOutcome`: its summary for the result record (val_acc, test_acc, and the hyperparameters
it chose) and, where it can have one, its OOD predictor: (original pooled, fine-tuned pooled)
-> logits over all classes, what fit/ood.py applies to ImageNet's variants.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...data.prompts import stored_prompt_set
from ...errors import StoreError
from ...store import FeatureStore
from ..adapters import Split

Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MethodInputs:
    """One (store, shots, seed) run's features, as every workbench method may use them.

    Pooled features are CLIP's original pooling (the frozen model's image features), not SAFE's;
    `val` and `test` hold them L2-normalised, as zero-shot CLIP uses them."""

    train_views: torch.Tensor  # (images, views, D) each stored augmented view, unnormalised
    center: torch.Tensor  # (images, D) the center view, unnormalised
    labels: torch.Tensor  # (images,) int64
    val: Split  # the min(K, 4)-shot val set, center view
    test: Split  # the whole test split
    classifier: torch.Tensor  # (C, D) the run's normalised text classifier (its prompt set)
    scale: float  # CLIP's logit scale
    seed: int
    device: torch.device
    store: FeatureStore  # for what pooled features do not hold (dense maps, every template)
    prompts: str  # the run's prompt set, as stored
    train_rows: np.ndarray  # store rows of the K-shot train images (sorted)
    val_rows: np.ndarray
    test_rows: np.ndarray  # the test rows evaluated (all of them unless fit --partial)
    test_chunk: int  # rows per read when a method streams the test split's dense maps
    # the run's own sentences (raw embeddings, per class) where it mined them (fit/text.py)
    run_sentences: tuple[np.ndarray, list[int]] | None = None

    @property
    def classes(self) -> int:
        return int(self.classifier.shape[0])


@dataclass
class MethodOutcome:
    summary: dict[str, Any]  # val_acc, test_acc (fractions) and what the method chose
    predictor: Predictor | None = None  # None: the method has no OOD predictor


def sentences(inputs: MethodInputs) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The run's prompt set as samples: (raw sentence embeddings (S, D) float32 on the CPU,
    each one's class (S,), sentences per class); a store whose sentences are not one group per
    class is refused in one line."""
    if inputs.run_sentences is not None:
        embeddings, counts = inputs.run_sentences
    else:
        embeddings, counts = inputs.store.sentence_embeddings(stored_prompt_set(inputs.prompts))
    if len(counts) != inputs.classes:
        raise StoreError(f"{inputs.store.url}: the prompt set '{inputs.prompts}' holds"
                         f" sentences of {len(counts)} classes for {inputs.classes} classes;"
                         f" run `safe-cache verify {inputs.store.url}`.")
    raw = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return raw, labels, list(counts)


WorkbenchMethod = Callable[[MethodInputs], MethodOutcome]
_REGISTRY: dict[str, WorkbenchMethod] = {}


def register_method(name: str) -> Callable[[WorkbenchMethod], WorkbenchMethod]:
    """Register a method under the name `fit --methods` and the results use for it."""
    def register(method: WorkbenchMethod) -> WorkbenchMethod:
        if name in _REGISTRY:
            raise ValueError(f"workbench method {name!r} is registered twice")
        _REGISTRY[name] = method
        return method
    return register


def registry() -> dict[str, WorkbenchMethod]:
    """Every registered method, by name (each module of this package imported once)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return dict(_REGISTRY)


def module_names() -> list[str]:
    """The modules of this package (a test checks that each registers a method)."""
    return sorted(module.name for module in pkgutil.iter_modules(__path__))
