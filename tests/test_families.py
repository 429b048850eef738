"""The family registry (one file per family, every file registered, the config and module rules
agreeing), and the families beyond 2021's CLIP (SigLIP / PE-Core MAP heads, CoCa's pooler, EVA)
through the whole pipeline: extract a miniature, fit SAFE, put the head back into open_clip."""

from __future__ import annotations

import copy
import pkgutil

import open_clip
import pytest
import torch
from factories import extract_miniature
from miniatures import write_split_zhou
from safetensors.torch import load_file

from safe_cache import UnsupportedModelError, load_backbone
from safe_cache.data.prompts import text_classifier
from safe_cache.extract import ExtractConfig, extract
from safe_cache.fit import FitConfig, fit
from safe_cache.model import families
from safe_cache.model.backbone import config_family, family_of
from safe_cache.store import open_store

_SLOW = pytest.mark.slow
NEWER = ["safe-cache-tiny-map", pytest.param("safe-cache-tiny-map-cls", marks=_SLOW),
         pytest.param("safe-cache-tiny-coca", marks=_SLOW),
         pytest.param("safe-cache-tiny-eva", marks=_SLOW),
         pytest.param("PE-Core-B-16", marks=_SLOW), pytest.param("EVA02-B-16", marks=_SLOW)]


# --- the registry ------------------------------------------------------------------------------

def test_every_module_of_the_families_folder_is_a_registered_family():
    """A family is one file: a module of families/ that is not registered (or registered under
    another module's name) would be a family no rule reaches."""
    modules = {info.name for info in pkgutil.iter_modules(families.__path__)} - {"base",
                                                                                 "registry"}
    registered = {type(f).__module__.rsplit(".", 1)[1]: name
                  for name, f in families.FAMILIES.items()}
    assert set(registered) == modules
    assert all(registered[m] == m for m in modules)  # module resnet.py registers 'resnet'
    assert list(families.FAMILIES)[:4] == ["resnet", "vit", "map", "coca"]  # stores name them


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_each_family_is_found_by_both_its_rules(name):
    """The config rule (before building) and the module rule (after) name the same family for
    its tiny configs, and the family names real architectures for the slow tests."""
    rules = families.FAMILIES[name]
    assert rules.tiny_models and rules.example_models and rules.description
    for model in (*rules.tiny_models, *rules.example_models):
        assert config_family(open_clip.get_model_config(model)) == (name, ""), model
    for model in rules.tiny_models:
        assert family_of(load_backbone(model).model.visual) == name


def test_an_eva_tower_outside_the_fast_heads_form_is_refused_with_why():
    visual = copy.deepcopy(load_backbone("safe-cache-tiny-eva").model.visual)
    visual.trunk.blocks[-1].attn.q_norm = torch.nn.LayerNorm(16)
    with pytest.raises(UnsupportedModelError, match=r"The timm tower Eva cannot be split for SAFE:"
                                                    r" its attention normalises queries and keys"
                                                    r" \(qk-norm\)\. Supported: resnet"):
        family_of(visual)


def test_a_class_token_timm_tower_of_no_family_says_so():
    with pytest.raises(UnsupportedModelError, match=r"MobileCLIP-B cannot be split for SAFE"
                                                    r" \(timm tower vit_base_mci_224 pools by its"
                                                    r" class token, but it is not one of the timm"
                                                    r" towers a family of safe-cache splits\)"):
        load_backbone("MobileCLIP-B")


def test_a_card_of_an_unknown_family_names_the_fix():
    with pytest.raises(UnsupportedModelError, match=r"Backbone family 'hyena' is not one this"
                                                    r" safe-cache knows \(resnet, vit, .*upgrade"):
        families.family("hyena")


# --- the pipeline ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("model", NEWER)
def test_extract_fit_and_put_the_head_back(tmp_path, model):
    store = str(extract_miniature(tmp_path, model, tmp_path / "store.zarr"))
    card = open_store(store).manifest["backbone"]
    assert card["family"] in ("map", "coca", "eva")
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
    assert weights.shape == (2, backbone.card["embed_dim"])
    assert torch.allclose(weights.norm(dim=-1), torch.ones(2), atol=1e-5)


# --- hf-hub: and local-dir: names ----------------------------------------------------------

