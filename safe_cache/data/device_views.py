"""Views decoded and cropped on the trunk's device (`extract --decode device`).

On a GPU the DataLoader workers, decoding JPEGs with PIL and resizing them with PIL, are the
part of extraction that falls behind the trunk. With `--decode device` the workers only read
each file's bytes (and check its header); the main process hands a batch of JPEG bytes to
nvJPEG (`torchvision.io.decode_jpeg(..., device="cuda")`) and makes the center view and the
augmented views with torchvision's tensor transforms on the device. Other formats (PNG, ...)
and JPEGs nvJPEG cannot take (CMYK) are decoded by PIL in the worker, as before, and join the
batch as pixels.

What changes: the pixels. The resize is torchvision's antialiased bicubic on tensors, not PIL's
(the same kernel, different rounding and edge handling: on the CPU, a mean absolute difference
of about 0.05 grey levels of 255 and at most a few levels at sharp edges, which
tests/test_device_views.py bounds), and nvJPEG's IDCT is not libjpeg-turbo's. A store therefore
records how it was decoded (`views.decode`: "pil", or "torchvision-<device type>") and extract
refuses to add to a store made the other way: its rows
would come from two slightly different pixel pipelines. The crop parameters of the augmented
views are drawn exactly as the PIL path draws them (the same seeds, the same image size), so
each view covers the same region.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.io import decode_jpeg as _torchvision_decode_jpeg
from torchvision.transforms import CenterCrop, InterpolationMode, Resize

from ..errors import ConfigError, ImageReadError
from .views import (
    UNREADABLE,
    ViewRecipe,
    WorkItem,
    load_image,
    refuse_oversized,
    view_geometry,
    view_seed,
)


def decode_jpeg(data, **options):
    """torchvision's decode_jpeg (nvJPEG on CUDA). torchvision 0.29 marks its image decoders
    deprecated in favour of TorchCodec and warns on every call; the function is what this
    torchvision ships, so the warning is silenced here, once, rather than printed per batch.
    Moving to TorchCodec's decoder is the change to make when torchvision drops it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                message=".*decoding and encoding capabilities of TorchVision")
        return _torchvision_decode_jpeg(data, **options)


JPEG_MODES = ("RGB", "L")  # what decode_jpeg turns into RGB; CMYK / YCCK go through PIL


def read_encoded(path: Path, max_pixels: int | None = None) -> tuple[str, torch.Tensor]:
    """("jpeg", the file's bytes) for a JPEG the device can decode, else ("pixels", uint8
    (3, H, W) decoded by PIL). The header is checked first: a file PIL cannot identify, or one
    of more than `max_pixels` pixels, is an ImageReadError naming it, as in the PIL path."""
    try:
        with Image.open(path) as image:
            refuse_oversized(path, image.size, max_pixels)
            kind, mode = image.format, image.mode
    except UNREADABLE as exc:
        raise ImageReadError(f"{path}: {exc}") from exc
    if kind == "JPEG" and mode in JPEG_MODES:
        return "jpeg", torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
    return "pixels", TF.pil_to_tensor(load_image(path, max_pixels))


class EncodedDataset(torch.utils.data.Dataset):
    """WorkItems (views.py) -> what `collate_encoded` gathers: the
    workers' share of `--decode device` (read_encoded). Errors are returned, not raised, as
    ViewDataset does."""

    def __init__(self, items: list[WorkItem],
                 max_pixels: int | None = None) -> None:
        self.items, self.max_pixels = items, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row, path, key, first, flip = self.items[index]
        item = {"row": row, "path": str(path), "key": key, "first": first, "flip": flip,
                "error": ""}
        try:
            item["kind"], item["payload"] = read_encoded(path, self.max_pixels)
        except ImageReadError as exc:
            item.update(kind="error", payload=torch.zeros(0, dtype=torch.uint8), error=str(exc))
        return item


def collate_encoded(batch: list[dict[str, Any]]) -> dict[str, list]:
    """One list per field (payloads differ in size, so they cannot be stacked)."""
    return {name: [item[name] for item in batch] for name in batch[0]}


def center_steps(preprocess) -> list:
    """The geometric steps of the card's eval transform (open_clip's Compose), checked to be
    ones torchvision applies to tensors: Resize and CenterCrop (resize modes "shortest" and
    "squash"). open_clip's "longest" mode pads with PIL: refused, naming the fix."""
    steps = []
    for step in getattr(preprocess, "transforms", []):
        name = type(step).__name__
        if isinstance(step, (Resize, CenterCrop)):
            steps.append(step)
        elif name not in ("MaybeConvertMode", "MaybeToTensor", "ToTensor", "Normalize") \
                and getattr(step, "__name__", "") != "_convert_to_rgb":
            raise ConfigError(f"--decode device cannot apply this backbone's {name} to tensors"
                              f" (its resize mode); use --decode workers.")
    return steps


