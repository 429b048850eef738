"""`safe-cache shapley --mode pixels`: the parts' Shapley values through the whole model, live.

The token mode (shapley.py) removes absent parts' tokens from the pool: cheap, from the store,
but the trunk saw the whole image, so a token of the head still carries its context. Here the
absent parts are removed from the image itself and the whole model runs again: one trunk pass
per coalition (2^P for P <= 8 parts, exactly; Monte Carlo over orders beyond, as the token
mode), each pass serving the original pooling, SAFE's pooling and the blend. For a few images:
each costs up to 256 trunk passes.

An absent part's pixels are filled with the preprocessing mean, i.e. 0 after normalisation: the
dataset's mean colour, the least informative constant the model knows, rather than black (an
extreme colour of its own) or noise (a second random draw per coalition). Pixels of no part
always stay, as the tokens of no part do in the token mode. The mask is in the model's input
frame (the image's resize and crop, nearest), so it lines up with the preprocessed pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .shapley import Value, coalition_keep, part_mask, read_parts, shapley, token_parts

FILL = "the preprocessing mean (0 after normalisation)"


def pixel_index(mask: np.ndarray) -> tuple[list[int], torch.Tensor]:
    """(the parts present, sorted; each pixel's position among them, -1 for no part) of a
    label mask (H, W) (k >= 1 is part k - 1), the pixels flattened row by row."""
    present = sorted(int(v) - 1 for v in np.unique(mask) if v)
    position = np.full(int(mask.max()) + 1, -1, dtype=np.int64)
    position[[p + 1 for p in present]] = np.arange(len(present))
    return present, torch.from_numpy(position[mask.astype(np.int64).ravel()])


def masked_images(image: torch.Tensor, index: torch.Tensor, keep: torch.Tensor
                  ) -> torch.Tensor:
    """(N, 3, H, W): the normalised image (3, H, W) once per coalition (keep (N, P) over the
    parts present), each absent part's pixels at 0, the preprocessing mean."""
    kept = coalition_keep(index, keep).view(len(keep), 1, *image.shape[1:])
    return image[None] * kept


class PixelGame:
    """Every coalition's value for each head: one trunk pass per coalition, kept (Monte Carlo's
    orders meet the same coalitions again, and the three heads share each pass)."""

    def __init__(self, trunk: Any, features: dict[str, Any], image: torch.Tensor,
                 index: torch.Tensor, classifier: torch.Tensor, scale: float, label: int,
                 batch: int = 16) -> None:
        self.trunk, self.features, self.image, self.index = trunk, features, image, index
        self.classifier, self.scale, self.label, self.batch = classifier, scale, label, batch
        self.known: dict[bytes, dict[str, float]] = {}

    @property
    def passes(self) -> int:
        """The trunk passes run so far (the distinct coalitions asked for)."""
        return len(self.known)

    def _run(self, keep: torch.Tensor) -> None:
        with torch.no_grad():
            dense = self.trunk(masked_images(self.image, self.index, keep))
            found = {name: (self.scale * F.normalize(feature(dense), dim=-1)
                            @ self.classifier.T).softmax(-1)[:, self.label]
                     for name, feature in self.features.items()}
        for row, key in enumerate(keep.numpy()):
            self.known[key.tobytes()] = {name: float(p[row]) for name, p in found.items()}

    def value(self, head: str) -> Value:
        """v(keep (N, P) over the parts present) for one head, running the new coalitions."""
        def value(keep: torch.Tensor) -> torch.Tensor:
            keys = [row.tobytes() for row in keep.numpy()]
            first: dict[bytes, int] = {}
            for row, key in enumerate(keys):
                if key not in self.known:
                    first.setdefault(key, row)
            new = list(first.values())
            for lo in range(0, len(new), self.batch):
                self._run(keep[new[lo:lo + self.batch]])
            return torch.tensor([self.known[key][head] for key in keys], dtype=torch.float64)
        return value


def pixel_shapley_values(store_url: str, result_path: str | Path, rows: list[int],
                         parts_dir: str, image_root: str | Path, split: str = "test",
                         orders: int = 200, batch: int = 16) -> dict[str, Any]:
    """shapley_values' record, each coalition's value the whole model on the image with the
    absent parts' pixels at the mean (the store's backbone run live on the rows' images)."""
    from ..data.views import load_image
    from ..fit.text import result_classifier
    from ..store import open_store
    from .gradcam import checked_rows, head_features, store_backbone

    store = open_store(store_url)
    features, result = head_features(store, result_path)
    names = read_parts(parts_dir)
    card = store.manifest["backbone"]
    _, labels, paths = checked_rows(store, split, rows)
    missing = [p for p in paths if not (Path(image_root) / p).is_file()]
    if missing:
        raise ConfigError(f"--mode pixels runs the model on the images:"
                          f" {Path(image_root) / missing[0]} is not a file (--image-root is the"
                          f" dataset's image folder).")
    backbone = store_backbone(store)
    classifier = result_classifier(result, store)  # the run's: its prompts, mined, tuned
    images = []
    for path, label in zip(paths, labels.tolist(), strict=True):
        mask = part_mask(parts_dir, path, card, len(names), image_root)
        present, index = pixel_index(mask)
        image = backbone.preprocess(load_image(Path(image_root) / path))
        game = PixelGame(backbone.trunk, features, image, index, classifier,
                         float(card["logit_scale"]), int(label), batch)
        entry: dict[str, Any] = {"path": path, "label": int(label), "token_parts":
                                 token_parts(mask, tuple(card["token_grid"])).tolist()}
        for name in features:
            entry[name] = shapley(game.value(name), torch.tensor(present, dtype=torch.long),
                                  len(names), orders=orders)
        entry["trunk_passes"] = game.passes
        images.append(entry)
    return {"parts": names, "images": images, "classnames": store.manifest["dataset"][
        "classnames"], "card": card, "beta": float(result.config["beta"]), "mode": "pixels",
        "value": f"true-class probability, absent parts' pixels at {FILL}"}
