"""Stage 1 end to end on generated food101-layout miniatures with the tiny models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import raw_split, whole
from miniatures import write_split_zhou

from safe_cache import ExtractError, StoreError, load_backbone
from safe_cache.data.datasets import open_dataset
from safe_cache.data.fewshot import sample_few_shot
from safe_cache.data.prompts import class_sentences, text_classifier
from safe_cache.data.views import augmented_view, load_image, view_seed
from safe_cache.extract import ExtractConfig, extract
from safe_cache.store import StoreLayout, open_store

VIEWS = 3


def config(root: Path, store: Path, model: str, **overrides) -> ExtractConfig:
    values = dict(dataset="food101", root=str(root), model=model, pretrained=None,
                  store=str(store), shots=(1, 2), seeds=(1, 2), views=VIEWS, workers=0)
    values.update(overrides)
    return ExtractConfig(**values)


@pytest.fixture(scope="module", params=["safe-cache-tiny-rn", pytest.param(
    "safe-cache-tiny-vit", marks=pytest.mark.slow)])
def extracted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_split_zhou(root, "food101", classes=4)
    store = root / "store.zarr"
    # The slow family through a decoding process (the real reader path), the fast one
    # in-process: a worker's start costs about a second, and the reader is the family's own
    workers = 0 if request.param == "safe-cache-tiny-rn" else 1
    report = extract(config(root, store, request.param, workers=workers))
    return root, store, request.param, report


def test_store_holds_the_expected_rows(extracted):
    root, store_path, _, report = extracted
    dataset = open_dataset("food101", root)
    store = open_store(str(store_path))
    test_paths = set(store.split("test")["path"].values.tolist())
    assert test_paths == {e.path for e in dataset.splits["test"]}
    for seed in (1, 2):
        for shots in (1, 2):
            subset = sample_few_shot([e.label for e in dataset.splits["train"]],
                                     [e.label for e in dataset.splits["val"]], shots, seed)
            train_rows, val_rows = store.fewshot(seed, shots)
            paths = store.row_paths("train")
            assert [paths[r] for r in train_rows] == [dataset.splits["train"][i].path
                                                      for i in subset.train]
            val_paths = store.row_paths("val")
            assert [val_paths[r] for r in val_rows] == [dataset.splits["val"][i].path
                                                        for i in subset.val]
    assert report.rows["test"] == len(dataset.splits["test"])


def test_features_equal_the_backbone_on_the_eval_transform(extracted):
    root, store_path, model, _ = extracted
    backbone = load_backbone(model)
    dataset = open_dataset("food101", root)
    view = open_store(str(store_path)).split("test").isel(image=[0, 3, 5])
    images = torch.stack([backbone.preprocess(load_image(dataset.image_root / p))
                          for p in view["path"].values])
    with torch.no_grad():
        dense = backbone.trunk(images)
        pooled = backbone.model.encode_image(images, normalize=False)
    stored = torch.from_numpy(view["dense"].values.astype(np.float32))
    assert torch.allclose(stored, dense, rtol=2e-3, atol=2e-3 * dense.abs().max().item())
    stored_pooled = torch.from_numpy(view["pooled"].values)
    assert (stored_pooled - pooled).abs().max() <= 1e-4 * pooled.abs().max()


def test_augmented_views_differ_and_are_reproducible(extracted):
    root, store_path, model, _ = extracted
    backbone = load_backbone(model)
    dataset = open_dataset("food101", root)
    train = open_store(str(store_path)).split("train").isel(image=[0, 1])
    aug, center = train["aug_dense"].values, train["dense"].values
    assert aug.shape[1] == VIEWS
    for i in range(2):
        for v in range(VIEWS):
            assert not np.allclose(aug[i, v], center[i])
            for w in range(v):
                assert not np.allclose(aug[i, v], aug[i, w])
    path = str(train["path"].values[0])
    image = load_image(dataset.image_root / path)
    card = backbone.card
    again = augmented_view(image, tuple(card["image_size"]), card["mean"], card["std"],
                           view_seed(0, path, 1))
    with torch.no_grad():
        dense = backbone.trunk(again[None])[0]
    assert torch.allclose(torch.from_numpy(aug[0, 1].astype(np.float32)), dense,
                          rtol=2e-3, atol=2e-3 * dense.abs().max().item())


def test_text_classifier_is_stored(extracted):
    root, store_path, model, _ = extracted
    backbone = load_backbone(model)
    dataset = open_dataset("food101", root)
    expected = text_classifier(backbone.model, backbone.tokenizer(),
                               class_sentences("hand", dataset.classnames,
                                               dataset.spec.templates))
    stored = open_store(str(store_path)).classifier("hand")
    np.testing.assert_allclose(stored, expected.numpy(), atol=1e-6)


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_more_seeds_extract_only_what_is_missing(tmp_path):
    write_split_zhou(tmp_path, "food101", classes=3)
    store = tmp_path / "s.zarr"
    first = extract(config(tmp_path, store, "safe-cache-tiny-rn", shots=(1,), seeds=(1,)))
    second = extract(config(tmp_path, store, "safe-cache-tiny-rn", shots=(1, 2), seeds=(1, 2)))
    assert first.extracted["train"] == 3 and second.extracted["test"] == 0
    union = len({i for s in (1, 2) for k in (1, 2) for i in sample_few_shot(
        [e.label for e in open_dataset("food101", tmp_path).splits["train"]],
        [e.label for e in open_dataset("food101", tmp_path).splits["val"]], k, s).train})
    assert second.extracted["train"] == union - 3
    assert second.rows["train"] == union


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_another_backbone_is_refused(tmp_path):
    write_split_zhou(tmp_path, "food101", classes=2)
    store = tmp_path / "s.zarr"
    extract(config(tmp_path, store, "safe-cache-tiny-rn", shots=(1,), seeds=(1,)))
    with pytest.raises(StoreError, match=r"safe-cache-tiny-rn.*safe-cache-tiny-vit"):
        extract(config(tmp_path, store, "safe-cache-tiny-vit", shots=(1,), seeds=(1,)))


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_a_corrupt_image_stops_with_its_path_or_is_skipped(tmp_path):
    split = write_split_zhou(tmp_path, "food101", classes=2)
    bad = split["test"][1][0]
    (tmp_path / "food-101" / "images" / bad).write_bytes(b"not an image")
    store = tmp_path / "s.zarr"
    with pytest.raises(ExtractError, match=bad.replace("/", ".")):
        extract(config(tmp_path, store, "safe-cache-tiny-rn", shots=(1,), seeds=(1,)))
    assert open_store(str(store)).complete_units("test").size == 0  # nothing partial
    report = extract(config(tmp_path, store, "safe-cache-tiny-rn", shots=(1,), seeds=(1,),
                            skip_bad=True))
    assert [s["split"] for s in report.skipped] == ["test"]
    reopened = open_store(str(store))
    assert bad not in reopened.split("test")["path"].values.tolist()
    assert any(bad in s["error"] for s in reopened.manifest["skipped_images"])


def _run_cli(root: Path, store: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "safe_cache.cli", "extract", "--dataset", "food101",
               "--root", str(root), "--model", "safe-cache-tiny-rn", "--pretrained", "none",
               "--store", str(store), "--shots", "1,2", "--seeds", "1", "--views", "2",
               "--workers", "0", "--batch-size", "8", "--json"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_sigkill_midway_then_resume_gives_identical_arrays(tmp_path):
    write_split_zhou(tmp_path, "food101", classes=4,
                     counts={"train": 6, "val": 4, "test": 200})
    killed, clean = tmp_path / "killed.zarr", tmp_path / "clean.zarr"
    process = _run_cli(tmp_path, killed)
    deadline = time.time() + 120
    done_at_kill = None
    while time.time() < deadline and process.poll() is None:
        try:
            done = open_store(str(killed)).complete_units("test").size
        except (StoreError, KeyError):  # not created yet, or its test split not yet
            done = 0
        if done >= 3:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            done_at_kill = done
            break
        time.sleep(0.01)
    assert done_at_kill is not None, "the extraction finished before it could be killed"
    assert open_store(str(killed)).complete_units("test").size < 25  # really midway
    resumed = _run_cli(tmp_path, killed)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    assert _run_cli(tmp_path, clean).wait(timeout=300) == 0
    a, b = open_store(str(killed)), open_store(str(clean))
    for split in ("train", "val", "test"):
        raw_a, raw_b = raw_split(killed, split), raw_split(clean, split)
        for name in raw_a.array_keys():
            assert np.array_equal(raw_a[name][:], raw_b[name][:]), name
    for seed_shots in ((1, 1), (1, 2)):
        for x, y in zip(a.fewshot(*seed_shots), b.fewshot(*seed_shots), strict=True):
            assert np.array_equal(x, y)
    assert np.array_equal(a.classifier(), b.classifier())


@pytest.mark.slow  # three extractions
def test_more_views_later_extract_only_the_new_views(tmp_path):
    write_split_zhou(tmp_path, "food101", classes=3)
    grown, fresh = tmp_path / "grown.zarr", tmp_path / "fresh.zarr"
    extract(config(tmp_path, grown, "safe-cache-tiny-rn", shots=(2,), seeds=(1,), views=2))
    before = whole(open_store(str(grown)), "train", "aug_dense")
    report = extract(config(tmp_path, grown, "safe-cache-tiny-rn", shots=(2,), seeds=(1,),
                            views=3))
    assert report.extracted["test"] == 0 and report.extracted["train"] == report.rows["train"]
    extract(config(tmp_path, fresh, "safe-cache-tiny-rn", shots=(2,), seeds=(1,), views=3))
    a, b = open_store(str(grown)), open_store(str(fresh))
    assert a.manifest["views"]["count"] == 3
    after = whole(a, "train", "aug_dense")
    assert np.array_equal(after[:, :2], before)  # existing views untouched
    np.testing.assert_allclose(after.astype(np.float32), whole(b, "train", "aug_dense")
                               .astype(np.float32), rtol=2e-3, atol=2e-3)
    assert a.readable_rows("train").tolist() == b.readable_rows("train").tolist()
    from safe_cache.store.verify import verify_store

    assert verify_store(str(grown)) == []


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_several_writer_threads_write_the_same_store(tmp_path):
    """Units written by 3 threads at once: the same arrays and completion flags as by one."""
    write_split_zhou(tmp_path, "food101", classes=4)
    stores = {}
    for threads in (1, 3):
        url = tmp_path / f"t{threads}.zarr"
        extract(config(tmp_path, url, "safe-cache-tiny-rn", workers=0, batch_size=2,
                       writer_threads=threads, layout=StoreLayout(chunk_images=2)))
        stores[threads] = url
    for split in ("train", "val", "test"):
        one, three = raw_split(stores[1], split), raw_split(stores[3], split)
        for name in ("dense", "pooled", "complete"):
            assert np.array_equal(one[name][:], three[name][:]), (split, name)
        assert three["complete"][:].all()


def test_workers_auto_is_every_usable_core_but_one(monkeypatch):
    from safe_cache.runtime import threads
    from safe_cache.runtime.cluster import auto_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(threads, "cgroup_quota", lambda: None)
    assert auto_workers("auto") == 15 and auto_workers(3) == 3
    monkeypatch.setattr(threads, "cgroup_quota", lambda: 4.0)  # a container's 4 cores of 16
    assert auto_workers("auto") == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert auto_workers("auto") == 1
