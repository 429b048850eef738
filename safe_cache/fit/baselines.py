"""The methods a run holds beside zero-shot and SAFE, on the same features: Tip-Adapter(-F),
SAFE-A and the linear probe (adapters.py), and the workbench's (workbench/). The seconds each
took are recorded: what the workbench study reports as a method's cost."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.datasets import load_spec
from ..errors import DatasetError, RecipeError
from ..model.inference import blend_features, tip_logits
from ..store import FeatureStore
from ..store.paths import extract_command
from . import adapters
from .config import FitConfig
from .methods import REFERENCE_METHODS, WORKBENCH_METHODS
from .text import RunText

Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


class RunRows:
    """Which rows a run reads: its K-shot train images (and their labels), its val set and the
    test rows it evaluates."""

    def __init__(self, train: np.ndarray, labels: torch.Tensor, val: np.ndarray,
                 test: np.ndarray) -> None:
        self.train, self.labels, self.val, self.test = train, labels, val, test


@torch.no_grad()
def train_views(store: FeatureStore, head: torch.nn.Module, rows: RunRows, config: FitConfig,
                device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per train image and stored augmented view (Tip-Adapter's cache is built from these,
    whatever SAFE trained on): original pooled and SAFE blended features; center pooled."""
    labels = rows.labels.to(device)
    center = torch.from_numpy(store.read_rows("train", "pooled", rows.train)).to(device)
    if store.view_count("train"):
        original = torch.from_numpy(store.read_rows("train", "aug_pooled", rows.train))
        dense = torch.from_numpy(store.read_rows("train", "aug_dense", rows.train))
        dense = dense.flatten(0, 1)
    else:
        original = center.cpu()[:, None]
        dense = torch.from_numpy(store.read_rows("train", "dense", rows.train))
    original = original.to(device)
    tuned = torch.cat([head(dense[i:i + 256].to(device).float())
                       for i in range(0, len(dense), 256)])
    tuned = tuned.reshape(original.shape)
    blended = blend_features(original, tuned, config.beta, config.blend)
    return original, blended, center, labels


@dataclass
class MethodsRun:
    """What the optional methods gave: each one's result, every method's predictor (original
    pooled, fine-tuned pooled) -> logits over all classes (what the OOD evaluation applies to
    other stores), SAFE-A's trained cache (keys, values) for export, and each method's seconds
    (the result's `timings.methods_s`: kept out of `methods`, whose numbers are reproducible)."""

    results: dict[str, Any]
    predictors: dict[str, Predictor]
    cache: dict[str, torch.Tensor] | None
    seconds: dict[str, float]


class _Results:
    """The methods' summaries, predictors and seconds as they come (each method's seconds
    from the end of the previous one's, or from `restart`)."""

    def __init__(self, predictors: dict[str, Predictor]) -> None:
        self.summaries: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}
        self.predictors = predictors
        self.started = time.perf_counter()

    def restart(self) -> None:
        self.started = time.perf_counter()

    def add(self, name: str, summary: dict[str, Any], reference: bool,
            predictor: Predictor | None = None) -> None:
        self.summaries[name] = _marked(summary, reference)
        self.seconds[name] = time.perf_counter() - self.started
        if predictor is not None:
            self.predictors[name] = predictor
        self.restart()


