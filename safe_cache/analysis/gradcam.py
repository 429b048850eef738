"""`safe-cache gradcam`: Grad-CAM and Grad-CAM++ at the dense map (the paper's Fig. 7), from a
store and a fit result; no trunk needed (SmoothGrad, which perturbs the pixels, needs it).

The store holds the map the pooling layer reads, and everything after it is the head, so the
class logit's gradient with respect to that map is exact from the store: it flows through the
head only. Three heads are explained for each image: the original pooling, SAFE's fine-tuned
one, and SAFE's blend `beta * original + finetuned` (what SAFE predicts with; beta and the blend
mode from the result). The logit is zero-shot CLIP's: `scale * <normalise(feature), w_c>` with
the store's text classifier.

Grad-CAM (Selvaraju et al.): channel weights are the logit's gradient averaged over the spatial
tokens, the map is ReLU(sum_c weight_c * A_c). Grad-CAM++ (Chattopadhay et al.) weighs each
position's positive gradient by alpha = g^2 / (2 g^2 + sum_ij A * g^3), the closed form for an
exponential of the score, as the reference implementation (pytorch-grad-cam) computes it. The
spatial tokens are the last H x W of the map (ViTs keep their class token first; it is not a
position). These are the maps of the pooling's input, not the pooling's attention weights,
which `safe-cache attention` draws.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..errors import ConfigError, StoreError
from ..fit.original import original_head
from ..fit.results import files_problem, head_file, load_result, store_differences
from ..fit.text import result_classifier
from ..model.inference import blend_features
from ..store import FeatureStore, open_store

METHODS = ("gradcam", "gradcam++")
TARGETS = ("true", "predicted")
Feature = Callable[[torch.Tensor], torch.Tensor]  # dense (B, T, C) -> feature (B, D)


def class_maps(dense: torch.Tensor, feature: Feature, classifier: torch.Tensor, scale: float,
               grid: tuple[int, int], method: str = "gradcam",
               target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps (B, H, W), the class each map explains (B,)) for the feature `feature` of the
    dense map (B, T, C). `target`: a class per image; None for the predicted class."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, not {method!r}.")
    dense = dense.detach().float().requires_grad_(True)
    logits = scale * F.normalize(feature(dense), dim=-1) @ classifier.T
    chosen = logits.argmax(-1) if target is None else target
    score = logits.gather(1, chosen[:, None]).sum()
    (grad,) = torch.autograd.grad(score, dense)
    height, width = grid
    tokens = height * width
    activations, grads = dense.detach()[:, -tokens:], grad[:, -tokens:]  # (B, HW, C)
    if method == "gradcam":
        weights = grads.mean(dim=1, keepdim=True)  # (B, 1, C)
    else:  # Grad-CAM++
        squared, cubed = grads.pow(2), grads.pow(3)
        summed = activations.sum(dim=1, keepdim=True)
        alpha = squared / (2 * squared + summed * cubed + 1e-7)
        alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
        weights = (grads.clamp(min=0) * alpha).sum(dim=1, keepdim=True)
    cam = (weights * activations).sum(-1).clamp(min=0)  # (B, HW)
    return cam.view(-1, height, width), chosen


def result_heads(store: FeatureStore, result_path: str | Path) -> tuple[Any, Any, Any]:
    """(the original head, SAFE's head, the result). Refuses a result fitted on another store
    (its fingerprint), files of another run beside it, or a head with a non-finite weight: an
    explanation must come from the head the result describes."""
    result = load_result(result_path)
    if result.store.get("fingerprint") != store.fingerprint:
        raise StoreError(f"{result_path} was fitted on a store with another backbone"
                         f" fingerprint ({result.store.get('url')}), not on {store.url}: name"
                         f" the store it was fitted on (--store).")
    changed = store_differences(result, store)  # same backbone: another dataset, or changed
    if changed:
        raise StoreError(f"{result_path} was fitted on {result.store.get('url')}, not on"
                         f" {store.url} as it is now (its {', '.join(changed)} differs): name"
                         f" the store it was fitted on (--store), or fit again from this one.")
    problem = files_problem(result)
    if problem:
        raise StoreError(f"{result_path}: {problem}; fit it again (fit --force).")
    weights = head_file(Path(result_path))
    state = load_file(str(weights))
    bad = [name for name, value in state.items() if not torch.isfinite(value).all()]
    if bad:
        raise StoreError(f"{weights}: {bad[0]} holds NaN or inf; fit it again.")
    original = original_head(store).eval()
    finetuned = copy.deepcopy(original)
    finetuned.load_state_dict(state)
    return original, finetuned, result


def head_features(store: FeatureStore, result_path: str | Path) -> tuple[dict[str, Feature],
                                                                          Any]:
    """The three features to explain: original, finetuned (SAFE's head), blend (beta and the
    blend mode from the result); and the result (see result_heads)."""
    original, finetuned, result = result_heads(store, result_path)
    beta, mode = float(result.config["beta"]), str(result.config.get("blend", "blend"))
    return {"original": original, "finetuned": finetuned,
            "blend": lambda x: blend_features(original(x), finetuned(x), beta, mode)}, result


def checked_rows(store: FeatureStore, split: str, rows: list[int]
                 ) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """(dense maps float32, labels, image paths) of rows a user named: each a readable row, its
    chunks present, its maps finite (a damaged store explains nothing)."""
    order = store.readable_row_ids(split, rows)
    store.check_rows(split, order, ("dense",))
    dense = torch.from_numpy(store.read_rows(split, "dense", order).astype(np.float32))
    if not torch.isfinite(dense).all():
        raise StoreError(f"{store.url}: the dense maps of {split} rows {list(order)} hold NaN or"
                         f" inf; run `safe-cache verify {store.url}`.")
    labels = store.read_rows(split, "label", order).astype(np.int64)
    return dense, labels, [str(p) for p in store.read_rows(split, "path", order)]


def gradcam_maps(store_url: str, result_path: str | Path, rows: list[int], split: str = "test",
                 method: str = "gradcam", target: str = "true") -> dict[str, Any]:
    """Grad-CAM (or Grad-CAM++) of the original head, SAFE's head and the blend for store rows.

    Returns {"paths", "labels", "classnames", "card", "method", "target", "beta", and per
    head name: {"maps" (images, H, W), "classes" (images,)}}."""
    if target not in TARGETS:
        raise ConfigError(f"target must be one of {', '.join(TARGETS)}, not {target!r}.")
    store = open_store(store_url)
    features, result = head_features(store, result_path)
    card = store.manifest["backbone"]
    dense, labels, paths = checked_rows(store, split, rows)
    classifier = result_classifier(result, store)
    wanted = torch.from_numpy(labels) if target == "true" else None
    out: dict[str, Any] = {
        "paths": paths,
        "labels": labels.tolist(), "classnames": store.manifest["dataset"]["classnames"],
        "card": card, "method": method, "target": target, "beta": result.config["beta"]}
    for name, feature in features.items():
        maps, classes = class_maps(dense, feature, classifier, float(card["logit_scale"]),
                                   tuple(card["token_grid"]), method, wanted)
        out[name] = {"maps": maps.numpy(), "classes": classes.tolist()}
    return out


def smooth_maps(trunk: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                feature: Feature, classifier: torch.Tensor, scale: float,
                grid: tuple[int, int], target: torch.Tensor | None, samples: int = 16,
                noise: float = 0.15, method: str = "gradcam", seed: int = 0) -> torch.Tensor:
    """SmoothGrad over the live trunk: the mean map of `samples` copies of the images with
    Gaussian noise of `noise` times each image's value range (Smilkov et al.'s recipe), the
    class fixed to that of the clean images (`target`, or their prediction)."""
    if samples < 1 or not 0 < noise <= 1:
        raise ConfigError(f"SmoothGrad needs samples >= 1 and 0 < noise <= 1 (got {samples},"
                          f" {noise}).")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        clean = trunk(images)
    if target is None:
        _, target = class_maps(clean, feature, classifier, scale, grid, method)
    spread = (images.amax(dim=(1, 2, 3)) - images.amin(dim=(1, 2, 3))).view(-1, 1, 1, 1)
    total = torch.zeros(images.shape[0], *grid)
    for _ in range(samples):
        noisy = images + noise * spread * torch.randn(images.shape, generator=generator)
        with torch.no_grad():
            dense = trunk(noisy)
        total += class_maps(dense, feature, classifier, scale, grid, method, target)[0]
    return total / samples



def store_backbone(store: FeatureStore) -> Any:
    """The store's own backbone, live (for SmoothGrad's pixel noise): its card's model,
    weights and cut, refused unless its fingerprint is the store's."""
    from ..identity import card_fingerprint
    from ..model.backbone import load_backbone

    card = store.manifest["backbone"]
    if str(card.get("pretrained") or "").startswith("file:"):
        raise ConfigError(f"{store.url} was extracted with the local weights file"
                          f" {card['pretrained'][5:]}; SmoothGrad loads a backbone by its tag"
                          f" only. Leave --smooth out for the maps from the store.")
    backbone = load_backbone(card["model"], card.get("pretrained"), cut=card["cut"],
                             init_seed=card.get("init_seed") or 0,
                             quick_gelu=card.get("quick_gelu"))
    if card_fingerprint(backbone.card) != store.fingerprint:
        raise StoreError(f"The backbone loaded for {store.url} is not the one it was extracted"
                         f" with (fingerprints differ): other weights under the same tag?")
    return backbone


