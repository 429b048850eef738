"""Exported models: predictions equal fit's logits; tampering and unreadable images are clear."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from safe_cache.cli import main
from safe_cache.data.datasets import open_dataset
from safe_cache.data.views import load_image
from safe_cache.demo import run_demo
from safe_cache.export import ModelFolderError, export_model, load_model
from safe_cache.model.backbone import head_from_config
from safe_cache.model.inference import blend_features, tip_logits
from safe_cache.store import open_store

pytestmark = pytest.mark.slow  # every test here starts from the demo's store (~20 s to build)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    result = run_demo(str(root), workers=0, iters=100)
    path = next(Path(result["data"], "results").rglob("shots4_seed1_safe_o*.json"))
    return root, result, path


def store_logits(result_path: Path, method: str) -> tuple[torch.Tensor, list[str]]:
    """The logits fit's features give for the test split (dense maps from the store)."""
    result = json.loads(result_path.read_text())
    store = open_store(result["store"]["url"])
    _, config = store.head_state()
    head = head_from_config(config, store.manifest["backbone"])
    head.load_state_dict(load_file(str(result_path.with_suffix(".safetensors"))))
    test = store.split("test")
    with torch.no_grad():
        tuned = head(torch.from_numpy(test["dense"].values.astype(np.float32)))
    features = blend_features(torch.from_numpy(test["pooled"].values), tuned, 0.5)
    classifier = torch.from_numpy(store.classifier())
    scale = store.manifest["backbone"]["logit_scale"]
    logits = scale * features @ classifier.T
    if method == "safe_a":
        cache = load_file(str(result_path.with_suffix(".safe_a.safetensors")))
        tip = result["methods"]["safe_a"]
        logits = tip_logits(features, classifier, cache["keys"], cache["values"], tip["alpha"],
                            tip["gamma"], scale)
    return logits, [str(p) for p in test["path"].values]


@pytest.mark.parametrize("method", ["safe", "safe_a"])
def test_exported_predictions_equal_fit_logits(demo, tmp_path, method):
    _, result, path = demo
    folder = export_model(path, tmp_path / method, method=method)
    model = load_model(folder)
    expected, paths = store_logits(path, method)
    dataset = open_dataset(result["spec"], result["data"])
    images = torch.stack([model.backbone.preprocess(load_image(dataset.image_root / p))
                          for p in paths])
    actual = model.logits(images)
    # the store holds float16 maps, the model computes from float32 ones
    assert torch.allclose(actual, expected, atol=0.05 * expected.abs().max().item())
    assert actual.argmax(-1).eq(expected.argmax(-1)).float().mean() >= 0.97
    card = json.loads((folder / "card.json").read_text())
    assert card["accuracy"][method]["test"] == json.loads(path.read_text())["methods"][method][
        "test_acc"]


def test_tampered_folders_are_refused(demo, tmp_path):
    _, _, path = demo
    folder = export_model(path, tmp_path / "m")
    (folder / "classifier.safetensors").write_bytes(b"x" + (folder / "classifier.safetensors")
                                                    .read_bytes()[1:])
    with pytest.raises(ModelFolderError, match=r"classifier\.safetensors does not match"):
        load_model(folder)
    folder = export_model(path, tmp_path / "m2")
    (folder / "head.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=r"head\.safetensors is missing"):
        load_model(folder)
    folder = export_model(path, tmp_path / "m3")
    head = load_file(str(folder / "head.safetensors"))
    head["proj"] = head["proj"][:, :3].contiguous()  # wrong shape, and a card that agrees
    save_file(head, str(folder / "head.safetensors"))
    card = json.loads((folder / "card.json").read_text())
    import hashlib

    card["sha256"]["head.safetensors"] = hashlib.sha256(
        (folder / "head.safetensors").read_bytes()).hexdigest()
    from safe_cache.export import card_digest

    card["card_sha256"] = card_digest(card)  # a card consistent with itself, yet wrong
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelFolderError, match="does not fit"):
        load_model(folder)


def test_predict_a_folder_with_an_unreadable_image(demo, tmp_path):
    _, result, path = demo
    folder = export_model(path, tmp_path / "m")
    images = tmp_path / "images"
    images.mkdir()
    source = Path(result["data"]) / "shapes" / "images" / "red_circle" / "000.jpg"
    (images / "a.jpg").write_bytes(source.read_bytes())
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    model = load_model(folder)
    with pytest.raises(ModelFolderError, match=r"broken\.jpg.*--skip-bad"):
        model.predict(images)
    predictions = model.predict(images, skip_bad=True, top_k=2)
    assert [Path(p.path).name for p in predictions] == ["a.jpg"]
    assert predictions[0].top[0][0] == "red circle" and len(predictions[0].top) == 2
    assert any("broken.jpg" in s for s in model.skipped)
    cli = CliRunner().invoke(main, ["predict", str(folder), str(images), "--skip-bad", "--json",
                                    "--top-k", "1"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)[0]["top"][0]["class"] == "red circle"
    assert "skipped" in cli.output


def test_merge_writes_an_open_clip_checkpoint(demo, tmp_path):
    _, _, path = demo
    folder = export_model(path, tmp_path / "merged", merge=True)
    model = load_model(folder)
    merged = load_file(str(folder / "open_clip_merged.safetensors"))
    model.backbone.model.load_state_dict(merged)
    images = torch.randn(2, 3, *model.backbone.card["image_size"])
    with torch.no_grad():
        expected = model.head(model.backbone.trunk(images))
        actual = model.backbone.model.encode_image(images, normalize=False)
    assert torch.allclose(actual, expected, atol=1e-4 * expected.abs().max().item())
    assert "beta = 0" in (folder / "MERGED.txt").read_text()


def test_attention_maps_before_and_after_fine_tuning(demo, tmp_path):
    """(Lives here to reuse the demo run.) Spatial pooling weights of both heads, and PNGs."""
    from safe_cache.analysis.attention import attention_maps, plot_attention

    _, result, path = demo
    maps = attention_maps(result["store"], path, [0, 5])
    grid = open_store(result["store"]).manifest["backbone"]["token_grid"]
    for name in ("original", "finetuned"):
        values = maps[name]
        assert values.shape[0] == 2 and values.shape[2:] == tuple(grid)
        sums = values.sum(axis=(2, 3))
        assert (values >= 0).all() and (sums <= 1 + 1e-5).all() and (sums > 0.5).all()
    assert not np.allclose(maps["original"], maps["finetuned"], atol=1e-3)
    image_root = Path(result["data"]) / "shapes" / "images"
    written = plot_attention(maps, image_root, tmp_path / "maps", per_head=True)
    assert len(written) == 2
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)
