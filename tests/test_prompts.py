"""Prompt sets and the text classifier (checked against open_clip's tokenizer and encode_text)."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from safe_cache import DatasetError
from safe_cache.data.datasets import load_spec
from safe_cache.data.prompts import class_sentences, prompt_set_name, text_classifier

CLASSES = ["apple pie", "baby back ribs", "baklava"]


def test_builtin_prompt_sets():
    templates = load_spec("food101").templates
    hand = class_sentences("hand", CLASSES, templates)
    assert hand[0] == ["a photo of apple pie, a type of food."]
    assert class_sentences("classname", CLASSES, templates)[1] == ["baby back ribs"]
    assert class_sentences("vanilla", CLASSES, templates)[2] == ["a photo of a baklava."]
    imagenet = class_sentences("hand", ["tench"], load_spec("imagenet").templates)[0]
    assert len(imagenet) == 7 and imagenet[0] == "itap of a tench."


def test_cupl_file(tmp_path):
    path = tmp_path / "cupl_food.json"
    path.write_text(json.dumps({"Apple_Pie": ["A golden pie.", "Sliced apples in crust."],
                                "baby_back_ribs": ["Glazed ribs."], "baklava": ["Layers."]}))
    sentences = class_sentences(str(path), CLASSES, ())
    assert sentences[0] == ["A golden pie.", "Sliced apples in crust."]
    assert prompt_set_name(str(path)) == "cupl_food" and prompt_set_name("hand") == "hand"
    path.write_text(json.dumps({"baklava": ["Layers."]}))
    with pytest.raises(DatasetError, match="no sentences for 2 classes"):
        class_sentences(str(path), CLASSES, ())
    with pytest.raises(DatasetError, match="Unknown prompt set"):
        class_sentences("fancy", CLASSES, ())


def test_text_classifier_matches_direct_computation(load_cached):
    backbone = load_cached("safe-cache-tiny-vit")
    tokenizer = open_clip.get_tokenizer("safe-cache-tiny-vit")
    sentences = class_sentences("hand", CLASSES, load_spec("imagenet").templates)
    ours = text_classifier(backbone.model, tokenizer, sentences, batch_size=5)
    rows = []
    with torch.no_grad():
        for group in sentences:
            embedded = F.normalize(backbone.model.encode_text(tokenizer(group)), dim=-1)
            rows.append(F.normalize(embedded.mean(0), dim=-1))
    expected = torch.stack(rows)
    assert ours.shape == (3, backbone.card["embed_dim"]) and ours.dtype == torch.float32
    assert torch.allclose(ours, expected, atol=1e-6)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(3), atol=1e-6)
    # batching across class boundaries changes nothing
    assert torch.allclose(text_classifier(backbone.model, tokenizer, sentences), ours, atol=1e-6)


def test_backbone_exposes_its_tokenizer(load_cached):
    tokens = load_cached("safe-cache-tiny-rn").tokenizer()(["a photo of a cat."])
    assert tokens.shape == (1, 77)
