"""fit --protocol reference: Tip-Adapter(-F) and GDA as their authors' code runs them (keys
averaged raw, Tip-F's epoch on test, searches on the whole val split), labelled and never
averaged with ours; extract --full-val stores what it searches on; results of 0.2.0 keep
their identity."""

from __future__ import annotations

import dataclasses
import json
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import build_store, result_record, write_record

from safe_cache import RecipeError, load_backbone
from safe_cache.analysis.report import aggregate, load_results
from safe_cache.extract.job import wanted_entries
from safe_cache.fit import FitConfig, fit
from safe_cache.fit.adapters import cache_model
from safe_cache.fit.identity import options_of
from safe_cache.fit.results import load_result
from safe_cache.store import StoreLayout

CLASSES = 3
COUNTS = {"train": 4, "val": 3, "test": 6}  # per class


def _store(path: str, whole_val: bool, embeddings: bool = False) -> str:
    """A tiny-rn store (random maps, the head's own pooled features); the few-shot val rows
    are one per class, the split holds three (`whole_val`) or only those."""
    backbone = load_backbone("safe-cache-tiny-rn", init_seed=3)
    card, rng = backbone.card, np.random.default_rng(0)
    per_val = COUNTS["val"] if whole_val else 1
    labels = {s: np.repeat(np.arange(CLASSES), per_val if s == "val" else n)
              for s, n in COUNTS.items()}
    features = {}
    for split, split_labels in labels.items():
        dense = rng.random((len(split_labels), card["tokens"], card["channels"]),
                           dtype=np.float32)
        with torch.no_grad():
            pooled = backbone.head(torch.from_numpy(dense)).numpy()
        features[split] = {"dense": dense, "pooled": pooled}
        if split == "train":
            aug = np.stack([dense * s for s in (0.5, 2.0)], axis=1)  # views of other norms
            features[split]["aug_dense"] = aug
            with torch.no_grad():
                features[split]["aug_pooled"] = np.stack(
                    [backbone.head(torch.from_numpy(aug[:, v])).numpy() for v in range(2)], 1)
    sizes = {"train": CLASSES * COUNTS["train"], "val": CLASSES * COUNTS["val"],
             "test": CLASSES * COUNTS["test"]}
    classifier = F.normalize(torch.randn(CLASSES, card["embed_dim"]), dim=-1).numpy()
    few_val = np.arange(0, len(labels["val"]), per_val)
    return build_store(
        path, card, splits=labels, features=features, views=2, center_flip=True,
        dataset={"name": "spots", "num_classes": CLASSES, "classnames": list("abc"),
                 "split_sizes": sizes},
        layout=StoreLayout(chunk_images=8), classifier=classifier,
        sentence_embeddings=classifier if embeddings else None,
        fewshot={(1, 4): (np.arange(len(labels["train"])), few_val)},
        head=({k: v.numpy() for k, v in backbone.head.state_dict().items()},
              backbone.model_config))


def _config(store: str, out: str, **changes) -> FitConfig:
    settings = {"methods": ("tip_adapter", "tip_adapter_f"), **changes}
    return FitConfig(store=store, shots=(4,), seeds=(1,), lrs=(1e-3,), wds=(0.0,), iters=4,
                     eval_every=2, out=out, device="cpu", tip_epochs=2, **settings)


def test_raw_keys_average_the_unnormalised_views():
    views = torch.randn(5, 3, 8) * torch.tensor([0.1, 1.0, 10.0])[None, :, None]
    labels = torch.arange(5) % 2
    raw, values = cache_model(views, labels, 2, "raw")
    mine, _ = cache_model(views, labels, 2)
    x = views.double().numpy()
    expected = x.mean(axis=1) / np.linalg.norm(x.mean(axis=1), axis=-1, keepdims=True)
    assert np.allclose(raw.double().numpy(), expected, atol=1e-6)
    assert not torch.allclose(raw, mine, atol=1e-3)  # the views' norms differ: so do the keys
    assert values.tolist() == F.one_hot(labels, 2).float().tolist()
    with pytest.raises(ValueError, match="keys_average"):
        cache_model(views, labels, 2, "median")


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_reference_needs_the_whole_val_split_and_says_how(tmp_path):
    store = _store(str(tmp_path / "few.zarr"), whole_val=False)
    with pytest.raises(RecipeError, match=r"whole val split.*holds 3 of its 9 rows.*--full-val"):
        fit(_config(store, str(tmp_path / "r"), protocol="reference"))
    assert not (tmp_path / "r").exists()  # refused before anything ran
    (ours,) = fit(_config(store, str(tmp_path / "r")))  # our protocol needs the few rows only
    assert "protocol" not in ours.methods["tip_adapter"]


@pytest.mark.slow
def test_reference_runs_are_labelled_and_kept_apart(tmp_path):
    store = _store(str(tmp_path / "whole.zarr"), whole_val=True)
    out = str(tmp_path / "r")
    (ours,) = fit(_config(store, out))
    (reference,) = fit(_config(store, out, protocol="reference"))
    assert reference.path != ours.path and not reference.skipped
    tip, tip_f = reference.methods["tip_adapter"], reference.methods["tip_adapter_f"]
    assert tip["protocol"] == tip_f["protocol"] == "reference"
    assert tip_f["selected_on"] == "test" and ours.methods["tip_adapter_f"]["selected_on"] == "val"
    assert "protocol" not in reference.methods["safe"]  # SAFE is ours either way
    assert reference.run_identity["options"]["protocol"] == "reference"
    assert "protocol" not in ours.run_identity["options"]  # a default: as 0.2.0 wrote it
    rows = aggregate(load_results(out))
    labels = {r["method"] for r in rows}
    assert {"tip_adapter (reference)", "tip_adapter_f (reference)", "tip_adapter"} <= labels
    assert all(r["seeds"] == 1 for r in rows if r["mean"] is not None)  # never averaged


def test_a_result_of_0_2_0_keeps_its_identity(tmp_path):
    record = result_record("dtd", 1, 1, 0.6, 0.4)
    del record["config"]["protocol"]  # 0.2.0 had no such option
    path = write_record(tmp_path, record)
    loaded = load_result(path)
    assert loaded.options == options_of({**record["config"], "protocol": "ours"})
    assert "protocol" not in loaded.run_identity["options"]
    assert loaded.identity == json.loads(path.read_text())["identity"]


def test_full_val_extracts_every_val_entry():
    @dataclasses.dataclass
    class Subset:
        train: list[int]
        val: list[int]

    dataset = types.SimpleNamespace(splits={"test": [0] * 5, "train": [0] * 6, "val": [0] * 4})
    subsets = {(1, 1): Subset([0, 2], [1])}
    assert wanted_entries(dataset, subsets)["val"] == [1]
    assert wanted_entries(dataset, subsets, full_val=True)["val"] == [0, 1, 2, 3]


def test_the_note_names_ours_not_none():
    from safe_cache.fit.identity import differences

    assert differences({"options": {}}, {"options": {"protocol": "reference"}}) == \
        ["protocol ours -> reference"]


def test_reference_without_a_method_it_changes_is_refused():
    from safe_cache import ConfigError

    with pytest.raises(ConfigError, match=r"--protocol reference changes only .*gda"):
        FitConfig(store="s", protocol="reference", methods=("linear_probe", "clap"))
    assert FitConfig(store="s", protocol="reference", methods=("gda",)).protocol == "reference"
