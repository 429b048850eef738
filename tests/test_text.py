"""A run's text side (fit/text.py, the paper's Fig. 8): the template pool as data, Template
Mining (`--prompts mined`) checked against its rule computed independently from the store, and
Linear Fine-tuning (`--classifier linear`); the classifier a run made is saved, exported and
refused when tampered with; the ablation-prompts study's variants and its published rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import extract_miniature
from safetensors.torch import save_file

from safe_cache import RecipeError, StoreError
from safe_cache.data.prompts import POOL_FILE, class_sentences, template_pool
from safe_cache.fit import FitConfig
from safe_cache.fit.results import classifier_file, files_problem, load_result
from safe_cache.fit.runs import fit_stores
from safe_cache.fit.text import MINED_TEMPLATES, mine_templates, result_classifier
from safe_cache.store import open_store

MODEL = "safe-cache-tiny-rn"
pytestmark = pytest.mark.filterwarnings("ignore::safe_cache.SafeCacheWarning")  # 4 shots of 3
FAST = {"iters": 20, "eval_every": 10, "lrs": (1e-3,), "wds": (0.0,), "device": "cpu"}


def test_the_pool_is_cross_modals_180_templates_with_its_source():
    templates = template_pool()
    assert len(templates) == 180 == len(set(templates))
    assert all(t.count("{}") == 1 for t in templates)
    source = json.loads(POOL_FILE.read_text())["source"]
    assert source["repository"].endswith("linzhiqiu/cross_modal_adaptation")
    assert len(source["commit"]) == 40
    sentences = class_sentences("pool", ["tench", "goldfish"], ())
    assert [len(s) for s in sentences] == [180, 180]
    assert sentences[1][templates.index("a photo of the {}.")] == "a photo of the goldfish."
    assert class_sentences("mined", ["tench"], ()) == class_sentences("pool", ["tench"], ())


def test_mining_keeps_the_templates_of_best_val_accuracy_ties_to_the_earlier():
    """Against a loop over templates and images: each template's zero-shot accuracy alone."""
    g = torch.Generator().manual_seed(0)
    classes, templates, dim = 4, 12, 6
    means = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    noise = torch.linspace(0.0, 3.0, templates)  # later templates point further from the class
    pool = means[:, None] + noise[None, :, None] * torch.randn(classes, templates, dim,
                                                               generator=g)
    pool[:, 5] = pool[:, 4] * 2.0  # a tie: the same directions, another norm
    labels = torch.arange(classes).repeat(5)
    features = means[labels] + 0.3 * torch.randn(len(labels), dim, generator=g)
    accuracy = []
    for t in range(templates):
        hits = 0
        for x, y in zip(features, labels, strict=True):
            scores = [float(F.cosine_similarity(x, pool[c, t], dim=0)) for c in range(classes)]
            hits += int(np.argmax(scores) == int(y))
        accuracy.append(hits / len(labels))
    expected = sorted(range(templates), key=lambda t: (-accuracy[t], t))[:7]
    assert mine_templates(pool, features, labels, keep=7) == expected
    assert len(set(accuracy)) > 2  # the check can tell orders apart
    chosen = mine_templates(pool, features, labels, keep=templates)
    assert chosen.index(4) < chosen.index(5)  # the tie goes to the earlier template


@pytest.fixture(scope="module")
def text_store(tmp_path_factory):
    """A 3-class food101 miniature at 4 shots with mirrored centers, holding hand and pool."""
    folder = tmp_path_factory.mktemp("text")
    store = folder / "store.zarr"
    for prompts in ("pool", "hand"):
        extract_miniature(folder / "data", MODEL, store, prompts=prompts, shots=(4,),
                          center_flip=True)
    return folder, store


def _fit(store: Path, out: Path, **options) -> object:
    config = FitConfig(store=str(store), shots=(4,), seeds=(1,), out=str(out),
                       methods=("linear_probe",), **{**FAST, **options})
    [record] = fit_stores([config])
    return record


