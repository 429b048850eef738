"""Out-of-distribution evaluation: class-subset mapping onto ImageNet's classifier rows; Table
III's rows beside the paper's, each method beside its own published entry."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from factories import build_store, ood_record, result_record, write_record

from safe_cache import StoreError, load_backbone
from safe_cache.analysis import literature
from safe_cache.analysis.ood_table import OOD_COLUMNS, ood_rows
from safe_cache.analysis.report import footnotes
from safe_cache.cli import main
from safe_cache.errors import ResultError
from safe_cache.fit.methods import METHODS
from safe_cache.fit.ood import BetaCurve, evaluate_ood, resolve_ood_stores
from safe_cache.fit.results import load_result, load_results
from safe_cache.model.inference import blend_features
from safe_cache.store import StoreLayout

CLASSES = 4


def variant_store(url: str, backbone, subset, labels) -> np.ndarray:
    card = backbone.card
    rng = np.random.default_rng(len(labels))
    dense = np.abs(rng.standard_normal((len(labels), card["tokens"], card["channels"])))
    dense = dense.astype(np.float32)
    with torch.no_grad():
        pooled = backbone.head(torch.from_numpy(dense)).numpy()
    dataset = {"name": "variant", "num_classes": len(subset or range(CLASSES)),
               "class_subset": subset}
    build_store(url, card, splits={"test": labels}, features={"test": {
        "dense": dense, "pooled": pooled}}, dataset=dataset,
        layout=StoreLayout(chunk_images=len(labels)))
    return dense


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_subset_variants_use_the_matching_classifier_rows(tmp_path):
    backbone = load_backbone("safe-cache-tiny-rn", init_seed=2)
    head = backbone.new_head().eval()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.01 * torch.randn_like(p))
    classifier = F.normalize(torch.randn(CLASSES, backbone.card["embed_dim"]), dim=-1)
    labels = [0, 1, 1, 0, 1, 0]
    dense = variant_store(str(tmp_path / "a.zarr"), backbone, [1, 3], labels)
    variant_store(str(tmp_path / "v2.zarr"), backbone, None, [0, 1, 2, 3])

    def blend(o, t):
        return blend_features(o, t, 0.5)

    predictors = {"zero_shot": lambda o, t: o @ classifier.T,
                  "safe": lambda o, t: blend(o, t) @ classifier.T}
    curve = BetaCurve(classifier, (0.0, 0.5, 2.0), "blend", trained_at=0.5)
    out = evaluate_ood(head, predictors,
                       {"a": str(tmp_path / "a.zarr"), "v2": str(tmp_path / "v2.zarr")},
                       backbone.fingerprint, backbone.card, curve=curve)
    assert out["a"]["classes"] == 2 and out["v2"]["classes"] == CLASSES
    with torch.no_grad():
        x = torch.from_numpy(dense)
        features = blend(backbone.head(x), head(x))
    expected = (features @ classifier[[1, 3]].T).argmax(-1).eq(torch.tensor(labels)).float()
    assert out["a"]["safe"] == expected.mean().item()
    # the beta curve, on the subset's columns too; at the trained beta it is SAFE's accuracy
    points = {p["beta"]: p["test_acc"] for p in out["a"]["beta_curve"]["points"]}
    assert points[0.5] == out["a"]["safe"]
    with torch.no_grad():
        at_two = blend_features(backbone.head(x), head(x), 2.0)
    assert points[2.0] == (at_two @ classifier[[1, 3]].T).argmax(-1).eq(
        torch.tensor(labels)).float().mean().item()
    other = load_backbone("safe-cache-tiny-rn", init_seed=9)
    with pytest.raises(StoreError, match="fingerprint"):
        evaluate_ood(head, predictors, {"a": str(tmp_path / "a.zarr")},
                     other.fingerprint, other.card)


def test_variant_names_resolve_beside_the_source_store():
    card = {"model": "RN50", "pretrained": "openai"}
    stores = resolve_ood_stores(("imagenet_a", "s3://b/x.zarr"),
                                "stores/imagenet/RN50-openai.zarr", card)
    assert stores == {"imagenet_a": "stores/imagenet_a/RN50-openai.zarr", "x": "s3://b/x.zarr"}


def test_report_prints_a_table_iii(tmp_path):
    run = result_record("imagenet", 16, 1, safe=0.66, zero=0.58,
                        ood={"imagenet_a": {"zero_shot": 0.2, "safe": 0.24}})
    path = write_record(tmp_path, run)
    rows = {r["method"]: r for r in ood_rows([load_result(path)])}
    assert rows["safe"]["imagenet_a"] == pytest.approx(24.0)
    assert rows["safe"]["paper"]["imagenet_a"] == 23.6
    assert rows["zero_shot"]["imagenet"] == pytest.approx(58.0)
    cli = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert cli.exit_code == 0 and "out of distribution" in cli.output and "(23.6)" in cli.output


def test_table_iii_takes_the_16_shot_runs_only(tmp_path):
    for shots, safe, variant in ((1, 0.50, 0.10), (16, 0.66, 0.24)):
        write_record(tmp_path, result_record(
            "imagenet", shots, 1, safe=safe, zero=0.58,
            ood={"imagenet_a": {"zero_shot": 0.2, "safe": variant}}))
    rows = {r["method"]: r for r in ood_rows(load_results(tmp_path))}
    assert rows["safe"]["imagenet"] == pytest.approx(66.0)
    assert rows["safe"]["imagenet_a"] == pytest.approx(24.0)


def test_variant_store_urls_in_the_default_layout_are_named_by_their_folder():
    from safe_cache.fit.ood import resolve_ood_stores

    card = {"model": "RN50", "pretrained": "openai", "cut": "pool"}
    urls = ("stores/imagenet_a/RN50-openai.zarr", "stores/imagenet_r/RN50-openai.zarr",
            "elsewhere/my_sketch.zarr")
    resolved = resolve_ood_stores(urls, "stores/imagenet/RN50-openai.zarr", card)
    assert resolved == {"imagenet_a": urls[0], "imagenet_r": urls[1], "my_sketch": urls[2]}
    by_name = resolve_ood_stores(("imagenet_v2",), "stores/imagenet/RN50-openai.zarr", card)
    assert by_name == {"imagenet_v2": "stores/imagenet_v2/RN50-openai.zarr"}


@pytest.mark.parametrize("point, needle", [
    ({"beta": 0.5, "test_acc": "0.9"}, "test_acc"),
    ({"beta": True, "test_acc": 0.5}, "beta"),
    ({"beta": -1.0, "test_acc": 0.5}, "beta"),
    ({"beta": 0.5, "test_acc": 1.5}, "test_acc"),
])
def test_an_edited_ood_beta_curve_is_refused(tmp_path, point, needle):
    """A curve point read back is an accuracy at a finite beta, or the result is refused."""
    good = {"beta": 0.5, "test_acc": 0.6}
    ood = {"imagenet_v2": {"zero_shot": 0.5, "safe": 0.6, "images": 10, "classes": 1000,
                           "beta_curve": {"made": "post hoc", "points": [good]}}}
    path = write_record(tmp_path, result_record("imagenet", 16, 1, 0.7, 0.6, ood=ood))
    assert load_result(path).ood["imagenet_v2"]["beta_curve"]["points"] == [good]
    ood["imagenet_v2"]["beta_curve"]["points"] = [point]
    path = write_record(tmp_path, result_record("imagenet", 16, 2, 0.7, 0.6, ood=ood))
    with pytest.raises(ResultError, match=needle):
        load_result(path)


def test_table_iii_rows_stand_beside_their_own_published_entry(tmp_path):
    """Each method's OOD row gets the paper's Table III entry of the same method and backbone
    (means and std over seeds, the delta ours - paper per column); Tip-Adapter, absent from
    Table III, gets none (never Tip-Adapter-F's); ViT-B/16's table has no Tip-Adapter-F."""
    paper = literature.safe_paper()["table_3"]["backbones"]
    for seed, shift in ((1, 0.0), (2, 0.02)):
        write_record(tmp_path, ood_record(seed, shift=shift))
        write_record(tmp_path, ood_record(seed, "ViT-B-16", shift), "ViT-B-16-openai")
    rows = {(r["backbone"], r["method"]): r for r in ood_rows(load_results(tmp_path))}
    safe = rows["RN50-openai", "safe"]
    assert safe["imagenet"] == pytest.approx(67.0) and safe["seeds"] == 2
    assert safe["std"]["imagenet"] == pytest.approx(statistics.stdev([66.0, 68.0]))
    for column in OOD_COLUMNS:
        for method in ("zero_shot", "linear_probe", "tip_adapter_f", "safe", "safe_a"):
            row = rows["RN50-openai", method]
            assert row["paper"][column] == paper["RN50"][method][column], (method, column)
            assert row["delta"][column] == pytest.approx(row[column] - row["paper"][column])
        assert rows["RN50-openai", "tip_adapter"]["paper"][column] is None
        assert rows["RN50-openai", "tip_adapter"]["delta"][column] is None
        assert rows["ViT-B-16-openai", "tip_adapter_f"]["paper"][column] is None
        assert rows["ViT-B-16-openai", "safe"]["paper"][column] == paper["ViT-B-16"]["safe"][
            column]
    assert rows["RN50-openai", "safe_a"]["imagenet_r"] == pytest.approx(67.0 - 20.0)
    assert not any(r["paper_note"] for r in rows.values())


def test_table_iii_methods_a_store_cannot_run_are_published_only_rows(tmp_path):
    """CoOp, CoCoOp, WiSE-FT, Cross-Modal FT and CALIP-FS appear as published-only rows, in the
    paper's order, of the backbone the paper lists them for; beside a run off the paper's
    setting neither they nor a paper number stand, and the reason is a footnote."""
    paper = literature.safe_paper()["table_3"]["backbones"]
    ours = set(METHODS)
    for model, methods in paper.items():  # every Table III row is ours or published-only
        assert set(methods) <= ours | set(literature.TABLE_III_FULL_ENCODER_METHODS), model
    write_record(tmp_path, ood_record(1))
    write_record(tmp_path, ood_record(1, "ViT-B-16"), "ViT-B-16-openai")
    rows = ood_rows(load_results(tmp_path))
    for model, backbone in (("RN50", "RN50-openai"), ("ViT-B-16", "ViT-B-16-openai")):
        published = [r for r in rows if r["published"] and r["backbone"] == backbone]
        assert [r["method"] for r in published] == [
            m for m in literature.TABLE_III_FULL_ENCODER_METHODS if m in paper[model]]
        for row in published:
            assert row["paper"] == paper[model][row["method"]]
            assert all(row[c] is None for c in OOD_COLUMNS) and "Table III" in row["source"]
    assert {r["method"] for r in rows if r["published"] and r["model"] == "RN50"} \
        .isdisjoint({"cocoop"})  # Table III lists CoCoOp with ViT-B/16 only
    off = tmp_path / "off"
    write_record(off, ood_record(1, iters=400))
    rows = ood_rows(load_results(off))
    assert not [r for r in rows if r["published"]]
    assert all(v is None for r in rows for v in r["paper"].values())
    notes = footnotes(rows)
    assert notes == ["paper '-': iters not the paper's"]
    notes_of = {r["method"]: r["paper_note"] for r in rows}
    assert notes_of["safe"] == notes_of["tip_adapter_f"] == "iters not the paper's"
    assert notes_of["tip_adapter"] is None  # no entry to leave out