def _repo_files(folder, model: str = "safe-cache-tiny-map", seed: int = 5):
    """open_clip_config.json + open_clip_model.safetensors of a seeded tiny model, as a hub
    repo or a local folder holds them; returns the saved state dict."""
    import json

    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": open_clip.get_model_config(model),
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    state = open_clip.create_model(model, pretrained=None).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()},
              str(folder / "open_clip_model.safetensors"))
    return state


def _hub_cache(root, repo: str):
    """A hub cache folder laid out as huggingface_hub writes it (refs/main -> a snapshot)."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("0123abcd")
    return base / "snapshots" / "0123abcd"


@pytest.mark.slow
def test_hf_hub_name_loads_offline_from_a_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    state = _repo_files(_hub_cache(tmp_path, "safe-cache/tiny-map"))
    backbone = load_backbone("hf-hub:safe-cache/tiny-map", "repo", cache_dir=tmp_path)
    card = backbone.card
    assert (card["model"], card["hub_id"], card["pretrained"]) == \
        ("hf-hub:safe-cache/tiny-map", "safe-cache/tiny-map", "repo")
    assert card["mean"] == [0.5, 0.5, 0.5] and card["family"] == "map"
    assert torch.equal(backbone.model.state_dict()["visual.trunk.attn_pool.latent"],
                       state["visual.trunk.attn_pool.latent"])
    images = torch.randn(2, 3, *card["image_size"])
    with torch.no_grad():
        assert torch.allclose(backbone.head(backbone.trunk(images)),
                              backbone.model.encode_image(images, normalize=False), atol=1e-5)
    assert backbone.tokenizer()(["a photo"]).shape[0] == 1  # no hub access for the tokenizer

    from safe_cache.store.paths import backbone_label
    assert backbone_label(card) == "hf-hub-safe-cache-tiny-map-repo"  # a plain file name


def test_hf_hub_name_absent_from_the_cache_fails_clearly(tmp_path, monkeypatch):
    from safe_cache import ModelConfigError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelConfigError, match=r"Could not fetch open_clip_config\.json of"
                                               r" hf-hub:safe-cache/absent \(HF_HUB_OFFLINE is"
                                               r" set\)\. The hub cache is .*local-dir:PATH"):
        load_backbone("hf-hub:safe-cache/absent", "repo", cache_dir=tmp_path)


def test_local_dir_name_and_its_weights(tmp_path):
    from safe_cache import WeightsUnavailableError

    folder = tmp_path / "my-map-model"
    state = _repo_files(folder, "safe-cache-tiny-coca", seed=7)
    backbone = load_backbone(f"local-dir:{folder}", "repo")
    assert backbone.card["model"] == f"local-dir:{folder.resolve()}"
    assert backbone.card["hub_id"] is None and backbone.card["family"] == "coca"
    assert torch.equal(backbone.model.state_dict()["visual.attn_pool.query"],
                       state["visual.attn_pool.query"])
    with pytest.raises(WeightsUnavailableError, match=r"its weights are in its repository"
                                                      r" \(pretrained 'repo', --pretrained repo\)"):
        load_backbone(f"local-dir:{folder}", "openai")
    with pytest.raises(WeightsUnavailableError, match=r"'repo' means the weights in an hf-hub:"):
        load_backbone("safe-cache-tiny-map", "repo")


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_an_hf_hub_store_is_named_and_found_by_its_hub_id(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from safe_cache.store.catalog import select_stores

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # as $HF_HUB_CACHE
    _repo_files(_hub_cache(tmp_path / "hub", "safe-cache/tiny-map"))
    write_split_zhou(tmp_path, "dtd", classes=2)
    report = extract(ExtractConfig(dataset="dtd", root=str(tmp_path),
                                   model="hf-hub:safe-cache/tiny-map", pretrained="repo",
                                   store_root=str(tmp_path / "stores"), shots=(1,), seeds=(1,),
                                   views=1, workers=0))
    expected = tmp_path / "stores" / "dtd" / "hf-hub-safe-cache-tiny-map-repo.zarr"
    assert expected.is_dir(), report
    assert select_stores(str(tmp_path / "stores"), model="hf-hub:safe-cache/tiny-map",
                         pretrained="repo") == [str(expected)]
