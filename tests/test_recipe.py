"""The training recipe (fit/recipe.py): each knob against a direct computation, the presets,
and the store holding what every preset needs."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from factories import extract_miniature, raw_split, whole
from miniatures import write_imagenet

from safe_cache import RecipeError, load_backbone
from safe_cache.cli import main
from safe_cache.data.datasets import open_dataset
from safe_cache.data.prompts import class_average
from safe_cache.data.views import load_image
from safe_cache.extract import ExtractConfig, extract
from safe_cache.fit import FitConfig, fit
from safe_cache.fit.grid import StackedHeads, grid_optimizer
from safe_cache.fit.recipe import CROSS_MODAL_LOGIT_SCALE, PRESETS, make_recipe
from safe_cache.fit.train import BatchSampler, RunData, evaluation_points, run_classifier
from safe_cache.store import open_store
from safe_cache.store.verify import verify_store

MODEL = "safe-cache-tiny-vit"


class CrossModalWarmup(torch.optim.lr_scheduler.LRScheduler):
    """A transcription of Cross-Modal Fine-tuning's LinearWarmupScheduler
    (engine/optimizer/scheduler.py) wrapped around torch's CosineAnnealingLR(T_max = iters)."""

    def __init__(self, optimizer, successor, warmup_epoch, min_lr):
        self.successor, self.warmup_epoch, self.min_lr = successor, warmup_epoch, min_lr
        super().__init__(optimizer)

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        if self.last_epoch == 0:
            return [self.min_lr for _ in self.base_lrs]
        return [lr * self.last_epoch / self.warmup_epoch for lr in self.base_lrs]


def reference_lrs(base: float, iters: int) -> list[float]:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=base)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(iters))
    scheduler = CrossModalWarmup(optimizer, cosine, 50, 1e-5)
    lrs = []
    for _ in range(iters):
        lrs.append(optimizer.param_groups[0]["lr"])  # the lr this iteration's step uses
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_warmup_then_cosine_is_cross_modals_schedule():
    iters, bases = 12_800, (1e-4, 1e-7)
    head = load_backbone(MODEL).new_head()
    stacked = StackedHeads(head, len(bases))
    optimizer, scheduler = grid_optimizer(stacked, bases, (0.0, 0.0), iters,
                                          recipe=PRESETS["safe"])
    ours = []
    for _ in range(iters):
        ours.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()  # no gradients: changes nothing, keeps torch's step order
        scheduler.step()
    for g, base in enumerate(bases):
        reference = reference_lrs(base, iters)
        for i in (0, 1, 49, 50, 51, 5000, iters - 1):
            assert ours[i][g] == pytest.approx(reference[i], rel=1e-9), (base, i)
        assert ours[0][g] == 1e-5  # whatever the base lr
        assert ours[50][g] == pytest.approx(base)
        assert ours[51][g] == pytest.approx(base * (1 + math.cos(math.pi / iters)) / 2)


