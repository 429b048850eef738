"""The one way tests build stores and result files (conftest.py exposes them as fixtures).

`extract_miniature` writes a miniature dataset and extracts it with a tiny model (the real
stage 1); `new_store` creates an empty store from a backbone card; `fill` appends images to a
split and writes every write unit they touch, as extract does; `build_store` does both for
every split and adds the few-shot rows, the text classifier and the original head.
`result_record` is a fit result JSON in the exact shape fit writes (and wrote before the
result record was typed); `ood_record` one of 16-shot ImageNet tested on its variants. A
FeatureStore hands out no zarr group: `raw_split` opens one beside it, for tests that compare
stores array by array (bookkeeping included) or damage one on purpose; `whole` reads an array of
every reserved row through the store.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from miniatures import write_split_zhou

from safe_cache import card_fingerprint
from safe_cache.store import FeatureStore, StoreLayout, create_store

TOY_CARD = {  # every field a backbone card has (records.BackboneCard); the sizes are tiny
    "schema": 1, "model": "tiny", "model_config_sha256": None, "family": "resnet",
    "pretrained": None, "weights_sha256": None, "init_seed": 0, "quick_gelu": False,
    "image_size": [32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
    "interpolation": "bicubic", "resize_mode": "shortest", "cut": "pool", "tokens": 5,
    "channels": 8, "embed_dim": 3, "token_grid": [2, 2], "logit_scale": 100.0,
    "open_clip_version": "test",
    "torch_version": "test"}


def raw_split(url: str | Path, split: str, storage_options: dict | None = None,
              mode: str = "r") -> zarr.Group:
    """A split's zarr group opened directly (read-only unless `mode` says): behind the
    store's back, as only a test may."""
    kwargs: dict[str, Any] = {"storage_options": storage_options} if storage_options else {}
    return zarr.open_group(str(url), mode=mode, path=split, zarr_format=3,
                           use_consolidated=False, **kwargs)


def whole(store: FeatureStore, split: str, name: str) -> np.ndarray:
    """`name` at every reserved row of the split (padding included), read by the store."""
    return store.read_rows(split, name, np.arange(store.row_count(split)))


def toy_card(**changes: Any) -> dict[str, Any]:
    """TOY_CARD with some fields changed (sizes, model)."""
    return {**TOY_CARD, **changes}


def toy_dataset(name: str = "toy", num_classes: int = 4, **more: Any) -> dict[str, Any]:
    """A store manifest's dataset block (class names c0, c1, ... unless given)."""
    return {"name": name, "num_classes": num_classes,
            "classnames": [f"c{i}" for i in range(num_classes)], **more}


def new_store(url: str, card: dict[str, Any] = TOY_CARD, *, dataset: dict | None = None,
              views: int = 0, layout: StoreLayout | None = None,
              storage_options: dict | None = None, center_flip: bool = False) -> FeatureStore:
    dataset = dataset or {}
    dataset = {**toy_dataset(dataset.get("name", "toy"), dataset.get("num_classes", 4)),
               **dataset}
    return create_store(url, {**TOY_CARD, **card}, card_fingerprint({**TOY_CARD, **card}),
                        dataset, views={"count": views, "seed": 0, "scale": [0.5, 1.0]},
                        layout=layout or StoreLayout(chunk_images=4),
                        storage_options=storage_options, center_flip=center_flip)


def random_features(rows: int, card: dict[str, Any], views: int, seed: int = 0
                    ) -> dict[str, np.ndarray]:
    """Uniform noise for every feature array (views too), drawn in a fixed order."""
    rng = np.random.default_rng(seed)
    t, c, d = card["tokens"], card["channels"], card["embed_dim"]
    return {"dense": rng.random((rows, t, c)), "pooled": rng.random((rows, d)),
            "aug_dense": rng.random((rows, views, t, c)),
            "aug_pooled": rng.random((rows, views, d))}