def test_mined_run_uses_the_rules_templates_and_saves_its_classifier(text_store, tmp_path):
    _, url = text_store
    record = _fit(url, tmp_path / "out", prompts="mined")
    store = open_store(str(url))
    # the rule, recomputed from the store: each pool template alone on the run's val rows
    embeddings, counts = store.sentence_embeddings("pool")
    pool = torch.from_numpy(embeddings).reshape(len(counts), 180, -1)
    _, val_rows = store.fewshot(1, 4)
    val_rows = np.sort(val_rows)
    val = torch.from_numpy(store.read_rows("val", "pooled", val_rows)).float()
    labels = torch.from_numpy(store.read_rows("val", "label", val_rows).astype(np.int64))
    chosen = mine_templates(pool, val, labels)
    assert record.text["templates"] == [template_pool()[t] for t in chosen]
    assert len(chosen) == MINED_TEMPLATES
    expected = F.normalize(F.normalize(pool[:, chosen], dim=-1).mean(1), dim=-1)
    saved = result_classifier(load_result(record.path), store)
    torch.testing.assert_close(saved, expected, rtol=0, atol=1e-6)
    # zero-shot CLIP with that classifier is what the result reports
    test = torch.from_numpy(store.read_rows("test", "pooled", store.readable_rows("test")))
    test_labels = torch.from_numpy(store.read_rows("test", "label",
                                                   store.readable_rows("test")).astype(int))
    accuracy = (test.float() @ expected.T).argmax(-1).eq(test_labels).float().mean().item()
    assert record.methods["zero_shot"]["test_acc"] == pytest.approx(accuracy)
    # another identity than the pool's own classifier: its own file, never the other's
    pooled = _fit(url, tmp_path / "out", prompts="pool")
    assert pooled.path != record.path and pooled.text is None


def test_a_run_made_classifier_missing_or_tampered_is_refused(text_store, tmp_path):
    _, url = text_store
    record = _fit(url, tmp_path / "out", prompts="mined")
    path = classifier_file(record.path)
    weights = result_classifier(load_result(record.path), open_store(str(url)))
    save_file({"classifier": torch.full_like(weights, float("nan"))}, str(path),
              metadata={"run_id": record.run_id})
    with pytest.raises(StoreError, match="finite float32 classifier"):
        result_classifier(load_result(record.path), open_store(str(url)))
    path.unlink()
    assert "classifier.safetensors is missing" in files_problem(load_result(record.path))
    again = _fit(url, tmp_path / "out", prompts="mined")  # a run with a file missing reruns
    assert path.is_file() and again.run_id != record.run_id


@pytest.mark.slow
def test_linear_fine_tuning_trains_the_classifier_every_method_then_uses(text_store, tmp_path):
    _, url = text_store
    text = _fit(url, tmp_path / "out")
    record = _fit(url, tmp_path / "out", classifier="linear")
    assert record.path != text.path and text.text is None
    linear = record.text["linear"]
    assert linear["image_views"] == "center+flip" and linear["selected_on"] == "val"
    assert linear["configurations"] == 6  # lr 2 x wd 3 at the one valid batch size (8)
    store = open_store(str(url))
    weights = result_classifier(load_result(record.path), store)
    initial = torch.from_numpy(store.classifier("hand"))
    assert not torch.allclose(weights, initial)  # trained, from the text
    _, val_rows = store.fewshot(1, 4)
    val_rows = np.sort(val_rows)
    val = F.normalize(torch.from_numpy(store.read_rows("val", "pooled", val_rows)).float(), -1)
    labels = torch.from_numpy(store.read_rows("val", "label", val_rows).astype(np.int64))
    assert (val @ weights.T).argmax(-1).eq(labels).float().mean().item() == \
        pytest.approx(linear["val_acc"])
    rows = store.readable_rows("test")
    test = F.normalize(torch.from_numpy(store.read_rows("test", "pooled", rows)).float(), -1)
    test_labels = torch.from_numpy(store.read_rows("test", "label", rows).astype(np.int64))
    assert linear["test_acc"] == pytest.approx(
        (test @ weights.T).argmax(-1).eq(test_labels).float().mean().item())
    # zero-shot CLIP stays the prompt set's classifier: the text run's row, to the digit
    assert record.methods["zero_shot"] == text.methods["zero_shot"]


