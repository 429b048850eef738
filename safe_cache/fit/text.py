"""The text side of a run: the classifier its zero-shot logits, SAFE and every method use, and
the sentences behind it. Usually the prompt set's classifier as the store holds it; two of the
paper's Fig. 8 variants make it per run, from the run's own few-shot data:

- Template Mining (`--prompts mined`): Cross-Modal Fine-tuning's rule (Lin et al., CVPR 2023;
  github.com/linzhiqiu/cross_modal_adaptation, engine/templates/template_mining.py: "Selected 21
  templates mined by 4-shot validation set", engine/config: "best zero-shot templates for
  few-shot val set"). Each of the pool's 180 templates alone makes a zero-shot classifier; the
  21 of the best accuracy on the run's val set (the original pooled features; ties go to the
  earlier template in template_pool.json) are averaged as any template set is. Their repository
  ships only the mined lists, not the search, so the search is ours: on the run's own val split
  (min(K, 4) shots a class, as theirs), never on test, so a 1-shot run mines on its 1-shot val.
- Linear Fine-tuning (`--classifier linear`): the classifier, initialised from the prompt set's
  text, is trained on the few-shot images as a linear head before SAFE trains, and SAFE and
  every method then use it as CLIP's classifier (the paper: "uses textual features from CuPL's
  prompt to initialize CLIP's classifier and then fine-tunes this linear layer with few-shot
  samples"; it states no recipe, so it is Cross-Modal's uni-modal linear probe with zero-shot
  initialisation: workbench/cross_modal_lp.py's trainer, grid and selection with no text
  samples in the batch). The trained weights are not normalised: their norms are part of what
  was learned.

Either way the run records a `text` block (the mined templates, or the linear head's choice) and
saves its classifier beside the result, which export and the analyses read back.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.prompts import class_average, class_sentences, stored_prompt_set, template_pool
from ..errors import RecipeError, StoreError
from ..store import FeatureStore
from .recipe import Recipe

MINED_TEMPLATES = 21  # Cross-Modal's mined lists hold 21 templates per dataset


@dataclass(frozen=True)
class RunText:
    """A run's classifier (C, D), its sentences' raw embeddings (S, D) with the sentences per
    class, and its `text` block (None: the stored prompt set as it is)."""

    classifier: torch.Tensor
    embeddings: np.ndarray | None
    counts: list[int] | None
    record: dict[str, Any] | None = None
    initial: torch.Tensor | None = None  # before Linear Fine-tuning: what zero-shot CLIP uses

    @property
    def zero_shot(self) -> torch.Tensor:
        """The classifier zero-shot CLIP uses: the prompt set's, never a fine-tuned one."""
        return self.classifier if self.initial is None else self.initial

    @property
    def own_sentences(self) -> tuple[np.ndarray, list[int]] | None:
        """(raw embeddings, sentences per class) where the run chose its sentences (the mined
        templates); None: the stored prompt set's, which a method reads from the store."""
        if self.record is None or "templates" not in self.record:
            return None
        assert self.embeddings is not None and self.counts is not None  # mined_text sets them
        return self.embeddings, self.counts


def stored_text(store: FeatureStore, prompts: str, recipe: Recipe) -> RunText:
    """The prompt set's classifier as the store holds it, its templates averaged as the recipe
    says (the stored classifier is the normalised average)."""
    name = stored_prompt_set(prompts)
    if recipe.text_average == "normalised":
        return RunText(torch.from_numpy(store.classifier(name)).float(), None, None)
    embeddings, counts = store.sentence_embeddings(name)
    return RunText(class_average(torch.from_numpy(embeddings), counts, recipe.text_average),
                   embeddings, list(counts))


def pool_embeddings(store: FeatureStore) -> np.ndarray:
    """(C, T, D) the pool's raw sentence embeddings, class-major as extract encodes them; a
    store whose `pool` set is not template_pool.json's templates of its classes, in that order
    (the run records their texts by index), is refused."""
    embeddings, counts = store.sentence_embeddings("pool")
    templates = template_pool()
    classnames = store.manifest["dataset"]["classnames"]
    if store.prompt_sentences("pool") != class_sentences("pool", classnames, ()):
        raise StoreError(f"{store.url}: its prompt set 'pool' is not the {len(templates)}"
                         f" templates of template_pool.json for its classes (another file,"
                         f" or another safe-cache's pool); extract --prompts pool into a new"
                         f" store.")
    return np.asarray(embeddings, dtype=np.float32).reshape(len(counts), len(templates), -1)


