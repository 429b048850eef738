"""`safe-cache shapley`: how much each part of an object is worth to a head (the paper's Fig. 1),
from the stored maps; no trunk needed.

The players are an image's parts, given by a mask; each token of the dense map belongs to the
part covering most of its cell of the model's input (or to none: then it is always present).
A coalition's value is the true class's probability (the softmax of zero-shot CLIP's logits
over the classes) when the absent parts' tokens are removed from the pooling's keys and values
(`GridHead.masked`: for a ResNet's pool the mean-token query is the mean of the tokens present,
for a ViT or EVA the class token stays, MAP and CoCa pools keep their learned queries). Shapley
values, for the original pooling, SAFE's pooling and SAFE's blend:

    phi_i = sum over S not holding i of |S|! (P - |S| - 1)! / P! * (v(S + i) - v(S))

exactly over all 2^P coalitions for P <= 8 (every coalition in a few batched head calls), or
by Monte Carlo over random orders of the parts beyond (the mean marginal contribution, with its
standard error). They sum to v(all parts) - v(no part) (efficiency).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, ImageReadError

EXACT_PARTS = 8  # up to here all 2^P coalitions; beyond, Monte Carlo over orders
Value = Callable[[torch.Tensor], torch.Tensor]  # keep (N, T) bool -> value (N,)


def coalition_keep(part_of_token: torch.Tensor, coalitions: torch.Tensor) -> torch.Tensor:
    """(N, T) kept tokens for N coalitions ((N, P) bool over the parts): a token of no part
    (part -1) is always kept, a part's tokens when the coalition holds it."""
    parts = coalitions.shape[1]
    member = F.one_hot((part_of_token + 1).clamp(min=0), parts + 1).bool()  # (T, P + 1)
    held = torch.cat([torch.ones_like(coalitions[:, :1]), coalitions], dim=1)  # "no part" held
    return (member[None] & held[:, None]).any(-1)


def exact_shapley(value: Value, part_of_token: torch.Tensor, parts: int,
                  chunk: int = 64) -> dict[str, Any]:
    """Every coalition's value and each part's Shapley value, exactly (2^parts evaluations)."""
    if parts > 16:
        raise ConfigError(f"{parts} parts make 2^{parts} coalitions: use Monte Carlo.")
    coalitions = torch.tensor(list(itertools.product([False, True], repeat=parts)),
                              dtype=torch.bool)
    coalitions = coalitions.flip(1)  # row k holds part i when bit i of k is set
    keep = coalition_keep(part_of_token, coalitions)
    values = torch.cat([value(keep[lo:lo + chunk]) for lo in range(0, len(keep), chunk)])
    values = values.double()
    sizes = coalitions.sum(1)
    phi = torch.zeros(parts, dtype=torch.float64)
    for i in range(parts):
        without = ~coalitions[:, i]
        index = torch.arange(len(coalitions))[without]
        size = sizes[without]
        weight = torch.tensor([math.factorial(s) * math.factorial(parts - s - 1)
                               / math.factorial(parts) for s in size.tolist()],
                              dtype=torch.float64)
        phi[i] = (weight * (values[index + (1 << i)] - values[index])).sum()
    return {"phi": phi.tolist(), "stderr": [0.0] * parts, "v_all": values[-1].item(),
            "v_none": values[0].item(), "coalitions": len(coalitions), "exact": True}


