"""`extract --decode device`: views decoded and cut by torchvision on the trunk's device (the CPU
here; nvJPEG on CUDA is the GPU check's), close to the PIL path's pixels, the same crops, bad
files named, and a store that keeps one way of decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import extract_miniature
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from safe_cache.data import device_views
from safe_cache.data.device_views import (
    DeviceViews,
    EncodedDataset,
    center_steps,
    collate_encoded,
    read_encoded,
)
from safe_cache.data.views import ViewDataset, ViewRecipe, WorkItem
from safe_cache.errors import ConfigError, ExtractError
from safe_cache.store import open_store

RECIPE = ViewRecipe(count=3, seed=0)


def pictures(folder, count: int = 4) -> list:
    """JPEGs with shapes and gradients (edges, where the two resizes differ most)."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        y, x = np.mgrid[0:180 + 20 * i, 0:240]
        image = np.stack([x % 256, y % 256, (x * y) % 256], -1).astype(np.uint8)
        image[40:90, 60:150] = rng.integers(0, 256, 3)
        path = folder / f"p{i}.jpg"
        Image.fromarray(image).save(path, quality=90)
        paths.append(path)
    return paths


def both_ways(backbone, paths, first: int = 0, flip: bool = True):
    """(PIL's centers, views), (the device path's centers, views), errors, in grey levels."""
    items = [WorkItem(i, p, f"key/{i}", first, flip) for i, p in enumerate(paths)]
    dataset = ViewDataset(items, backbone.preprocess, backbone.card, RECIPE)
    pil = [dataset[i] for i in range(len(items))]
    batch = collate_encoded([EncodedDataset(items)[i] for i in range(len(items))])
    _, centers, views, errors, _, _ = DeviceViews(backbone.card, backbone.preprocess, RECIPE,
                                                  torch.device("cpu"))(batch)
    std = torch.tensor(backbone.card["std"]).view(3, 1, 1) * 255
    return ((torch.stack([p[1] for p in pil]) * std, torch.stack([p[2] for p in pil]) * std),
            (centers * std, views * std), errors)


@pytest.mark.parametrize("model", ["safe-cache-tiny-rn", "safe-cache-tiny-vit"])
def test_device_views_are_pils_within_a_few_grey_levels(model, load_cached, tmp_path):
    (pil_centers, pil_views), (centers, views), errors = both_ways(load_cached(model),
                                                                   pictures(tmp_path))
    assert errors == [""] * 4
    assert centers.shape == pil_centers.shape and views.shape == pil_views.shape == (4, 3, 3,
                                                                                     *centers.shape[-2:])
    for ours, theirs in ((centers, pil_centers), (views, pil_views)):
        difference = (ours - theirs).abs()
        assert difference.mean() < 0.25 and difference.max() <= 16  # levels of 255
    # the same crop and flip per view: another view's pixels are far off
    assert (views[:, 0] - pil_views[:, 1]).abs().mean() > 10


def test_only_missing_views_and_no_center_when_the_row_has_one(load_cached, tmp_path):
    backbone = load_cached("safe-cache-tiny-rn")
    (_, pil_views), (centers, views), _ = both_ways(backbone, pictures(tmp_path, 2), first=2,
                                                    flip=False)
    assert views.shape[1] == 1 and centers.abs().sum() == 0  # view 2 only, no center view
    assert (views - pil_views).abs().mean() < 0.25


def test_what_the_workers_hand_over(tmp_path):
    jpeg, png, grey, cmyk = (tmp_path / n for n in ("a.jpg", "b.png", "c.jpg", "d.jpg"))
    Image.new("RGB", (40, 30), (200, 10, 10)).save(jpeg)
    Image.new("RGB", (40, 30), (10, 200, 10)).save(png)
    Image.new("L", (40, 30), 128).save(grey)
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(cmyk)
    assert read_encoded(jpeg)[0] == "jpeg" and read_encoded(grey)[0] == "jpeg"
    kind, pixels = read_encoded(jpeg)
    assert pixels.dtype == torch.uint8 and bytes(pixels[:2].tolist()) == b"\xff\xd8"
    for path in (png, cmyk):  # PIL decodes them in the worker
        kind, pixels = read_encoded(path)
        assert kind == "pixels" and pixels.shape == (3, 30, 40)
    with pytest.raises(Exception, match="more than --max-pixels 100"):
        read_encoded(jpeg, max_pixels=100)


