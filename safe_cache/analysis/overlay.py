"""One map drawn over the image it explains (attention, gradcam), or alone without the image."""

from __future__ import annotations

from typing import Any

import numpy as np


def draw_map(axis: Any, image: np.ndarray | None, values: np.ndarray, cmap: str,
             alpha: float) -> Any:
    """`values` (H, W) over `image`, stretched to its size and smoothed; without an image the
    map alone, one cell per token. Returns the mappable for a colorbar."""
    if image is None:
        return axis.imshow(values, cmap=cmap, interpolation="nearest")
    axis.imshow(image)
    extent = (0, image.shape[1], image.shape[0], 0)
    return axis.imshow(values, cmap=cmap, alpha=alpha, extent=extent, interpolation="bilinear")