def smooth_gradcam_maps(store_url: str, result_path: str | Path, rows: list[int],
                        image_root: str | Path, split: str = "test", method: str = "gradcam",
                        target: str = "true", samples: int = 16,
                        noise: float = 0.15) -> dict[str, Any]:
    """gradcam_maps' maps, SmoothGrad over the live trunk from the rows' image files."""
    from ..data.views import load_image

    maps = gradcam_maps(store_url, result_path, rows, split, method, target)
    store = open_store(store_url)
    features, result = head_features(store, result_path)
    backbone = store_backbone(store)
    missing = [p for p in maps["paths"] if not (Path(image_root) / p).is_file()]
    if missing:
        raise ConfigError(f"SmoothGrad needs the images: {Path(image_root) / missing[0]} is not"
                          f" a file (--image-root is the dataset's image folder).")
    images = torch.stack([backbone.preprocess(load_image(Path(image_root) / p))
                          for p in maps["paths"]])
    card, classifier = maps["card"], result_classifier(result, store)
    for name, feature in features.items():
        fixed = torch.tensor(maps[name]["classes"])  # the class the store's map explains
        maps[name]["maps"] = smooth_maps(
            backbone.trunk, images, feature, classifier, float(card["logit_scale"]),
            tuple(card["token_grid"]), fixed, samples, noise, method).numpy()
    maps["smooth"] = {"samples": samples, "noise": noise}
    return maps