def monte_carlo_shapley(value: Value, part_of_token: torch.Tensor, parts: int,
                        orders: int = 200, seed: int = 0, chunk: int = 64) -> dict[str, Any]:
    """Shapley values as the mean marginal contribution over `orders` random orders of the
    parts (Castro et al.), with the standard error of each mean."""
    if orders < 2:
        raise ConfigError(f"Monte Carlo Shapley needs at least 2 orders, not {orders}.")
    generator = torch.Generator().manual_seed(seed)
    contributions = torch.zeros(orders, parts, dtype=torch.float64)
    for start in range(0, orders, max(1, chunk // (parts + 1))):
        batch = [torch.randperm(parts, generator=generator)
                 for _ in range(min(orders - start, max(1, chunk // (parts + 1))))]
        steps = []
        for order in batch:  # the empty coalition, then one more part at a time
            held = torch.zeros(parts, dtype=torch.bool)
            steps.append(held.clone())
            for part in order.tolist():
                held[part] = True
                steps.append(held.clone())
        values = value(coalition_keep(part_of_token, torch.stack(steps))).double()
        values = values.view(len(batch), parts + 1)
        for row, order in enumerate(batch):
            contributions[start + row, order] = values[row, 1:] - values[row, :-1]
    phi = contributions.mean(0)
    stderr = contributions.std(0, unbiased=True) / math.sqrt(orders)
    full = value(coalition_keep(part_of_token, torch.ones(1, parts, dtype=torch.bool)))
    empty = value(coalition_keep(part_of_token, torch.zeros(1, parts, dtype=torch.bool)))
    return {"phi": phi.tolist(), "stderr": stderr.tolist(), "v_all": full.item(),
            "v_none": empty.item(), "coalitions": orders * (parts + 1), "exact": False,
            "orders": orders}


def shapley(value: Value, part_of_token: torch.Tensor, parts: int, *, orders: int = 200,
            seed: int = 0) -> dict[str, Any]:
    """Exact for at most EXACT_PARTS parts that own a token, Monte Carlo beyond. A part owning
    no token changes no coalition's value: its Shapley value is 0 (the dummy axiom), and it
    is left out of the game (`absent` lists such parts)."""
    present = sorted({int(p) for p in part_of_token.tolist() if p >= 0})
    renumber = torch.full((parts + 1,), -1, dtype=torch.long)
    renumber[torch.tensor(present, dtype=torch.long) + 1] = torch.arange(len(present))
    tokens = renumber[part_of_token + 1]
    if not present:  # no part owns a token: one coalition, everyone's value 0
        alone = value(torch.ones(1, len(part_of_token), dtype=torch.bool)).item()
        return {"phi": [0.0] * parts, "stderr": [0.0] * parts, "v_all": alone, "v_none": alone,
                "coalitions": 1, "exact": True, "absent": list(range(parts))}
    if len(present) <= EXACT_PARTS:
        game = exact_shapley(value, tokens, len(present))
    else:
        game = monte_carlo_shapley(value, tokens, len(present), orders, seed)
    phi, stderr = [0.0] * parts, [0.0] * parts
    for index, part in enumerate(present):
        phi[part], stderr[part] = game["phi"][index], game["stderr"][index]
    return {**game, "phi": phi, "stderr": stderr,
            "absent": [p for p in range(parts) if p not in present]}


def class_probability(feature: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                      dense: torch.Tensor,
                      classifier: torch.Tensor, scale: float, label: int) -> Value:
    """v(keep): the probability of class `label` for one image's map (T, C) with only the kept
    tokens pooled; `feature(dense (N, T, C), keep (N, HW))` is the head's feature."""
    def value(keep: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            maps = dense.expand(len(keep), *dense.shape)
            logits = scale * F.normalize(feature(maps, keep), dim=-1) @ classifier.T
            return logits.softmax(-1)[:, label]
    return value


def token_parts(mask: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """Each token's part: the label (mask value k >= 1 -> part k - 1; 0 -> no part, -1) most of
    the pixels of its cell hold, for a mask (H, W) in the model's input frame."""
    height, width = grid
    rows = np.array_split(np.arange(mask.shape[0]), height)
    cols = np.array_split(np.arange(mask.shape[1]), width)
    out = np.empty(height * width, dtype=np.int64)
    for r, row in enumerate(rows):
        for c, col in enumerate(cols):
            cell = mask[np.ix_(row, col)].ravel()
            out[r * width + c] = int(np.bincount(cell).argmax()) - 1
    return torch.from_numpy(out)


def read_parts(folder: str | Path) -> list[str]:
    """The part names of a parts folder (parts.json: {"names": [...]}, mask value k >= 1 is
    names[k - 1])."""
    path = Path(folder) / "parts.json"
    try:
        names = json.loads(path.read_text())["names"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: a parts folder needs parts.json with the part names"
                          f" ({{\"names\": [\"head\", ...]}}; mask value k is names[k-1]):"
                          f" {exc!s:.80}") from None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ConfigError(f"{path}: 'names' must be a non-empty list of part names.")
    return names


def part_mask(folder: str | Path, image_path: str, card: dict[str, Any], parts: int,
              image_root: str | Path | None = None) -> np.ndarray:
    """The mask of a store row's image (<folder>/<image path>.png, aligned with the image),
    put through the model's resize and center crop (nearest), in the model's input frame.
    With the images at hand (`image_root`), a mask of another size than its image is refused:
    it could not be aligned with it."""
    from PIL import Image

    from ..data.views import UNREADABLE, refuse_oversized

    path = (Path(folder) / image_path).with_suffix(".png")
    if not path.is_file():
        raise ConfigError(f"No part mask {path}: a parts folder holds one PNG per image, at the"
                          f" image's path with .png.")
    try:
        with Image.open(path) as opened:
            refuse_oversized(path, opened.size, None)
            opened.load()
            mask = opened.copy()
    except UNREADABLE as exc:
        raise ImageReadError(f"{path} is not a readable part mask PNG ({type(exc).__name__}:"
                             f" {exc!s:.80}): write the parts folder again (safe-cache parts),"
                             f" or replace that file with the image's mask.") from None
    labels = np.asarray(mask)
    if labels.ndim != 2 or labels.dtype != np.uint8 or labels.max() > parts:
        raise ConfigError(f"{path}: a part mask is one 8-bit channel of values 0..{parts} (0: no"
                          f" part), not {labels.shape} {labels.dtype} up to {labels.max()}.")
    image = Path(image_root) / image_path if image_root is not None else None
    if image is not None and image.is_file():
        try:
            with Image.open(image) as opened:
                size = opened.size
        except UNREADABLE as exc:
            raise ImageReadError(f"{image}: {exc!s:.120} (the image of the part mask {path};"
                                 f" replace or remove it).") from None
        if size != mask.size:
            raise ConfigError(f"{path} is {mask.size[0]} x {mask.size[1]} pixels and its image"
                              f" {image} {size[0]} x {size[1]}: a part mask must be aligned"
                              f" with its image, at its size.")
    return np.asarray(mask_view(mask, card))


def mask_view(mask: Any, card: dict[str, Any]) -> Any:
    """A label mask (PIL, mode L or P) through the backbone's eval resize and crop, as its
    image goes (model_view), with nearest-neighbour resampling: labels are not blended."""
    import copy as copying

    from open_clip.transform import PreprocessCfg, image_transform_v2
    from torchvision.transforms import InterpolationMode

    config = PreprocessCfg(size=tuple(card["image_size"]), mean=tuple(card["mean"]),
                           std=tuple(card["std"]), interpolation=card["interpolation"],
                           resize_mode=card["resize_mode"])
    for step in image_transform_v2(config, is_train=False).transforms:
        name = type(step).__name__
        if name in ("MaybeConvertMode", "MaybeToTensor", "ToTensor", "Normalize"):
            continue
        step = copying.copy(step)
        if hasattr(step, "interpolation"):
            step.interpolation = InterpolationMode.NEAREST
        mask = step(mask)
    return mask


def shapley_values(store_url: str, result_path: str | Path, rows: list[int], parts_dir: str,
                   split: str = "test", orders: int = 200,
                   image_root: str | Path | None = None) -> dict[str, Any]:
    """Each part's Shapley value for the original head, SAFE's and the blend, per store row."""
    from ..fit.text import result_classifier
    from ..model.inference import blend_features
    from ..store import open_store
    from .gradcam import checked_rows, result_heads

    store = open_store(store_url)
    original, tuned, result = result_heads(store, result_path)
    beta, mode = float(result.config["beta"]), str(result.config.get("blend", "blend"))
    masked = {"original": original.masked, "finetuned": tuned.masked,
              "blend": lambda x, keep: blend_features(original.masked(x, keep),
                                                      tuned.masked(x, keep), beta, mode)}
    names = read_parts(parts_dir)
    card = store.manifest["backbone"]
    dense, labels, paths = checked_rows(store, split, rows)
    classifier = result_classifier(result, store)  # the run's: its prompts, mined, tuned
    grid = tuple(card["token_grid"])
    images = []
    for index, path in enumerate(paths):
        tokens = token_parts(part_mask(parts_dir, path, card, len(names), image_root), grid)
        entry: dict[str, Any] = {"path": path, "label": int(labels[index]),
                                 "token_parts": tokens.tolist()}
        for name, feature in masked.items():
            value = class_probability(feature, dense[index], classifier,
                                      float(card["logit_scale"]), int(labels[index]))
            entry[name] = shapley(value, tokens, len(names), orders=orders)
        images.append(entry)
    return {"parts": names, "images": images, "classnames": store.manifest["dataset"][
        "classnames"], "card": card, "beta": beta, "mode": "tokens",
        "value": "true-class probability"}


HEADS = (("original", "original pooling"), ("finetuned", "SAFE's pooling"),
         ("blend", "SAFE's blend"))


def plot_shapley(values: dict[str, Any], image_root: str | Path | None, out: str | Path
                 ) -> list[Path]:
    """One PNG per image (the paper's Fig. 1): the image with its parts' tokens outlined, and
    each part's Shapley value for the three heads as bars (with Monte Carlo's error); and
    shapley.json with every value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_write_text
    from ..data.views import model_view

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names, card = values["parts"], values["card"]
    height, width = card["token_grid"]
    written = []
    for index, entry in enumerate(values["images"]):
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
        path = Path(image_root) / entry["path"] if image_root is not None else None
        parts = np.asarray(entry["token_parts"], dtype=float).reshape(height, width)
        shown = np.where(parts < 0, np.nan, parts)
        if path is not None and path.is_file():
            image = np.asarray(model_view(path, card))
            left.imshow(image)
            left.imshow(shown, cmap="tab10", alpha=0.45, vmin=0, vmax=9,
                        extent=(0, image.shape[1], image.shape[0], 0), interpolation="nearest")
        else:
            left.imshow(shown, cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
        label = values["classnames"][entry["label"]]
        left.set_title(f"{Path(entry['path']).name} ({label}): parts by token", fontsize=9)
        left.axis("off")
        positions = np.arange(len(names))
        for offset, (key, title) in zip((-0.27, 0.0, 0.27), HEADS, strict=True):
            result = entry[key]
            right.bar(positions + offset, result["phi"], width=0.27, yerr=result["stderr"]
                      if not result["exact"] else None, capsize=2, label=title)
        right.set_xticks(positions, names, rotation=30, ha="right", fontsize=8)
        right.axhline(0, color="grey", linewidth=0.8)
        how = "exact" if entry["original"]["exact"] else \
            f"Monte Carlo, {entry['original']['orders']} orders"
        how += ", pixels through the trunk" if values.get("mode") == "pixels" else ""
        right.set(ylabel="Shapley value (true-class probability)",
                  title=f"each part's share ({how})")
        right.title.set_fontsize(9)
        right.legend(fontsize=7)
        target = out / f"shapley_{index:03d}_{Path(entry['path']).stem}.png"
        figure.tight_layout()
        figure.savefig(target, dpi=100)
        plt.close(figure)
        written.append(target)
    record = {key: values[key] for key in ("parts", "images", "beta", "value")}
    record["mode"] = values.get("mode", "tokens")
    atomic_write_text(out / "shapley.json", json.dumps(record, indent=1))
    return written