@pytest.mark.slow
def test_linear_fine_tuning_with_too_few_images_is_refused_before_any_work(tmp_path):
    url = extract_miniature(tmp_path / "data", MODEL, tmp_path / "store.zarr")  # 1 shot, 3
    config = FitConfig(store=str(url), shots=(1,), seeds=(1,), out=str(tmp_path / "out"),
                       classifier="linear", methods=(), **FAST)
    with pytest.raises(RecipeError, match="--classifier linear: 1 shots"):
        fit_stores([config])
    assert not (tmp_path / "out").exists()


def test_mined_needs_the_pool_in_the_store(tmp_path):
    url = extract_miniature(tmp_path / "data", MODEL, tmp_path / "store.zarr")
    config = FitConfig(store=str(url), shots=(1,), seeds=(1,), out=str(tmp_path / "out"),
                       prompts="mined", methods=(), **FAST)
    with pytest.raises(RecipeError, match=r"--prompts pool.*chooses its templates"):
        fit_stores([config])


@pytest.mark.slow
def test_exported_model_carries_the_runs_own_classifier(text_store, tmp_path):
    from safetensors.torch import load_file

    from safe_cache.export import export_model

    _, url = text_store
    record = _fit(url, tmp_path / "out", prompts="mined", classifier="linear")
    folder = export_model(record.path, tmp_path / "model")
    exported = load_file(str(folder / "classifier.safetensors"))["classifier"]
    torch.testing.assert_close(exported, result_classifier(load_result(record.path),
                                                           open_store(str(url))))
    assert not torch.allclose(exported, torch.from_numpy(open_store(str(url)).classifier("pool")))


def test_ablation_prompts_runs_every_fig8_variant_on_imagenet():
    from safe_cache.study import load_study

    study = load_study("ablation-prompts")
    assert study.datasets == ("imagenet",) and study.shots == (1, 2, 4, 8, 16)
    assert [study.variant_name(*v) for v in study.variants] == [
        "safe-classname", "safe-vanilla", "safe-hand", "safe-mined", "safe-cupl",
        "safe-cupl-linear"]


def test_each_fig8_variant_stands_beside_its_own_published_row_only():
    from safe_cache.study.figures import figure_rows

    def row(setting, shots, mean, reasons=()):
        return {"dataset": "imagenet", "method": "safe", "setting": setting, "shots": shots,
                "backbone": "RN50-openai",
                "mean": mean, "std": 0.1, "seeds": 3, "reasons": list(reasons)}

    from safe_cache.study import load_study
    from safe_cache.study.figures import published_keys

    keys = published_keys(load_study("ablation-prompts"))
    assert keys["safe-cupl"] == "cupl" and keys["safe-cupl-linear"] == "cupl-linear"
    prompts = "prompts imagenet, not the hand templates"
    rows = figure_rows([row("safe-hand", 1, 61.0), row("safe-cupl", 1, 62.0, [prompts]),
                        row("safe-cupl", 2, 62.5, [prompts]),
                        row("safe-cupl-linear", 1, 63.0, [prompts, "classifier linear, ..."]),
                        row("safe-mined", 1, 60.0, [prompts]),
                        row("safe-vanilla", 4, 59.0, [prompts, "recipe views, not ..."])],
                       "figure_8", keys)
    cells = {r["variant"]: {k: c["paper"] for k, c in r["cells"].items()} for r in rows}
    assert cells == {"safe-hand": {1: 61.85}, "safe-cupl": {1: 62.82, 2: None},
                     "safe-cupl-linear": {1: 62.98}, "safe-mined": {1: None},
                     "safe-vanilla": {4: None}}
    assert [r["variant"] for r in rows] == ["safe-vanilla", "safe-hand", "safe-mined",
                                            "safe-cupl", "safe-cupl-linear"]  # Fig. 8's order
    # a folder the study does not name stands beside no published row
    [alone] = figure_rows([row("safe", 1, 61.0)], "figure_8", keys)
    assert alone["cells"][1]["paper"] is None
    # two backbones of one variant are two rows, never one cell overwritten by the other
    other = {**row("safe-hand", 1, 70.0, ["the paper reports RN50, not ViT-B-16"]),
             "backbone": "ViT-B-16-openai"}
    both = figure_rows([{**row("safe-hand", 1, 61.0), "backbone": "RN50-openai"}, other],
                       "figure_8", keys)
    assert [(r["backbone"], r["cells"][1]["mean"], r["cells"][1]["paper"]) for r in both] == [
        ("RN50-openai", 61.0, 61.85), ("ViT-B-16-openai", 70.0, None)]