def _reason(exc: BaseException) -> str:
    """torchvision's message without its source-file prefix ("decode_jpeg, <file>:171, ...")."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(", ")[-1][:160]


class DeviceViews:
    """Decode a batch on `device` and make its center and augmented views there."""

    def __init__(self, card: dict[str, Any], preprocess, recipe: ViewRecipe | None,
                 device: torch.device) -> None:
        self.steps, self.recipe, self.device = center_steps(preprocess), recipe, device
        self.size = tuple(card["image_size"])
        self.mean = torch.tensor(card["mean"], device=device).view(3, 1, 1)
        self.std = torch.tensor(card["std"], device=device).view(3, 1, 1)

    def decode(self, batch: dict[str, list], errors: list[str]) -> list[torch.Tensor | None]:
        """uint8 (3, H, W) images on the device; None where `errors` gets the file's reason."""
        kinds, payloads = batch["kind"], batch["payload"]
        images: list[torch.Tensor | None] = [
            p.to(self.device, non_blocking=True) if k == "pixels" else None
            for k, p in zip(kinds, payloads, strict=True)]
        jpegs = [i for i, kind in enumerate(kinds) if kind == "jpeg"]
        if not jpegs:
            return images
        try:
            decoded = decode_jpeg([payloads[i] for i in jpegs], mode=ImageReadMode.RGB,
                                  device=self.device)
        except torch.OutOfMemoryError:
            raise  # extract's one-line out-of-memory error, never a skipped image
        except RuntimeError:  # one bad file fails the batch: find it
            decoded = [self._decode_one(payloads[i], batch["path"][i], errors, i)
                       for i in jpegs]
        for i, image in zip(jpegs, decoded, strict=True):
            images[i] = image
        return images

    def _decode_one(self, payload, path, errors, index) -> torch.Tensor | None:
        try:
            return decode_jpeg(payload, mode=ImageReadMode.RGB, device=self.device)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            errors[index] = f"{path}: cannot decode this JPEG ({_reason(exc)})"
            return None

    def center(self, image: torch.Tensor) -> torch.Tensor:
        """The card's eval view: its Resize / CenterCrop on the tensor, rounded to uint8 levels
        as PIL's resize is, then scaled and normalised."""
        view = image.float()
        for step in self.steps:
            view = step(view)
        return self._normalise(view)

    def augmented(self, image: torch.Tensor, key: str, view: int) -> torch.Tensor:
        """View `view` of the recipe: the PIL path's crop and flip (same seed, same size)."""
        recipe = self.recipe
        top, left, h, w, flip = view_geometry(view_seed(recipe.seed, key, view),
                                              *image.shape[-2:], recipe.scale)
        out = TF.resized_crop(image.float(), top, left, h, w, list(self.size),
                              interpolation=InterpolationMode.BICUBIC, antialias=True)
        return self._normalise(out.flip(-1) if flip else out)

    def _normalise(self, view: torch.Tensor) -> torch.Tensor:
        return (view.round().clamp(0, 255) / 255 - self.mean) / self.std

    def __call__(self, batch: dict[str, list]) -> tuple:
        """A collated batch -> (rows, centers (B, 3, H, W), augmented (B, V, 3, H, W), errors,
        first views, flips), as ViewDataset's batches come: views on the device, unreadable
        images as zeros with their reason in errors."""
        errors = list(batch["error"])
        images = self.decode(batch, errors)
        height, width = self.size
        zeros = torch.zeros(3, height, width, device=self.device)
        centers, augmented = [], []
        for image, key, first, flip in zip(images, batch["key"], batch["first"], batch["flip"],
                                           strict=True):
            views = range(first, self.recipe.count) if self.recipe else range(0)
            if image is None:
                centers.append(zeros)
                augmented.append(zeros.expand(len(views), 3, height, width))
                continue
            centers.append(self.center(image) if first == 0 or flip else zeros)
            augmented.append(torch.stack([self.augmented(image, key, v) for v in views])
                             if len(views) else zeros.new_zeros(0, 3, height, width))
        return (torch.tensor(batch["row"]), torch.stack(centers), torch.stack(augmented),
                errors, torch.tensor(batch["first"]), torch.tensor(batch["flip"]))
