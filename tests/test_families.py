"""The attention-pool families beyond 2021's CLIP (SigLIP / PE-Core MAP heads, CoCa's pooler)
through the whole pipeline: extract a miniature, fit SAFE, put the head back into open_clip."""

from __future__ import annotations

import pytest
import torch
from miniatures import write_split_zhou
from safetensors.torch import load_file

from safe_cache import load_backbone
from safe_cache.data.prompts import text_classifier
from safe_cache.extract import ExtractConfig, extract
from safe_cache.fit import FitConfig, fit
from safe_cache.store import open_store

FAMILIES = ["safe-cache-tiny-map", "safe-cache-tiny-map-cls", "safe-cache-tiny-coca",
            pytest.param("PE-Core-B-16", marks=pytest.mark.slow)]


@pytest.mark.parametrize("model", FAMILIES)
def test_extract_fit_and_put_the_head_back(tmp_path, model):
    write_split_zhou(tmp_path, "food101", classes=3)
    store = str(tmp_path / "store.zarr")
    extract(ExtractConfig(dataset="food101", root=str(tmp_path), model=model, pretrained=None,
                          store=store, shots=(1,), seeds=(1,), views=1, workers=0))
    card = open_store(store).manifest["backbone"]
    assert card["family"] in ("map", "coca")
    [result] = fit(FitConfig(store=store, shots=(1,), seeds=(1,), iters=20, eval_every=10,
                             lrs=(1e-3,), wds=(0.0,), device="cpu", out=str(tmp_path / "res"),
                             methods=()))
    assert 0.0 <= result.methods["safe"]["test_acc"] <= 1.0
    tuned = load_file(str(result.path.with_suffix(".safetensors")))
    backbone = load_backbone(model, None)
    original = {k: v.clone() for k, v in backbone.head.state_dict().items()}
    assert tuned.keys() == original.keys()
    assert any(not torch.equal(tuned[k], original[k]) for k in tuned)  # it trained
    # The fine-tuned head's keys are model.visual's: it loads back into the open_clip model.
    backbone.model.visual.load_state_dict(tuned, strict=False)
    backbone.head.load_state_dict(tuned)
    images = torch.randn(2, 3, *card["image_size"])
    with torch.no_grad():
        expected = backbone.model.encode_image(images, normalize=False)
        actual = backbone.head(backbone.trunk(images))
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_text_classifier_of_a_map_model_uses_open_clips_tokenizer():
    """The tiny MAP config's text tower is open_clip's (SigLIP's needs the hub tokenizer)."""
    backbone = load_backbone("safe-cache-tiny-map")
    sentences = [["a photo of a cat."], ["a photo of a dog."]]
    weights = text_classifier(backbone.model, backbone.tokenizer(), sentences)
    assert weights.shape == (2, backbone.card["D"])
    assert torch.allclose(weights.norm(dim=-1), torch.ones(2), atol=1e-5)