def fill(store: FeatureStore, split: str, labels: int | Sequence[int],
         features: dict[str, np.ndarray] | None = None, seed: int = 0) -> np.ndarray:
    """Append images (an int: that many, labels i % 4) and write every write unit they touch
    (padding rows stay zero); features default to `random_features`. Returns the rows."""
    labels = [i % 4 for i in range(labels)] if isinstance(labels, int) else list(labels)
    manifest = store.manifest
    views = manifest["views"]["count"]
    values = features or random_features(len(labels), manifest["backbone"], views, seed)
    if split != "train" or not views:
        values = {k: v for k, v in values.items() if not k.startswith("aug")}
    if split != "train" or not manifest.get("center_flip"):
        values = {k: v for k, v in values.items() if not k.startswith("flip")}
    elif "flip_dense" not in values:  # a stand-in: the center view's map, tokens reversed
        values["flip_dense"], values["flip_pooled"] = values["dense"][:, ::-1], values["pooled"]
    rows = store.append_rows(split, [f"{split}/{i}.jpg" for i in range(len(labels))], labels)
    unit, total = store.layout.unit, store.row_count(split)
    for u in range(rows[0] // unit, -(-(rows[-1] + 1) // unit)):
        lo, hi = u * unit, min((u + 1) * unit, total)
        inside = rows[(rows >= lo) & (rows < hi)]
        chunk = {k: np.zeros((hi - lo, *v.shape[1:])) for k, v in values.items()}
        for k, v in values.items():
            chunk[k][inside - lo] = v[inside - rows[0]]
        store.write_unit(split, u, chunk)
    return rows


def build_store(url: str, card: dict[str, Any] = TOY_CARD, *,
                splits: dict[str, Sequence[int]],
                features: dict[str, dict[str, np.ndarray]] | None = None,
                dataset: dict | None = None, views: int = 0, layout: StoreLayout | None = None,
                storage_options: dict | None = None, center_flip: bool = False,
                fewshot: dict[tuple[int, int], tuple] | None = None,
                classifier: np.ndarray | None = None, head: tuple | None = None,
                sentence_embeddings: np.ndarray | None = None) -> str:
    """A whole store, closed: `splits` gives each split's labels, `features` (optional) each
    split's feature arrays; `fewshot` maps (seed, shots) to (train rows, val rows); `head` is
    (state dict of numpy arrays, open_clip model config); `sentence_embeddings` one raw
    embedding per class (the classifier's sentences)."""
    with new_store(url, card, dataset=dataset, views=views, layout=layout,
                   storage_options=storage_options, center_flip=center_flip) as store:
        for split, labels in splits.items():
            fill(store, split, labels, (features or {}).get(split))
        for (seed, shots), (train, val) in (fewshot or {}).items():
            store.write_fewshot(seed, shots, train, val)
        if classifier is not None:
            store.write_classifier("hand", classifier, [[str(i)] for i in range(len(classifier))],
                                   sentence_embeddings)
        if head is not None:
            store.write_head(*head)
    return url


def result_record(dataset: str, shots: int, seed: int, safe: float, zero: float,
                  model: str = "RN50", ood: dict | None = None, *, recipe: str = "safe",
                  pretrained: str | None = "openai", **config: Any) -> dict[str, Any]:
    """A fit result JSON with every field fit writes (write_record adds the backbone's label,
    the identity and the checksums): of the `recipe` preset and a default fit's options unless
    `config` (FitConfig fields) says otherwise."""
    from safe_cache.fit.config import FitConfig
    from safe_cache.fit.recipe import PRESETS

    grid = [{"lr": lr, "wd": wd, "val_acc": safe - 0.01 * i, "best_iter": 100}
            for i, (lr, wd) in enumerate([(1e-4, 0.0), (1e-4, 1e-3), (1e-5, 0.0), (1e-5, 1e-3)])]
    label = f"{model}-{pretrained or 'random0'}"
    url = f"stores/{dataset}/{label}.zarr"
    settings = FitConfig(store=url, shots=(shots,), seeds=(seed,), device="cpu",
                         recipe=PRESETS[recipe], **config)
    record = {
        "methods": {"zero_shot": {"val_acc": zero, "test_acc": zero},
                    "safe": {"val_acc": safe, "test_acc": safe, "lr": 1e-4, "wd": 0.0,
                             "beta": 0.5, "best_iter": 100}},
        "beta_curve": [{"beta": b, "val_acc": safe - 0.1 * b, "test_acc": safe - 0.1 * b}
                       for b in (0.0, 0.5, 1.0)],
        "norm_ratio_finetuned_over_original": 1.0, "test_images": 100, "grid": grid,
        "dataset": dataset, "shots": shots, "seed": seed,
        "backbone": {"model": model, "pretrained": pretrained, "cut": "pool"},
        "store": {"url": url, "fingerprint": "0" * 64, "manifest_sha256": "1" * 64,
                  "store_sha256": "2" * 64, "test_rows": 100,
                  "fewshot_sha256": f"{seed:064x}", "prompts_sha256": "3" * 64},
        "config": {**settings.to_dict(), "storage_options": None},
        "versions": {"safe_cache": "0.2.0", "torch": "2.14.1"},
        "timings": {"load_s": 0.1, "train_s": 1.0, "evaluate_s": 0.1,
                    "train_iters_per_s": 100.0},
        "train_samples": 10 * shots,
        "recipe": {**PRESETS[recipe].record(), "loss_logit_scale": 54.6},
        "curves": {"iters": [100], "val_acc": [[g["val_acc"] for g in grid]],
                   "train_loss": [[1.0] * len(grid)]},
        "execution": {"device": "cpu", "graphed": False},
        "run_id": uuid.uuid4().hex,
    }
    if ood is not None:
        record["ood"] = ood
    return record


OOD_VARIANTS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
OOD_METHODS = {"tip_adapter": 0.62, "tip_adapter_f": 0.64, "linear_probe": 0.55, "safe_a": 0.66}


def ood_record(seed: int, model: str = "RN50", shift: float = 0.0, **config) -> dict:
    """A 16-shot ImageNet result (`result_record`'s) with every Table III method a store runs and
    the training-free Tip-Adapter, tested on the 4 variants: each variant's accuracy a fixed
    offset below the source's (5, 10, 15, 20 points), `shift` added to every accuracy."""
    record = result_record("imagenet", 16, seed, safe=0.66 + shift, zero=0.58 + shift,
                           model=model, **config)
    for method, acc in OOD_METHODS.items():
        record["methods"][method] = {"val_acc": acc, "test_acc": acc + shift}
    record["ood"] = {name: {m: v["test_acc"] - 0.05 * (i + 1)
                            for m, v in record["methods"].items()}
                     for i, name in enumerate(OOD_VARIANTS)}
    return record


def write_record(folder: Path, record: dict[str, Any], backbone: str = "RN50-openai") -> Path:
    """The record where fit would write it (its name by fit's scheme, its folder `backbone`,
    the record's backbone label unless it has one), with the identity and checksums fit
    writes. `record` gains them too, so a test can edit it and write it again."""
    from safe_cache.fit.identity import identity_sha256
    from safe_cache.fit.results import CONTENT_FIELD, RunResult, content_sha256, expected_name

    record["backbone"].setdefault("label", backbone)
    known = {k: v for k, v in record.items() if k in RunResult.__dataclass_fields__}
    unchecked = RunResult(**known)  # tests also write broken records
    record["identity"] = unchecked.run_identity
    record["identity_sha256"] = identity_sha256(record["identity"])
    record.pop(CONTENT_FIELD, None)
    record[CONTENT_FIELD] = content_sha256(record)
    path = folder / record["dataset"] / backbone / expected_name(unchecked)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def extract_miniature(root: Path, model: str, store: Path, *, dataset: str = "food101",
                      classes: int = 3, counts: dict[str, int] | None = None,
                      **options: Any) -> Path:
    """A miniature of `dataset` under `root`, extracted into `store` by the real `extract` with
    the tests' small settings (random weights, 1 shot, seed 1, 1 view, no decoding processes)
    unless `options` (ExtractConfig fields) say otherwise.

    Extracted once per session for the same arguments, then copied: a store holds no path of
    its images' root, and the miniature's images are the same bytes every time. Onto an
    existing store extract runs for real (what such a call tests)."""
    from safe_cache.extract import ExtractConfig, extract

    write_split_zhou(root, dataset, classes=classes, counts=counts)
    settings = {"shots": (1,), "seeds": (1,), "views": 1, "workers": 0, **options}
    if Path(store).exists():
        extract(ExtractConfig(dataset=dataset, root=str(root), model=model, pretrained=None,
                              store=str(store), **settings))
        return store
    key = json.dumps([model, dataset, classes, counts, settings], sort_keys=True, default=str)
    if key not in _EXTRACTED:
        first = Path(tempfile.mkdtemp(prefix="miniature-")) / "store.zarr"
        atexit.register(shutil.rmtree, first.parent, True)
        extract(ExtractConfig(dataset=dataset, root=str(root), model=model, pretrained=None,
                              store=str(first), **settings))
        _EXTRACTED[key] = first
    shutil.copytree(_EXTRACTED[key], store)
    return store


_EXTRACTED: dict[str, Path] = {}  # extract_miniature's stores of this session, by arguments


def permute_test_labels(inputs: Any, seed: int = 5) -> Any:
    """A workbench run's MethodInputs with the test labels shuffled: what a method chooses
    must not change (only test_acc may)."""
    import dataclasses

    import torch

    from safe_cache.fit.adapters import Split

    order = torch.randperm(len(inputs.test.labels), generator=torch.Generator().manual_seed(seed))
    return dataclasses.replace(inputs, test=Split(inputs.test.features,
                                                  inputs.test.labels[order]))


def check_workbench_contract(run: Any, inputs: Any) -> Any:
    """What every workbench method owes the protocol, checked on one run (`run(inputs)` ->
    MethodOutcome): nothing it chooses depends on the test labels (only test_acc moves with
    them), its OOD predictor on unnormalised features gives its test_acc, and it is
    deterministic given the seed. Returns the outcome."""
    import torch

    outcome = run(inputs)
    shuffled = run(permute_test_labels(inputs, seed=1))
    chosen = {k: v for k, v in outcome.summary.items() if k != "test_acc"}
    assert chosen == {k: v for k, v in shuffled.summary.items() if k != "test_acc"}
    assert outcome.predictor is not None and shuffled.predictor is not None
    scale = torch.rand(len(inputs.test.labels), 1, generator=torch.Generator().manual_seed(0))
    raw = inputs.test.features * scale * 5  # unnormalised, as the OOD evaluation reads them
    torch.testing.assert_close(outcome.predictor(raw, raw), shuffled.predictor(raw, raw))
    predicted = outcome.predictor(raw, raw).argmax(-1)
    assert predicted.eq(inputs.test.labels).float().mean().item() == \
        outcome.summary["test_acc"]
    assert run(inputs).summary == outcome.summary
    return outcome