def _replace_classifier(record, weights: torch.Tensor) -> None:
    """Save another classifier beside a result and record its digest there, consistently (the
    content digest redone): what a run that made these weights would have written."""
    from safe_cache.fit.results import content_sha256
    from safe_cache.fit.text import classifier_sha256

    save_file({"classifier": weights}, str(classifier_file(record.path)),
              metadata={"run_id": record.run_id})
    data = json.loads(record.path.read_text())
    data["text"]["classifier_sha256"] = classifier_sha256(weights)
    data["content_sha256"] = content_sha256(data)
    record.path.write_text(json.dumps(data))


def test_gradcam_explains_the_class_the_runs_own_classifier_predicts(text_store, tmp_path):
    """The analyses read the classifier the run saved, not the store's: with the saved one's
    rows permuted, every predicted class moves with the permutation."""
    from safe_cache.analysis.gradcam import checked_rows, gradcam_maps, head_features

    _, url = text_store
    record = _fit(url, tmp_path / "out", prompts="mined")
    store = open_store(str(url))
    saved = result_classifier(load_result(record.path), store)
    permutation = torch.tensor([2, 0, 1])
    _replace_classifier(record, saved[permutation].contiguous())
    rows = [int(r) for r in store.readable_rows("test")]
    maps = gradcam_maps(str(url), record.path, rows, target="predicted")
    features, _ = head_features(store, record.path)
    dense, _, _ = checked_rows(store, "test", rows)
    for name in ("original", "blend"):
        with torch.no_grad():
            before = (F.normalize(features[name](dense), dim=-1) @ saved.T).argmax(-1)
        moved = permutation.argsort()[before]  # row j of the permuted classifier is class p[j]
        assert maps[name]["classes"] == moved.tolist() != before.tolist(), name


@pytest.mark.parametrize("name", ["mined.json", "pool.json", "hand.json"])
def test_a_prompt_file_named_like_a_built_in_set_is_refused(tmp_path, name):
    """A store names a file's set by its stem: `mined.json` would stand in for the pool."""
    from safe_cache import ConfigError
    from safe_cache.extract import ExtractConfig

    path = tmp_path / name
    path.write_text(json.dumps({"a": ["an a."]}))
    with pytest.raises(ConfigError, match="may not be named like the built-in set"):
        ExtractConfig(dataset="food101", prompts=str(path))
    with pytest.raises(ConfigError, match=f"rename it, e.g. .*my-{path.stem}.json"):
        FitConfig(store="s.zarr", prompts=str(path))


