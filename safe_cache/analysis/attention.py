"""`safe-cache attention`: where the pooling looks, before and after fine-tuning, from a store
and a fit result; no trunk needed. These are the pooling query's attention weights of the
original head and of the fine-tuned head alone (not the blend): not the paper's Fig. 7, which
is Grad-CAM (`safe-cache gradcam`, analysis/gradcam.py, for the three heads).

The pooling query (the mean token for ResNets, the class token for ViTs) attends over the query
token itself and every spatial position; the maps show the weights of the spatial positions on
the dense grid, averaged over heads (or per head), for the original head and the fine-tuned one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.views import model_view
from ..store import open_store
from .gradcam import checked_rows, result_heads
from .overlay import draw_map


def attention_maps(store_url: str, result_path: str | Path, rows: list[int],
                   split: str = "test") -> dict[str, Any]:
    """Spatial pooling attention of the original and the fine-tuned head for store rows.

    Returns {"paths", "labels", "original", "finetuned"}; the maps are (images, heads, H, W),
    each image's map summing to at most 1 (the rest is the query token's own weight).
    """
    store = open_store(store_url)
    card = store.manifest["backbone"]
    # the result fitted on this store, its files its own, its head finite; the rows readable,
    # their chunks present and finite (gradcam's checks: an explanation of the head it names)
    original, finetuned, result = result_heads(store, result_path)
    dense, labels, paths = checked_rows(store, split, rows)
    height, width = card["token_grid"]
    maps = {}
    with torch.no_grad():
        for name, head in (("original", original), ("finetuned", finetuned)):
            # (B, heads, keys): the patch grid is the last H*W keys, after the mean token
            # (ResNet), the class token (ViT, CoCa, PE-Core) or nothing (SigLIP)
            weights = head.eval().attention(dense)
            patches = weights[:, :, -height * width:]
            maps[name] = patches.reshape(len(paths), -1, height, width).numpy()
    return {"paths": paths, "labels": labels.tolist(), **maps,
            "classnames": store.manifest["dataset"]["classnames"], "card": card,
            "result": result}


def plot_attention(maps: dict[str, Any], image_root: str | Path | None, out: str | Path,
                   per_head: bool = False) -> list[Path]:
    """One PNG per image: the image, the original and the fine-tuned attention overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, path in enumerate(maps["paths"]):
        image = None
        if image_root is not None and (Path(image_root) / path).is_file():
            image = np.asarray(model_view(Path(image_root) / path, maps["card"]))
        panels = [("original pooling", maps["original"][index]),
                  ("fine-tuned pooling (SAFE)", maps["finetuned"][index])]
        heads = panels[0][1].shape[0] if per_head else 1
        figure, axes = plt.subplots(heads, 3, figsize=(10, 3.4 * heads), squeeze=False)
        for row in range(heads):
            _image_panel(axes[row][0], image, maps, index)
            for column, (title, values) in enumerate(panels, start=1):
                values = values[row] if per_head else values.mean(axis=0)
                axis = axes[row][column]
                shown = draw_map(axis, image, values, "inferno", 0.6)
                axis.set_title(title + (f", head {row}" if per_head else ""), fontsize=9)
                axis.axis("off")
                figure.colorbar(shown, ax=axis, fraction=0.046, label="attention weight")
        target = out / f"attention_{index:03d}_{Path(path).stem}.png"
        figure.suptitle("pooling attention weights of the query over the positions (each head"
                        " alone, not the blend; Grad-CAM: safe-cache gradcam)", fontsize=8)
        figure.tight_layout()
        figure.savefig(target, dpi=100)
        plt.close(figure)
        written.append(target)
    return written


def _image_panel(axis, image, maps, index) -> None:
    label = maps["classnames"][maps["labels"][index]]
    if image is not None:
        axis.imshow(image)
    axis.set_title(f"{Path(maps['paths'][index]).name} ({label})", fontsize=9)
    axis.axis("off")