def test_a_bad_file_is_named_and_the_rest_of_the_batch_decodes(load_cached, tmp_path):
    backbone = load_cached("safe-cache-tiny-rn")
    paths = pictures(tmp_path, 3)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[:len(data) // 3])  # a header PIL reads, data cut short
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    items = [WorkItem(i, p, f"k{i}", 0, False) for i, p in enumerate([*paths, text])]
    batch = collate_encoded([EncodedDataset(items)[i] for i in range(len(items))])
    _, centers, _, errors, _, _ = DeviceViews(backbone.card, backbone.preprocess, RECIPE,
                                              torch.device("cpu"))(batch)
    assert errors[0] == errors[2] == ""
    assert str(paths[1]) in errors[1] and "truncated" in errors[1]
    assert "/csrc/" not in errors[1]  # torchvision's source path is dropped
    assert str(text) in errors[3]
    assert centers[1].abs().sum() == 0 and centers[0].abs().sum() > 0


def test_out_of_memory_while_decoding_is_not_a_bad_image(load_cached, tmp_path, monkeypatch):
    backbone = load_cached("safe-cache-tiny-rn")
    items = [WorkItem(0, pictures(tmp_path, 1)[0], "k", 0, False)]
    batch = collate_encoded([EncodedDataset(items)[0]])

    def full(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(device_views, "decode_jpeg", full)
    with pytest.raises(torch.OutOfMemoryError):
        DeviceViews(backbone.card, backbone.preprocess, RECIPE, torch.device("cpu"))(batch)


def test_a_resize_mode_tensors_cannot_take_is_refused():
    config = PreprocessCfg(size=(64, 64), mode="RGB", mean=(0.5,) * 3, std=(0.5,) * 3,
                           interpolation="bicubic", resize_mode="longest")
    with pytest.raises(ConfigError, match="use --decode workers"):
        center_steps(image_transform_v2(config, is_train=False))
    squash = image_transform_v2(PreprocessCfg(size=(64, 64), resize_mode="squash"), False)
    assert len(center_steps(squash)) == 1


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_extract_on_the_device_and_a_store_keeps_one_way(tmp_path):
    model = "safe-cache-tiny-rn"
    device = extract_miniature(tmp_path / "data", model, tmp_path / "device.zarr",
                               decode="device")
    workers = extract_miniature(tmp_path / "data", model, tmp_path / "workers.zarr")
    with open_store(str(device)) as ours, open_store(str(workers)) as theirs:
        assert ours.manifest["views"]["decode"] == "torchvision-cpu"
        assert theirs.manifest["views"]["decode"] == "pil"
        for split in ("train", "test"):
            rows = theirs.readable_rows(split)
            assert np.array_equal(ours.readable_rows(split), rows)
            a = ours.read_rows(split, "pooled", rows)
            b = theirs.read_rows(split, "pooled", rows)
            assert np.abs(a - b).max() <= 0.05 * np.abs(b).max()  # a few grey levels apart
    with pytest.raises(ExtractError, match="--decode device --device cpu"):
        extract_miniature(tmp_path / "data", model, device)  # workers onto a device store
    with pytest.raises(ExtractError, match="--decode workers"):
        extract_miniature(tmp_path / "data", model, workers, decode="device")


@pytest.mark.slow
def test_skip_bad_passes_over_an_undecodable_jpeg(tmp_path):
    from miniatures import write_split_zhou

    from safe_cache.data.datasets import load_spec
    from safe_cache.extract import ExtractConfig, extract

    split = write_split_zhou(tmp_path / "data", "food101", classes=3)
    spec = load_spec("food101")
    bad = tmp_path / "data" / spec.folder / spec.image_dir / split["test"][0][0]
    bad.write_bytes(bad.read_bytes()[:300])
    config = ExtractConfig(dataset="food101", root=str(tmp_path / "data"),
                           model="safe-cache-tiny-rn", pretrained=None, shots=(1,), seeds=(1,),
                           views=1, workers=0, decode="device",
                           store=str(tmp_path / "s.zarr"))
    with pytest.raises(ExtractError, match=split["test"][0][0]):
        extract(config)
    from dataclasses import replace

    report = extract(replace(config, skip_bad=True))
    assert [s["split"] for s in report.skipped] == ["test"]
    assert split["test"][0][0] in report.skipped[0]["error"]
