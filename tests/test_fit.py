"""Stage 2 on a generated store whose labels live in spatial structure the original pooling
underweights: SAFE must beat zero-shot; selection, early stopping, beta curve, results files."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import build_store
from safetensors.torch import load_file

from safe_cache import load_backbone
from safe_cache.fit import FitConfig, fit
from safe_cache.fit.methods import DEFAULT_METHODS
from safe_cache.model.inference import blend_features
from safe_cache.store import StoreLayout, open_store

CLASSES, VIEWS = 4, 2
COUNTS = {"train": 8, "val": 4, "test": 24}  # per class


def synthetic_store(path: str) -> str:
    """Post-ReLU noise maps; the class is a pattern at ONE spatial token (index 4 of 3 x 3).

    The original head pools all tokens through a random query, and the text classifier is
    random: zero-shot is at chance, but a fine-tuned pooling head can read the token.
    """
    backbone = load_backbone("safe-cache-tiny-rn", init_seed=3)
    card = backbone.card
    rng = np.random.default_rng(0)
    patterns = rng.standard_normal((CLASSES, card["channels"])).astype(np.float32) * 3
    classifier = F.normalize(torch.randn(CLASSES, card["embed_dim"], generator=torch.Generator()
                                         .manual_seed(1)), dim=-1).numpy()

    def maps(labels: np.ndarray) -> np.ndarray:
        dense = np.abs(rng.standard_normal((len(labels), card["tokens"], card["channels"]))).astype(
            np.float32)
        dense[:, 4] += np.maximum(patterns[labels], 0)
        return dense

    def pooled(dense: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return backbone.head(torch.from_numpy(dense)).numpy()

    labels = {split: np.repeat(np.arange(CLASSES), per_class) for split, per_class in
              COUNTS.items()}
    features = {}
    for split, split_labels in labels.items():  # unit by unit, as the rows are written
        parts = []
        for unit in range(-(-len(split_labels) // 16)):
            part = split_labels[unit * 16:(unit + 1) * 16]
            dense = maps(part)
            values = {"dense": dense, "pooled": pooled(dense)}
            if split == "train":
                aug = np.stack([maps(part) for _ in range(VIEWS)], axis=1)
                values["aug_dense"] = aug
                values["aug_pooled"] = np.stack([pooled(aug[:, v]) for v in range(VIEWS)], 1)
                flip = maps(part)  # the pattern token (the 3 x 3 grid's center) mirrors to itself
                values["flip_dense"], values["flip_pooled"] = flip, pooled(flip)
            parts.append(values)
        features[split] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    train, val = np.arange(len(labels["train"])), np.arange(len(labels["val"]))
    return build_store(
        path, card, splits=labels, features=features, views=VIEWS, center_flip=True,
        dataset={"name": "spots", "num_classes": CLASSES, "classnames": list("abcd")},
        layout=StoreLayout(chunk_images=16), classifier=classifier,
        fewshot={(1, 8): (train, val), (2, 8): (train[::-1], val)},
        head=({k: v.numpy() for k, v in backbone.head.state_dict().items()},
              backbone.model_config))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fit")
    store = synthetic_store(str(folder / "spots.zarr"))
    config = FitConfig(store=store, shots=(8,), seeds=(1,), lrs=(1e-2, 1e-6),
                       wds=(0.0, 1e-3), iters=40, eval_every=20, betas=(0.0, 0.5, 1.0, 1e6),
                       out=str(folder / "results"))
    return config, fit(config)[0]


def test_safe_beats_zero_shot(fitted):
    _, result = fitted
    zero_shot, safe = result.methods["zero_shot"], result.methods["safe"]
    assert zero_shot["test_acc"] < 0.5
    assert safe["test_acc"] > zero_shot["test_acc"] + 0.3
    assert safe["lr"] == 1e-2 and safe["beta"] == 0.5


def test_selection_is_by_validation_and_best_states_are_kept(fitted):
    _, result = fitted
    best = max(result.grid, key=lambda g: g["val_acc"])
    assert result.methods["safe"]["val_acc"] == pytest.approx(best["val_acc"])
    assert (result.methods["safe"]["lr"], result.methods["safe"]["wd"]) == \
        (best["lr"], best["wd"])
    assert all(0 < g["best_iter"] <= 40 for g in result.grid)
    tiny_lr = [g for g in result.grid if g["lr"] == 1e-6]
    assert all(g["val_acc"] < best["val_acc"] for g in tiny_lr)


def test_beta_curve_endpoints(fitted):
    config, result = fitted
    curve = {point["beta"]: point for point in result.beta_curve}
    # beta huge: the original head alone, i.e. zero-shot
    assert curve[1e6]["test_acc"] == pytest.approx(result.methods["zero_shot"]["test_acc"])
    # beta 0: the fine-tuned head alone, recomputed from the saved safetensors head
    store = open_store(config.store)
    from safe_cache.model.backbone import head_from_config

    _, model_config = store.head_state()
    head = head_from_config(model_config, store.manifest["backbone"])
    path = result_file(config, result)
    head.load_state_dict(load_file(str(path.with_suffix(".safetensors"))))
    test = store.split("test")
    with torch.no_grad():
        tuned = head(torch.from_numpy(test["dense"].values.astype(np.float32)))
    classifier = torch.from_numpy(store.classifier())
    labels = torch.from_numpy(test["label"].values.astype(np.int64))
    features = blend_features(torch.from_numpy(test["pooled"].values), tuned, 0.0)
    direct = (features @ classifier.T).argmax(-1).eq(labels).float().mean().item()
    assert curve[0.0]["test_acc"] == pytest.approx(direct)
    assert curve[0.5]["test_acc"] == pytest.approx(result.methods["safe"]["test_acc"])


def result_file(config, result):
    from safe_cache.fit.runs import run_path

    return run_path(config, open_store(config.store), result.shots, result.seed)


@pytest.mark.slow
def test_result_files_and_skip_or_force(fitted, tmp_path):
    import shutil
    from dataclasses import replace

    config, result = fitted
    path = result_file(config, result)
    # Not a default fit (grid, iters, ...): the recipe's name and the options' short hash
    assert re.fullmatch(r"shots8_seed1_safe_o[0-9a-f]{8}\.json", path.name)
    assert path.parent.name == "safe-cache-tiny-rn-random3"
    saved = json.loads(path.read_text())
    for key in ("methods", "grid", "beta_curve", "config", "store", "versions", "timings",
                "recipe", "curves"):
        assert key in saved
    assert saved["recipe"]["name"] == "safe" and saved["config"]["recipe"]["warmup"] == 50
    execution = saved["execution"]
    assert {k: execution[k] for k in ("device", "graphed")} == {"device": "cpu", "graphed": False}
    assert execution["threads"] == "adaptive" and execution["usable_cores"] >= 1
    assert all(1 <= n <= execution["usable_cores"] for n in execution["thread_counts"])
    assert saved["config"]["cuda_graph"] is True
    assert set(saved["timings"]["methods_s"]) == set(DEFAULT_METHODS)
    assert set(saved["methods"]) == {"zero_shot", "safe", *DEFAULT_METHODS}
    for name, method in saved["methods"].items():
        assert 0 <= method["val_acc"] <= 1 and 0 <= method["test_acc"] <= 1, name
    assert saved["store"]["fingerprint"] == open_store(config.store).fingerprint
    copy = replace(config, out=str(tmp_path / "results"))  # leave the module's result alone
    shutil.copytree(config.out, copy.out)
    path = result_file(copy, result)
    before = path.stat().st_mtime_ns
    again = fit(copy)[0]
    assert again.skipped and path.stat().st_mtime_ns == before
    other = fit(replace(copy, iters=20, eval_every=10))[0]  # other options: a new file beside
    assert not other.skipped and other.path != path and path.stat().st_mtime_ns == before
    assert "iters 40 -> 20" in other.note and path.name in other.note
    forced = fit(replace(copy, force=True))[0]
    assert not forced.skipped and forced.path == path and path.stat().st_mtime_ns != before


def test_the_saved_head_is_the_restored_best_state(fitted):
    """Early stopping: the head written to disk reproduces the chosen configuration's best val
    accuracy (not the accuracy of its last iteration's state)."""
    config, result = fitted
    from safe_cache.model.backbone import head_from_config

    store = open_store(config.store)
    _, model_config = store.head_state()
    head = head_from_config(model_config, store.manifest["backbone"])
    head.load_state_dict(load_file(str(result_file(config, result).with_suffix(".safetensors"))))
    _, val_rows = store.fewshot(1, 8)
    rows = np.sort(val_rows)
    with torch.no_grad():
        tuned = head(torch.from_numpy(store.read_rows("val", "dense", rows).astype(np.float32)))
    features = blend_features(torch.from_numpy(store.read_rows("val", "pooled", rows)), tuned,
                              config.beta)
    labels = torch.from_numpy(store.read_rows("val", "label", rows).astype(np.int64))
    accuracy = (features @ torch.from_numpy(store.classifier()).T).argmax(-1).eq(labels)
    assert accuracy.float().mean().item() == pytest.approx(result.methods["safe"]["val_acc"])


def test_adapters_run_from_the_store(fitted):
    config, result = fitted
    methods = result.methods
    assert {"alpha", "gamma"} <= set(methods["tip_adapter"])
    assert 1 <= methods["tip_adapter_f"]["best_epoch"] <= methods["tip_adapter_f"]["epochs"]
    # SAFE-A adds a cache on SAFE's features: never much worse than SAFE here
    assert methods["safe_a"]["test_acc"] >= methods["safe"]["test_acc"] - 0.05
    # the linear probe: its chosen C, refitted on the stored center-view features of the
    # 8-shot rows, gives the val accuracy the run recorded
    from safe_cache.fit.adapters import _logistic_regression

    store = open_store(config.store)
    train_rows, val_rows = (np.sort(r) for r in store.fewshot(1, 8))

    def pooled_and_labels(split, rows):
        x = torch.from_numpy(store.read_rows(split, "pooled", rows))
        y = torch.from_numpy(store.read_rows(split, "label", rows).astype(np.int64))
        return F.normalize(x, dim=-1), y

    (x, y), (vx, vy) = pooled_and_labels("train", train_rows), pooled_and_labels("val", val_rows)
    probe = methods["linear_probe"]
    weight = _logistic_regression(x, y, CLASSES, probe["C"])
    direct = (vx @ weight[:-1] + weight[-1]).argmax(-1).eq(vy).float().mean().item()
    assert direct == pytest.approx(probe["val_acc"])


@pytest.mark.slow  # a second fit on a second store
def test_eval_ood_adds_an_ood_section(fitted, tmp_path):
    """fit --eval-ood tests the chosen head and every adapter on another store of the same
    backbone (Table III has zero-shot, the linear probe, Tip-Adapter-F, SAFE and SAFE-A; the
    training-free Tip-Adapter's cache and chosen alpha/gamma are its predictor)."""
    from dataclasses import replace

    config, _ = fitted
    variant = synthetic_store(str(tmp_path / "variant.zarr"))
    result = fit(replace(config, eval_ood=(variant,), iters=50, eval_every=25,
                         methods=("tip_adapter", "tip_adapter_f", "safe_a", "linear_probe"),
                         force=True,
                         out=str(tmp_path / "results")))[0]
    ood = result.ood["variant"]
    assert ood["images"] == CLASSES * COUNTS["test"] and ood["classes"] == CLASSES
    # the generator is seeded, so the variant's test split is the source's own: same accuracy
    for method in ("zero_shot", "safe", "tip_adapter", "tip_adapter_f", "safe_a", "linear_probe"):
        assert ood[method] == pytest.approx(result.methods[method]["test_acc"]), method
    # SAFE's beta curve on the variant: at the trained beta it is SAFE's OOD accuracy, at a
    # huge beta zero-shot's; on this variant (the source's test split) the source's own curve
    curve = {p["beta"]: p["test_acc"] for p in ood["beta_curve"]["points"]}
    assert sorted(curve) == sorted(config.betas) and config.beta in curve
    assert curve[config.beta] == ood["safe"] and curve[1e6] == pytest.approx(ood["zero_shot"])
    assert curve == {p["beta"]: pytest.approx(p["test_acc"]) for p in result.beta_curve}
    assert "post hoc" in ood["beta_curve"]["made"] and f"beta = {config.beta}" in \
        ood["beta_curve"]["made"]
    # a result without an OOD accuracy this safe-cache gives (Tip-Adapter before it had a
    # predictor) is run again, not reused without it; with all of them it is reused
    from safe_cache.fit.results import content_sha256, ood_gaps

    again = replace(config, eval_ood=(variant,), iters=50, eval_every=25, force=False,
                    methods=("tip_adapter", "tip_adapter_f", "safe_a", "linear_probe"),
                    out=str(tmp_path / "results"))
    assert not ood_gaps(result) and fit(again)[0].skipped
    data = json.loads(result.path.read_text())
    for block in data["ood"].values():
        block.pop("tip_adapter")
    data["content_sha256"] = content_sha256(data)
    result.path.write_text(json.dumps(data))
    rerun = fit(again)[0]
    assert not rerun.skipped and "tip_adapter" in rerun.ood["variant"]