def test_views_preset_is_plain_cosine():
    parameter = torch.nn.Parameter(torch.zeros(1))
    reference = torch.optim.AdamW([parameter], lr=1e-4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(reference, 100)
    stacked = StackedHeads(load_backbone(MODEL).new_head(), 1)
    optimizer, scheduler = grid_optimizer(stacked, (1e-4,), (0.0,), 100, recipe=PRESETS["views"])
    for _ in range(100):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(reference.param_groups[0]["lr"],
                                                                 rel=1e-9, abs=1e-20)
        reference.step()
        cosine.step()
        optimizer.step()
        scheduler.step()


def test_epoch_sampling_visits_every_sample_once_per_epoch():
    sampler = BatchSampler(12, 4, "epoch", seed=1)
    for _ in range(3):  # three epochs
        seen = torch.cat([sampler.next() for _ in range(3)])
        assert sorted(seen.tolist()) == list(range(12))
    ragged = BatchSampler(10, 3, "epoch", seed=1)  # the last partial batch is dropped
    epoch = torch.cat([ragged.next() for _ in range(3)]).tolist()
    assert len(set(epoch)) == 9
    assert len(set(torch.cat([ragged.next() for _ in range(3)]).tolist())) == 9
    small = BatchSampler(3, 8, "epoch", seed=1)  # fewer samples than a batch: all of them
    assert sorted(small.next().tolist()) == [0, 1, 2]
    drawn = torch.cat([BatchSampler(5, 8, "replace", seed=s).next() for s in range(4)])
    assert len(drawn) == 32 and drawn.max() < 5 and len(set(drawn.tolist())) < 32


def test_evaluation_points():
    assert evaluation_points(12_800, 100, True)[:2] == [0, 100]
    assert evaluation_points(12_800, 100, True)[-1] == 12_700  # the last is not evaluated
    assert len(evaluation_points(12_800, 100, True)) == 128
    assert evaluation_points(250, 100, False) == [99, 199, 249]


def test_template_averaging_against_the_formulas():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(7, 5, generator=generator) * torch.tensor([[1.0], [3], [0.2], [1],
                                                                        [5], [1], [2]])
    counts = [3, 4]
    raw = class_average(embeddings, counts, "raw")
    normalised = class_average(embeddings, counts, "normalised")
    assert torch.allclose(raw[0], F.normalize(embeddings[:3].mean(0), dim=0))
    assert torch.allclose(normalised[1], F.normalize(F.normalize(embeddings[3:], dim=-1)
                                                     .mean(0), dim=0))
    assert not torch.allclose(raw, normalised)


def test_presets_and_bad_values():
    assert PRESETS["safe"].logit_scale == pytest.approx(54.598, abs=1e-3)
    assert make_recipe("safe", warmup=0).name == "safe+warmup=0"
    assert make_recipe("views", logit_scale="backbone").name == "views"
    assert make_recipe("safe", logit_scale="backbone").logit_scale is None
    for preset, overrides, match in (("nope", {}, "safe, views"),
                                     ("safe", {"warmup": -1}, ">= 0"),
                                     ("safe", {"logit_scale": 0.0}, r"in \(0, 10000\]"),
                                     ("safe", {"logit_scale": float("nan")}, "finite"),
                                     ("safe", {"sampling": "sometimes"}, "epoch, replace")):
        with pytest.raises(RecipeError, match=match):
            make_recipe(preset, **overrides)


@pytest.fixture(scope="module")
def food(tmp_path_factory):
    root = tmp_path_factory.mktemp("food")
    store = extract_miniature(root, MODEL, root / "food.zarr", shots=(2,), views=2,
                              counts={"train": 3, "val": 2, "test": 2})
    return root, store


@pytest.mark.slow
def test_center_flip_is_the_trunk_on_the_mirrored_center_crop(food):
    root, store_path = food
    backbone = load_backbone(MODEL)
    store = open_store(str(store_path))
    assert store.center_flip and verify_store(str(store_path)) == []
    rows = store.readable_rows("train")[:3]
    dataset = open_dataset("food101", root)
    images = torch.stack([backbone.preprocess(load_image(dataset.image_root / str(p)))
                          for p in store.read_rows("train", "path", rows)])
    with torch.no_grad():
        center, mirrored = backbone.forward_features(images), backbone.forward_features(
            images.flip(-1))
    for name, expected in (("dense", center), ("flip_dense", mirrored)):
        stored = torch.from_numpy(store.read_rows("train", name, rows).astype(np.float32))
        assert torch.allclose(stored, expected, atol=2e-3 * expected.abs().max().item()), name
    assert not torch.allclose(center, mirrored)
    data = RunData(store, 2, 1, PRESETS["safe"])  # centers, then their mirrors: 2 per image
    train_rows = data.train_rows
    assert len(data.train_labels) == 2 * len(train_rows)
    assert torch.equal(data.train_dense[:len(train_rows)], torch.from_numpy(
        store.read_rows("train", "dense", train_rows)))
    assert torch.equal(data.train_dense[len(train_rows):], torch.from_numpy(
        store.read_rows("train", "flip_dense", train_rows)))
    stored_views = RunData(store, 2, 1, PRESETS["views"])
    assert len(stored_views.train_labels) == 2 * len(train_rows)  # the 2 stored views
    everything = RunData(store, 2, 1, make_recipe("safe", train_views="all"))
    assert len(everything.train_labels) == 4 * len(train_rows)


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_a_store_without_the_flip_gets_it_from_extract(tmp_path, food):
    root, _ = food
    old = tmp_path / "old.zarr"
    base = dict(dataset="food101", root=str(root), model=MODEL, pretrained=None,
                store=str(old), shots=(2,), seeds=(1,), views=2, workers=0)
    extract(ExtractConfig(**base, center_flip=False))
    store = open_store(str(old))
    assert not store.center_flip and "flip_dense" not in raw_split(old, "train")
    out = tmp_path / "results"
    refused = CliRunner().invoke(main, ["fit", "--store", str(old), "--shots", "2", "--seeds",
                                        "1", "--iters", "2", "--out", str(out)])
    assert refused.exit_code == 2
    text = " ".join(refused.output.split())
    assert "safe-cache extract --dataset food101" in text and f"--store {old}" in text
    assert not out.exists()  # nothing written
    before = whole(open_store(str(old)), "train", "dense")
    report = extract(ExtractConfig(**base))  # center_flip by default: adds what is missing
    assert report.extracted["test"] == 0 and report.extracted["train"] == report.rows["train"]
    grown = open_store(str(old))
    assert grown.center_flip and verify_store(str(old)) == []
    assert np.array_equal(whole(grown, "train", "dense"), before)
    assert grown.readable_rows("train").size == report.rows["train"]


@pytest.mark.slow  # two fits and a report with plots through the CLI
def test_two_recipes_side_by_side_with_their_record(food, tmp_path):
    _, store = food
    out = tmp_path / "results"
    result = CliRunner().invoke(main, [
        "fit", "--store", str(store), "--shots", "2", "--seeds", "1", "--iters", "30",
        "--eval-every", "10", "--lr", "1e-3", "--wd", "0", "--recipes", "safe,views",
        "--methods", "tip_adapter_f,safe_a", "--select-on", "test", "--out", str(out),
        "--json"])
    assert result.exit_code == 0, result.output
    runs = json.loads(result.stdout)
    assert [r["recipe"]["name"] for r in runs] == ["safe", "views"]
    safe, views = runs
    assert safe["recipe"]["loss_logit_scale"] == pytest.approx(CROSS_MODAL_LOGIT_SCALE)
    assert views["recipe"]["loss_logit_scale"] == pytest.approx(
        open_store(str(store)).manifest["backbone"]["logit_scale"])
    assert safe["curves"]["iters"] == [1, 11, 21] and views["curves"]["iters"] == [10, 20, 30]
    assert len(safe["curves"]["val_acc"][0]) == 1 and len(safe["curves"]["train_loss"]) == 3
    assert safe["methods"]["safe_a"]["selected_on"] == "test"
    names = sorted(re.sub(r"_o[0-9a-f]{8}\.json$", ".json", p.name) for p in out.rglob("*.json"))
    assert names == ["shots2_seed1_safe_test-selected.json",
                     "shots2_seed1_views_test-selected.json"]  # (+ the short fit's suffix)
    report = CliRunner().invoke(main, ["report", str(out), "--format", "json"])
    rows = json.loads(report.stdout)
    assert {r["recipe"] for r in rows} == {"safe", "views"}
    assert any(r["method"] == "safe_a (test-selected)" for r in rows)
    plots = CliRunner().invoke(main, ["report", str(out), "--plots", str(tmp_path / "plots")])
    assert plots.exit_code == 0, plots.output
    curves = sorted((tmp_path / "plots").glob("curves_*.png"))
    assert len(curves) == 2 and all(p.read_bytes().startswith(b"\x89PNG") for p in curves)


def test_raw_template_average_from_the_stored_sentence_embeddings(food):
    _, store_path = food
    store = open_store(str(store_path))
    embeddings, counts = store.sentence_embeddings("hand")
    assert sum(counts) == len(embeddings) == 3  # one template per class here
    raw = run_classifier(store, "hand", make_recipe("safe", text_average="raw"))
    expected = F.normalize(torch.from_numpy(embeddings), dim=-1)  # one sentence: raw == norm
    assert torch.allclose(raw, expected, atol=1e-6)
    assert torch.allclose(run_classifier(store, "hand", PRESETS["safe"]),
                          torch.from_numpy(store.classifier("hand")), atol=1e-6)


@pytest.mark.slow
def test_imagenet_val_rows_come_from_train_images(tmp_path):
    write_imagenet(tmp_path)
    store = tmp_path / "imagenet.zarr"
    extract(ExtractConfig(dataset="imagenet", root=str(tmp_path), model=MODEL, pretrained=None,
                          store=str(store), shots=(1,), seeds=(1,), views=0, workers=0))
    opened = open_store(str(store))
    val_paths = opened.row_paths("val")
    assert len(val_paths) and all(str(p).startswith("train/") for p in val_paths if p)
    assert all(str(p).startswith("val/") for p in opened.row_paths("test") if p)
    config = FitConfig(store=str(store), shots=(1,), seeds=(1,), iters=3, eval_every=1,
                       lrs=(1e-3,), wds=(0.0,), methods=(), out=str(tmp_path / "r"),
                       recipe=replace(PRESETS["safe"], train_views="center+flip"))
    (record,) = fit(config)
    assert record.recipe["name"] == "safe" and Path(record.path).is_file()