@pytest.mark.parametrize("change", ["wider", "zeros", "float64", "other_values"])
def test_a_saved_classifier_not_the_recorded_one_is_refused(text_store, tmp_path, change):
    """The result records the digest of the float32 classifier it saved: another width, dtype
    or any other values (a zero matrix, a row edited) is refused in one line."""
    _, url = text_store
    record = _fit(url, tmp_path / "out", prompts="mined")
    store = open_store(str(url))
    weights = result_classifier(load_result(record.path), store)
    forged = {"wider": torch.cat([weights, weights[:, :1]], dim=1),
              "zeros": torch.zeros_like(weights), "float64": weights.double(),
              "other_values": weights + 1e-3}[change]
    save_file({"classifier": forged.contiguous()}, str(classifier_file(record.path)),
              metadata={"run_id": record.run_id})
    expected = "its digest differs" if change in ("zeros", "other_values") else \
        "a finite float32 classifier of shape"
    with pytest.raises(StoreError, match=expected):
        result_classifier(load_result(record.path), store)


def test_a_text_block_removed_from_a_mined_result_is_refused(text_store, tmp_path):
    """Config and text block agree or the result is refused, even with its digests redone."""
    from safe_cache import ResultError
    from safe_cache.fit.identity import identity_sha256
    from safe_cache.fit.results import content_sha256

    _, url = text_store
    record = _fit(url, tmp_path / "out", prompts="mined")
    data = json.loads(record.path.read_text())
    data.pop("text")
    data["identity_sha256"] = identity_sha256(data["identity"])
    data["content_sha256"] = content_sha256(data)
    record.path.write_text(json.dumps(data))
    with pytest.raises(ResultError, match="lacks the 'text' block"):
        load_result(record.path)


@pytest.mark.parametrize("edit, needle", [
    (lambda text: text.update(val_acc=5), "text.templates must list"),
    (lambda text: text.update(linear={"val_acc": 0.5, "test_acc": 0.5}), "must record what"),
    (lambda text: text.pop("templates"), "must record what"),
])
def test_a_malformed_text_block_is_refused_in_one_line(text_store, tmp_path, edit, needle):
    """Whatever the block holds, a ResultError naming it (a TypeError escaped before), and a
    block that records something the config did not make (or lacks what it did) is refused."""
    from safe_cache import ResultError
    from safe_cache.fit.results import content_sha256

    _, url = text_store
    record = _fit(url, tmp_path / "out", prompts="mined")
    data = json.loads(record.path.read_text())
    edit(data["text"])
    data["content_sha256"] = content_sha256(data)
    record.path.write_text(json.dumps(data))
    with pytest.raises(ResultError, match=needle):
        load_result(record.path)


def test_mining_refuses_a_pool_that_is_not_the_shipped_templates(text_store, tmp_path):
    """The run records its templates' texts by index into template_pool.json: a store's
    `pool` set of other sentences (an older pool.json file of 180 per class) is refused."""
    import shutil

    import zarr

    from safe_cache.fit.text import pool_embeddings

    _, url = text_store
    copy = tmp_path / "copy.zarr"
    shutil.copytree(url, copy)
    assert pool_embeddings(open_store(str(copy))).shape[1] == 180  # the shipped pool: read
    sentences = open_store(str(copy)).prompt_sentences("pool")
    sentences[0] = sentences[0][::-1]  # the same 180 texts, another order
    zarr.open_group(str(copy), mode="r+")["text/pool"].attrs["sentences"] = sentences
    with pytest.raises(StoreError, match=r"not the 180 templates of template_pool\.json"):
        pool_embeddings(open_store(str(copy)))


@pytest.mark.slow  # a second extract
def test_analyses_refuse_a_result_of_another_dataset_on_the_same_backbone(text_store,
                                                                          tmp_path):
    """The backbone fingerprint is every store's of that backbone: gradcam and attention
    compare the store's content digest too, as export does."""
    from safe_cache.analysis.attention import attention_maps
    from safe_cache.analysis.gradcam import gradcam_maps

    _, url = text_store
    record = _fit(url, tmp_path / "out", prompts="mined")
    other = extract_miniature(tmp_path / "dtd", MODEL, tmp_path / "dtd.zarr", dataset="dtd")
    assert open_store(str(other)).fingerprint == open_store(str(url)).fingerprint
    for explain in (gradcam_maps, attention_maps):
        with pytest.raises(StoreError, match="store_sha256 differs"):
            explain(str(other), record.path, [0])