PANELS = (("original", "original pooling"), ("finetuned", "SAFE's pooling"),
          ("blend", "SAFE's blend"))


def plot_gradcam(maps: dict[str, Any], image_root: str | Path | None, out: str | Path
                 ) -> list[Path]:
    """One PNG per image: the image, then each head's map over it (or alone without images),
    titled with the class it explains; and gradcam.json with the maps and their classes."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_write_text
    from ..data.views import model_view
    from .overlay import draw_map

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    label = "Grad-CAM++" if maps["method"] == "gradcam++" else "Grad-CAM"
    label = f"SmoothGrad {label}" if maps.get("smooth") else label
    written = []
    for index, path in enumerate(maps["paths"]):
        image = None
        if image_root is not None and (Path(image_root) / path).is_file():
            image = np.asarray(model_view(Path(image_root) / path, maps["card"]))
        figure, axes = plt.subplots(1, 4, figsize=(13, 3.4))
        if image is not None:
            axes[0].imshow(image)
        true = maps["classnames"][maps["labels"][index]]
        axes[0].set_title(f"{Path(path).name} ({true})", fontsize=9)
        axes[0].axis("off")
        for axis, (name, title) in zip(axes[1:], PANELS, strict=True):
            values = maps[name]["maps"][index]
            explained = maps["classnames"][maps[name]["classes"][index]]
            shown = draw_map(axis, image, values, "jet", 0.5)
            axis.set_title(f"{label}, {title}\nfor '{explained}'", fontsize=9)
            axis.axis("off")
            figure.colorbar(shown, ax=axis, fraction=0.046)
        target = out / f"gradcam_{index:03d}_{Path(path).stem}.png"
        figure.tight_layout()
        figure.savefig(target, dpi=100)
        plt.close(figure)
        written.append(target)
    record = {key: maps.get(key) for key in ("paths", "labels", "method", "target", "beta",
                                             "smooth")}
    record.update({name: {"classes": maps[name]["classes"],
                          "maps": np.round(maps[name]["maps"], 6).tolist()}
                   for name, _ in PANELS})
    atomic_write_text(out / "gradcam.json", json.dumps(record, indent=1))
    return written
