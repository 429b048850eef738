"""`safe-cache correspond`: semantic correspondence from stored dense maps (the paper's Eq. 1).

The dense maps of a source and of target images are upsampled bilinearly to the model's input
size; the cosine similarity of the source point's feature to every target pixel is a heat map,
whose argmax is the corresponding point. Dense maps come from the store (no trunk); the images
are shown as the model saw them (resize + center crop of the eval transform).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.views import load_image, model_view
from ..errors import SafeCacheError
from ..model.backbone import load_backbone
from ..store import open_store


def _feature_image(dense: np.ndarray, card: dict[str, Any]) -> torch.Tensor:
    """(T, C) stored tokens -> (C, H_img, W_img) upsampled feature image."""
    height, width = card["token_grid"]
    tokens = torch.from_numpy(dense.astype(np.float32))
    tokens = tokens[-height * width:]  # the patch grid: drop a class token / registers
    grid = tokens.T.reshape(1, -1, height, width)
    size = tuple(card["image_size"])
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0]


def similarity_maps(source: np.ndarray, targets: list[np.ndarray], point: tuple[int, int],
                    card: dict[str, Any]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Eq. (1) on dense maps (T, C): maps (targets, H_img, W_img) and argmax points (x, y)."""
    x, y = point
    source_feature = F.normalize(_feature_image(source, card)[:, y, x], dim=0)
    maps, best = [], []
    for target in targets:
        features = F.normalize(_feature_image(target, card), dim=0)
        similarity = torch.einsum("c,chw->hw", source_feature, features)
        index = int(similarity.argmax())
        maps.append(similarity.numpy())
        best.append((index % similarity.shape[1], index // similarity.shape[1]))
    return np.stack(maps), best


def correspond(store_url: str, source: int, point: tuple[int, int], targets: list[int],
               split: str = "test") -> dict[str, Any]:
    """Correspondence between store rows (dense maps from the store, no trunk)."""
    store = open_store(store_url)
    card = store.manifest["backbone"]
    check_point(point, card)
    rows = store.readable_row_ids(split, [source, *targets])
    dense = store.read_rows(split, "dense", rows)
    maps, best = similarity_maps(dense[0], list(dense[1:]), point, card)
    return {"maps": maps, "points": best, "source": (source, point),
            "paths": [str(p) for p in store.read_rows(split, "path", rows)], "card": card}


def check_point(point: tuple[int, int], card: dict[str, Any]) -> None:
    """A source point inside the model's input image (after resize and crop)."""
    height, width = card["image_size"]
    if not (0 <= point[0] < width and 0 <= point[1] < height):
        raise SafeCacheError(f"--point {point[0]},{point[1]} is outside the model's {width} x"
                             f" {height} input (x in 0..{width - 1}, y in 0..{height - 1}).")


def correspond_images(model: str, pretrained: str | None, source: str | Path,
                      point: tuple[int, int], targets: list[str | Path], *,
                      cut: str = "pool", init_seed: int = 0) -> dict[str, Any]:
    """Correspondence between image files: the trunk runs live, at any cut (`layer4` gives a
    ResNet's layer3 map, `lastN` a ViT's map N blocks from the end: the paper's Fig. 6)."""
    backbone = load_backbone(model, pretrained, cut=cut, init_seed=init_seed)
    check_point(point, backbone.card)
    images = torch.stack([backbone.preprocess(load_image(Path(p))) for p in [source, *targets]])
    with torch.no_grad():
        dense = backbone.forward_features(images).numpy()
    maps, best = similarity_maps(dense[0], list(dense[1:]), point, backbone.card)
    return {"maps": maps, "points": best, "source": (str(source), point),
            "paths": [str(p) for p in [source, *targets]], "card": backbone.card}


def plot_correspondence(result: dict[str, Any], image_root: str | Path | None,
                        out: str | Path) -> list[Path]:
    """One PNG per target (heat map over the target, argmax marked) and a grid of all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = [np.asarray(model_view(Path(image_root) / p, result["card"])) if image_root
              else None for p in result["paths"]]
    _, (x, y) = result["source"]
    written = []
    count = len(result["points"])
    grid, grid_axes = plt.subplots(1, count + 1, figsize=(3.2 * (count + 1), 3.4),
                                   squeeze=False)
    _draw_source(grid_axes[0][0], images[0], x, y, result["paths"][0])
    for index, (target_xy, heat) in enumerate(zip(result["points"], result["maps"],
                                                  strict=True)):
        figure, axes = plt.subplots(1, 2, figsize=(7, 3.4))
        _draw_source(axes[0], images[0], x, y, result["paths"][0])
        for axis in (axes[1], grid_axes[0][index + 1]):
            _draw_target(figure if axis is axes[1] else grid, axis, images[index + 1], heat,
                         target_xy, result["paths"][index + 1])
        target = out / f"correspond_{index:02d}_{Path(result['paths'][index + 1]).stem}.png"
        figure.tight_layout()
        figure.savefig(target, dpi=100)
        plt.close(figure)
        written.append(target)
    grid.tight_layout()
    grid.savefig(out / "correspond_grid.png", dpi=100)
    plt.close(grid)
    return [*written, out / "correspond_grid.png"]


def _draw_source(axis, image, x, y, path) -> None:
    if image is not None:
        axis.imshow(image)
    axis.scatter([x], [y], s=120, marker="x", color="cyan", linewidths=3)
    axis.set_title(f"source {Path(path).name}", fontsize=9)
    axis.axis("off")


def _draw_target(figure, axis, image, heat, point, path) -> None:
    if image is not None:
        axis.imshow(image)
    shown = axis.imshow(heat, cmap="jet", alpha=0.5 if image is not None else 1.0)
    figure.colorbar(shown, ax=axis, fraction=0.046, label="cosine similarity")
    axis.scatter([point[0]], [point[1]], s=120, marker="x", color="white", linewidths=3)
    axis.set_title(f"target {Path(path).name}", fontsize=9)
    axis.axis("off")