def run_methods(store: FeatureStore, head: torch.nn.Module, rows: RunRows,
                features: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                text: RunText, scale: float, config: FitConfig, seed: int,
                device: torch.device) -> MethodsRun:
    """The run's optional methods on its features (`features[split]`: original pooled,
    fine-tuned pooled, labels), with the run's classifier and sentences (`text`)."""
    def blend(original: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
        return blend_features(original, tuned, config.beta, config.blend)

    classifier, zero_shot = text.classifier, text.zero_shot  # zero-shot: never a tuned one
    results = _Results({"zero_shot": lambda o, t: o @ zero_shot.T,
                        "safe": lambda o, t: blend(o, t) @ classifier.T})
    if not config.methods:
        return MethodsRun({}, results.predictors, None, {})
    original, blended, center, labels = train_views(store, head, rows, config, device)
    split = {name: (adapters.Split(F.normalize(o, dim=-1), y), adapters.Split(blend(o, t), y))
             for name, (o, t, y) in features.items()}
    search = reference_search(store, device, split["test"][0]) \
        if needs_reference_search(config) else split["val"][0]
    results.restart()
    cache = _tip_methods(results, store, original, blended, labels, split, search, classifier,
                         scale, config, seed, blend)
    if "linear_probe" in config.methods:
        probe = adapters.Split(F.normalize(center, dim=-1), labels)
        summary, weight = adapters.linear_probe(
            probe, split["val"][0], split["test"][0], classifier.shape[0], return_weight=True)
        results.add("linear_probe", summary, False,
                    lambda o, t: F.normalize(o, dim=-1) @ weight[:-1] + weight[-1])
    if any(m in config.methods for m in WORKBENCH_METHODS):
        from .workbench import MethodInputs

        inputs = MethodInputs(
            train_views=original, center=center, labels=labels, val=split["val"][0],
            test=split["test"][0], classifier=classifier, scale=scale, seed=seed,
            device=device, store=store, prompts=config.prompts, train_rows=rows.train,
            val_rows=rows.val, test_rows=rows.test, test_chunk=config.test_chunk,
            run_sentences=text.own_sentences)
        _workbench_methods(results, inputs, search, config)
    return MethodsRun(results.summaries, results.predictors, cache, results.seconds)


def _tip_methods(results: _Results, store: FeatureStore, original: torch.Tensor,
                 blended: torch.Tensor, labels: torch.Tensor,
                 split: dict[str, tuple[adapters.Split, adapters.Split]], search: adapters.Split,
                 classifier: torch.Tensor, scale: float, config: FitConfig, seed: int,
                 blend: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                 ) -> dict[str, torch.Tensor] | None:
    """Tip-Adapter, Tip-Adapter-F and SAFE-A (as the reference code runs the first two under
    --protocol reference); returns SAFE-A's trained cache for export."""
    tip = tip_settings(store.manifest)
    epochs = config.tip_epochs or tip["epochs"]
    reference = config.protocol == "reference"
    keys_average = "raw" if reference else "normalised"
    if "tip_adapter" in config.methods:  # its predictor: the cache and the alpha/gamma chosen
        summary, (keys, values) = adapters.tip_adapter(
            original, labels, search, split["test"][0], classifier, scale, tip, keys_average,
            return_cache=True)
        results.add("tip_adapter", summary, reference,
                    _tip_predictor(keys, values, summary, classifier, scale, None))
    cache = None
    for name, train, index in (("tip_adapter_f", original, 0), ("safe_a", blended, 1)):
        if name not in config.methods:
            continue
        mine = reference and name in REFERENCE_METHODS  # SAFE-A is ours either way
        summary, (keys, values) = adapters.tip_adapter_f(
            train, labels, search if mine else split["val"][index], split["test"][index],
            classifier, scale, tip, epochs=epochs, seed=seed, return_cache=True,
            select_on="test" if mine else config.select_on,
            keys_average=keys_average if mine else "normalised")
        results.add(name, summary, mine, _tip_predictor(
            keys.detach(), values, summary, classifier, scale, blend if index else None))
        if name == "safe_a":
            cache = {"keys": keys.detach().cpu(), "values": values.cpu()}
    return cache


def _workbench_methods(results: _Results, inputs: Any, search: adapters.Split,
                       config: FitConfig) -> None:
    """The workbench's methods the config names, in WORKBENCH_METHODS' order (GDA with the
    reference search set under --protocol reference)."""
    from .workbench import registry

    methods = registry()
    for name in (m for m in WORKBENCH_METHODS if m in config.methods):
        mine = config.protocol == "reference" and name in REFERENCE_METHODS
        outcome = methods[name](replace(inputs, val=search) if mine else inputs)
        results.add(name, outcome.summary, mine, outcome.predictor)


def needs_reference_search(config: FitConfig) -> bool:
    return config.protocol == "reference" and any(m in config.methods
                                                  for m in REFERENCE_METHODS)


def check_reference_serves(store: FeatureStore) -> np.ndarray | None:
    """The val rows --protocol reference searches on (None: the test split, on ImageNet, CoOp's
    ImageNet val being its test); a store holding only the few-shot val rows is refused before
    anything runs: extract --full-val adds the rest."""
    if store.manifest["dataset"]["name"] == "imagenet":
        return None
    rows = store.readable_rows("val")
    expected = store.expected_rows("val")
    if expected is None or len(rows) < expected:
        raise RecipeError(
            f"fit --protocol reference searches on the whole val split, and {store.url} holds"
            f" {len(rows)} of its {expected if expected is not None else 'unknown number of'}"
            f" rows (extract stores the few-shot val rows unless told otherwise). Add them with"
            f" `{extract_command(store.manifest, store.url)} --full-val` (with the dataset's"
            f" --root). Nothing was written.")
    return rows


def reference_search(store: FeatureStore, device: torch.device,
                     test: adapters.Split) -> adapters.Split:
    """Where the reference code searches its hyperparameters: the whole val split, original
    pooled, normalised (ImageNet: the test split)."""
    rows = check_reference_serves(store)
    if rows is None:
        return test
    store.check_rows("val", rows, ("pooled",))
    pooled = torch.from_numpy(store.read_rows("val", "pooled", rows)).to(device)
    labels = torch.from_numpy(store.read_rows("val", "label", rows).astype(np.int64))
    return adapters.Split(F.normalize(pooled.float(), dim=-1), labels.to(device))


def _marked(summary: dict[str, Any], reference: bool) -> dict[str, Any]:
    """A method's summary, marked when it ran the reference protocol (report labels it and
    never averages it with ours)."""
    return {**summary, "protocol": "reference"} if reference else summary


def _tip_predictor(keys: torch.Tensor, values: torch.Tensor, summary: dict[str, Any],
                   classifier: torch.Tensor, scale: float,
                   blend: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
                   ) -> Predictor:
    """Tip-Adapter's logits with its cache (Tip-Adapter's as built, Tip-Adapter-F's and SAFE-A's
    as trained), on original (or, for SAFE-A, blended) features."""
    def predict(original: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
        query = blend(original, tuned) if blend else F.normalize(original, dim=-1)
        return tip_logits(query, classifier, keys, values, summary["alpha"], summary["gamma"],
                          scale)

    return predict