def template_accuracies(pool: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                        chunk: int = 8) -> torch.Tensor:
    """(T,) the zero-shot accuracy of each template alone: (C, T, D) raw embeddings, (N, D)
    image features (any norm: an argmax does not see it). `chunk` templates at a time: all
    180 at once would be a (180, N, C) tensor, 2.9 GB for ImageNet's 4-shot val set."""
    features, hits = features.float(), []
    for start in range(0, pool.shape[1], chunk):
        weights = F.normalize(pool[:, start:start + chunk].float(), dim=-1)  # (C, t, D)
        logits = torch.einsum("nd,ctd->tnc", features, weights)
        hits.append(logits.argmax(-1).eq(labels[None]).float().mean(-1))
    return torch.cat(hits)


def best_templates(accuracy: torch.Tensor, keep: int = MINED_TEMPLATES) -> list[int]:
    """The `keep` templates of the best accuracy, best first, ties to the earlier template
    (a stable sort)."""
    return sorted(range(len(accuracy)), key=lambda t: -float(accuracy[t]))[:keep]


def mine_templates(pool: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                   keep: int = MINED_TEMPLATES) -> list[int]:
    """The `keep` templates of the best zero-shot accuracy on (features, labels)."""
    return best_templates(template_accuracies(pool, features, labels), keep)


def mined_text(store: FeatureStore, recipe: Recipe, val_features: torch.Tensor,
               val_labels: torch.Tensor) -> RunText:
    """Template Mining on the run's val set: its classifier, sentences and record."""
    pool = torch.from_numpy(pool_embeddings(store))
    accuracy = template_accuracies(pool, val_features.cpu(), val_labels.cpu())
    chosen = best_templates(accuracy)
    picked = pool[:, chosen]  # (C, K, D)
    embeddings = picked.reshape(-1, picked.shape[-1])
    counts = [len(chosen)] * pool.shape[0]
    classifier = class_average(embeddings, counts, recipe.text_average)
    templates = template_pool()
    record = {"prompts": "mined", "from": "pool", "rule": "best zero-shot val accuracy",
              "templates": [templates[t] for t in chosen],
              "val_acc": [float(accuracy[t]) for t in chosen],
              "pool_templates": len(templates), "selected_on": "val"}
    return RunText(classifier, embeddings.numpy(), counts, record)


def linear_recipe() -> Any:
    """Cross-Modal's linear-probe recipe with no text samples in a batch (uni-modal)."""
    from .workbench.cross_modal_lp import CrossModalRecipe

    return replace(CrossModalRecipe(), text_ratio=0.0)


def linear_text(text: RunText, store: FeatureStore, train_rows: np.ndarray,
                train_labels: torch.Tensor, val_features: torch.Tensor,
                val_labels: torch.Tensor, scale: float, seed: int,
                device: torch.device) -> RunText:
    """Linear Fine-tuning of the run's classifier on the few-shot images (center crops and
    their flips where stored, original pooled features): Cross-Modal's trainer, grid and
    selection on the val set, no text samples."""
    from .workbench.cross_modal_lp import Samples, choose, train_heads

    parts, views = [store.read_rows("train", "pooled", train_rows)], "center"
    if store.center_flip:
        parts.append(store.read_rows("train", "flip_pooled", train_rows))
        views = "center+flip"
    images = F.normalize(torch.from_numpy(np.concatenate(parts)).float(), dim=-1).to(device)
    labels = train_labels.to(device).repeat(len(parts))
    empty = images[:0]
    samples = Samples(images, labels, empty, labels[:0], views)
    lp_recipe = linear_recipe()
    grid = lp_recipe.grid(0, len(images))
    generator = torch.Generator().manual_seed(seed)
    val = F.normalize(val_features.float(), dim=-1).to(device)
    with torch.no_grad():
        trained = train_heads(samples, text.classifier.to(device), val, val_labels.to(device),
                              scale, lp_recipe, grid, generator)
    chosen = choose(trained)
    lr, wd, batch = grid[chosen]
    record = {**(text.record or {}), "classifier": "linear",
              "linear": {"lr": lr, "wd": wd, "batch_size": batch,
                         "val_acc": float(trained.val_acc[chosen].item()),
                         "best_iter": int(trained.best_iter[chosen].item()),
                         "iterations": lp_recipe.iterations, "configurations": len(grid),
                         "image_views": views, "selected_on": "val"}}
    return RunText(trained.weights[chosen].detach(), text.embeddings, text.counts, record,
                   initial=text.classifier)


