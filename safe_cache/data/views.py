"""Image loading and the two kinds of views: the eval center view and seeded augmented views.

Every image safe-cache opens (extraction, predict, attention and correspondence plots) goes
through `load_image`, and every picture of what the model saw through `model_view`, which
applies the backbone card's own resize and crop (its interpolation and resize mode).

Augmented views follow Tip-Adapter's recipe (RandomResizedCrop scale (0.5, 1), bicubic, then a
horizontal flip with p=0.5, then the backbone's normalisation). Each (image, view) pair draws
from its own seed, derived from the recipe seed, the image path and the view index, so a rerun,
a resumed run or a run on another machine produces the same pixels regardless of batching or
worker order.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from ..errors import ImageReadError


@dataclass(frozen=True)
class ViewRecipe:
    """How a store's augmented views are made (recorded in its manifest)."""

    count: int = 10
    seed: int = 0
    augmentation: str = "RandomResizedCrop(scale=(0.5, 1), bicubic) + RandomHorizontalFlip(0.5)"
    scale: tuple[float, float] = (0.5, 1.0)
    decode: str = "pil"  # or "torchvision-<device type>" (extract --decode device)

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "scale": list(self.scale)}


MAX_PIXELS = 2 * 89_478_485  # PIL's own refusal threshold (a decompression bomb beyond it)
UNREADABLE = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


def refuse_oversized(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    """An ImageReadError naming the file when its header says more than `max_pixels` pixels
    (default PIL's bomb limit): checked before decoding, in every path that decodes."""
    width, height = size
    limit = max_pixels or MAX_PIXELS
    if width * height > limit:
        raise ImageReadError(f"{path}: {width} x {height} pixels is more than --max-pixels"
                             f" {limit:,}; raise --max-pixels if the image is genuine, or"
                             f" remove it")


def load_image(path: Path, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image as RGB; a clear error naming the file otherwise. Images
    of more than `max_pixels` pixels are refused before decoding (decompression bombs), like
    any unreadable image (so --skip-bad passes over them)."""
    try:
        with Image.open(path) as image:
            refuse_oversized(path, image.size, max_pixels)
            image.load()
            return image.convert("RGB")
    except UNREADABLE as exc:
        raise ImageReadError(f"{path}: {exc}") from exc


def model_view(path: Path, card: dict[str, Any]) -> Image.Image:
    """The image as the backbone's eval transform crops it, before normalisation: what the dense
    map's tokens cover (used to draw maps over images)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from torchvision.transforms import Normalize, ToTensor

    config = PreprocessCfg(size=tuple(card["image_size"]), mean=tuple(card["mean"]),
                           std=tuple(card["std"]), interpolation=card["interpolation"],
                           resize_mode=card["resize_mode"])
    image = load_image(path)
    for step in image_transform_v2(config, is_train=False).transforms:
        if not isinstance(step, (ToTensor, Normalize)):
            image = step(image)
    return image


def view_seed(recipe_seed: int, path: str, view: int) -> int:
    digest = hashlib.sha256(f"{recipe_seed}:{path}:{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def view_geometry(seed: int, height: int, width: int, scale: tuple[float, float]
                  ) -> tuple[int, int, int, int, bool]:
    """The seeded crop (top, left, height, width) and flip of one augmented view of an image of
    this size: RandomResizedCrop's draw, then the flip's; the PIL and the device paths both
    take their views from here, so a view covers the same region either way."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        top, left, h, w = RandomResizedCrop.get_params(torch.empty(1, height, width),
                                                       list(scale), [3 / 4, 4 / 3])
        flip = bool(torch.rand(1) < 0.5)
    return top, left, h, w, flip


def augmented_view(image: Image.Image, size: tuple[int, int], mean, std, seed: int,
                   scale: tuple[float, float] = (0.5, 1.0)) -> torch.Tensor:
    """One seeded training view (3, H, W), normalised like the eval view."""
    top, left, height, width, flip = view_geometry(seed, image.height, image.width, scale)
    view = TF.resized_crop(image, top, left, height, width, list(size),
                           interpolation=InterpolationMode.BICUBIC, antialias=True)
    if flip:
        view = TF.hflip(view)
    return TF.normalize(TF.to_tensor(view), mean, std)


class WorkItem(NamedTuple):
    """One image still to extract (extract/pipeline.plan_split makes them, unit by unit)."""

    row: int  # its row in the split's arrays
    file: Path  # where the image is read from
    key: str  # its path in the store (relative to the dataset's image folder)
    first_view: int  # the first augmented view its unit lacks (0: a new row, the center too)
    flip: bool  # its unit lacks the mirrored center view


class ViewDataset(torch.utils.data.Dataset):
    """Rows to extract -> (row, center view, augmented views, error message, first view, flip).

    Items are WorkItems: the center view is built when the row
    is new (first view 0) or its mirror is wanted (flip); views first..V-1 are built (all of
    them for a new row; only the missing ones when views were added to a store later). The
    mirrored center view is the center view flipped left-right, made by the caller. Errors are
    returned, not raised, so the main process can name the file and decide (stop, or
    --skip-bad) without a worker traceback.
    """

    def __init__(self, items: list[WorkItem], preprocess,
                 card: dict[str, Any], recipe: ViewRecipe | None,
                 max_pixels: int | None = None) -> None:
        self.items, self.preprocess, self.recipe = items, preprocess, recipe
        self.max_pixels = max_pixels
        self.size = tuple(card["image_size"])
        self.mean, self.std = card["mean"], card["std"]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        row, path, key, first, flip = self.items[index]
        height, width = self.size
        views = range(first, self.recipe.count) if self.recipe else range(0)
        try:
            image = load_image(path, self.max_pixels)
            center = self.preprocess(image) if first == 0 or flip \
                else torch.zeros(3, height, width)
            augmented = torch.stack([
                augmented_view(image, self.size, self.mean, self.std,
                               view_seed(self.recipe.seed, key, v), self.recipe.scale)
                for v in views
            ]) if len(views) else torch.zeros(0, 3, height, width)
            return row, center, augmented, "", first, flip
        except ImageReadError as exc:
            blank = torch.zeros(3, height, width)
            return row, blank, torch.zeros(len(views), 3, height, width), str(exc), first, flip