def check_linear_serves(store: FeatureStore, shots: tuple[int, ...],
                        seeds: tuple[int, ...]) -> None:
    """Refuse, before anything runs, a run with too few images for every batch size of the
    linear head's grid (theirs needs a batch smaller than the image set)."""
    recipe, per_image = linear_recipe(), 2 if store.center_flip else 1
    for seed in seeds:
        for k in shots:
            images = per_image * len(store.fewshot(seed, k)[0])
            if not any(recipe.valid_batch(b, 0, images) for b in recipe.batch_sizes):
                raise RecipeError(f"--classifier linear: {k} shots (seed {seed}) give"
                                  f" {images} training samples, and the linear head's"
                                  f" batches of {recipe.batch_sizes} each need more; use more"
                                  f" shots, or --classifier text. Nothing was written.")


def linear_accuracies(text: RunText, test: tuple) -> dict[str, Any]:
    """A fine-tuned classifier's record with its own test accuracy on the original features
    beside the val accuracy it was chosen by (the result's zero-shot row is the prompt set's
    classifier's)."""
    from .evaluate import accuracy

    assert text.record is not None and "linear" in text.record
    linear = {**text.record["linear"], "test_acc": accuracy(test[0] @ text.classifier.T,
                                                            test[2])}
    return {**text.record, "linear": linear}


def run_text(store: FeatureStore, prompts: str, classifier: str, recipe: Recipe, *,
             train_rows: np.ndarray, train_labels: torch.Tensor, val_features: torch.Tensor,
             val_labels: torch.Tensor, scale: float, seed: int,
             device: torch.device) -> RunText:
    """The run's text side: the stored prompt set, mined from the pool, and/or its classifier
    fine-tuned (see the module docstring)."""
    if prompts == "mined":  # the built-in set (a file named mined.json is refused on input)
        text = mined_text(store, recipe, val_features, val_labels)
    else:
        text = stored_text(store, prompts, recipe)
    if classifier == "linear":
        text = linear_text(text, store, train_rows, train_labels, val_features, val_labels,
                           scale, seed, device)
    return replace(text, classifier=text.classifier.to(device),
                   initial=None if text.initial is None else text.initial.to(device))


def classifier_sha256(weights: torch.Tensor) -> str:
    """The digest of a classifier's float32 values (in the result's `text` block: the file
    saved beside it must hold exactly these)."""
    values = weights.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.sha256(values.tobytes()).hexdigest()


def with_digest(record: dict[str, Any], weights: torch.Tensor) -> dict[str, Any]:
    """A run's `text` block with the digest of the classifier it saves."""
    return {**record, "classifier_sha256": classifier_sha256(weights)}


def result_classifier(result: Any, store: FeatureStore) -> torch.Tensor:
    """(C, D) float32: the classifier a fit result's run used: the one it saved beside itself
    (mined templates, a fine-tuned head), or its prompt set's as the store holds it. A saved
    one that is not the float32 (classes, embedding) tensor whose digest the result records
    is refused."""
    from safetensors.torch import load_file

    from .recipe import recipe_of
    from .results import classifier_file

    if result.text is None:
        return stored_text(store, result.config["prompts"], recipe_of(result)).classifier
    path = classifier_file(result.path)
    try:
        weights = load_file(str(path)).get("classifier")
    except Exception as exc:  # missing, truncated or foreign: safetensors' own errors
        raise StoreError(f"{path} is not the run's readable classifier ({exc!s:.120}); fit"
                         f" the result again (--force).") from exc
    shape = (store.manifest["dataset"]["num_classes"], store.manifest["backbone"]["embed_dim"])
    if weights is None or weights.dtype != torch.float32 or tuple(weights.shape) != shape \
            or not bool(torch.isfinite(weights).all()):
        raise StoreError(f"{path} does not hold a finite float32 classifier of shape {shape}"
                         f" (classes, embedding); fit the result again (--force).")
    if classifier_sha256(weights) != result.text.get("classifier_sha256"):
        raise StoreError(f"{path} is not the classifier {result.path.name} records (its digest"
                         f" differs: edited or replaced); fit the result again (--force).")
    return weights
