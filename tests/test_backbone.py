"""The trunk/head split: head(trunk(x)) == open_clip's encode_image, and everything around it."""

from __future__ import annotations

import hashlib
import json
import socket

import open_clip
import pytest
import torch
from conftest import images_for, real_params
from safetensors.torch import save_file

from safe_cache import (
    ModelConfigError,
    SafeCacheWarning,
    UnsupportedModelError,
    WeightsUnavailableError,
    load_backbone,
)
from safe_cache.model.backbone import family_of, list_architectures
from safe_cache.model.weights import _cached_copy


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def assert_split_exact(backbone, batch: int = 2) -> None:
    images = images_for(backbone, batch)
    with torch.no_grad():
        expected = backbone.model.encode_image(images, normalize=False)
    dense = backbone.trunk(images)
    assert dense.shape == (batch, backbone.card["tokens"], backbone.card["channels"])
    actual = backbone.head(dense)
    assert actual.shape == (batch, backbone.card["embed_dim"])
    assert relative_error(actual, expected) <= 1e-4


def test_tiny_split_is_exact(tiny):
    assert_split_exact(tiny, batch=3)


@pytest.mark.parametrize("name, cut", [("safe-cache-tiny-rn", "layer4"),
                                       ("safe-cache-tiny-vit", "last2"),
                                       ("safe-cache-tiny-eva", "last2")])
def test_earlier_cut_is_exact(load_cached, name, cut):
    backbone = load_cached(name, cut)
    assert backbone.card["cut"] == cut
    pool = load_cached(name)
    if cut == "layer4":  # ResNet: layer3 output, twice the grid, half the channels
        assert backbone.card["tokens"] == 4 * pool.card["tokens"]
        assert backbone.card["channels"] == pool.card["channels"] // 2
    assert_split_exact(backbone)


@pytest.mark.parametrize("name", real_params())  # each registered family's real architectures
def test_real_architectures_split_is_exact(load_cached, name):
    assert_split_exact(load_cached(name), batch=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["RN101", "RN50x4", "ViT-B-32", "ViT-L-14", "EVA02-L-14"])
def test_more_real_architectures_split_is_exact(name):
    assert_split_exact(load_backbone(name), batch=1)


@pytest.mark.slow
def test_dense_shapes_match_paper(load_cached):
    card = load_cached("RN50").card
    assert (card["tokens"], card["channels"], card["embed_dim"], card["token_grid"]) == \
        (49, 2048, 1024, [7, 7])
    card = load_cached("ViT-B-16").card
    assert (card["tokens"], card["channels"], card["embed_dim"], card["token_grid"]) == \
        (197, 768, 512, [14, 14])


@pytest.mark.slow
def test_attention_pool_families_shapes(load_cached):
    """PE-Core keeps its class token among the pooled tokens; SigLIP has none; CoCa's pooler
    reads the class token too; SigLIP carries a logit bias."""
    pe, siglip, coca = (load_cached(n).card for n in ("PE-Core-B-16", "ViT-B-16-SigLIP2",
                                                      "coca_ViT-B-32"))
    assert (pe["family"], pe["tokens"], pe["channels"], pe["embed_dim"]) == ("map", 197, 768, 1024)
    assert (siglip["family"], siglip["tokens"], siglip["channels"], siglip["embed_dim"]) == \
        ("map", 196, 768, 768)
    assert siglip["logit_bias"] == -10.0 and pe["logit_bias"] is None
    assert (coca["family"], coca["tokens"], coca["channels"], coca["embed_dim"]) == \
        ("coca", 50, 768, 512)
    eva = load_cached("EVA02-B-16").card  # the class token first, as open_clip's ViTs
    assert (eva["family"], eva["tokens"], eva["channels"], eva["embed_dim"], eva["token_grid"]) == \
        ("eva", 197, 768, 512, [14, 14])


def test_model_is_frozen_and_in_eval_mode(tiny):
    assert not any(module.training for module in tiny.model.modules())
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert not any(p.requires_grad for p in tiny.head.parameters())
    images = images_for(tiny).requires_grad_(True)
    assert not tiny.trunk(images).requires_grad


def test_batchnorm_statistics_are_not_batch_dependent(load_cached):
    # In open_clip's default train mode BatchNorm would normalise by batch statistics.
    backbone = load_cached("safe-cache-tiny-rn")
    images = images_for(backbone, batch=4)
    together = backbone.trunk(images)
    alone = backbone.trunk(images[:1])
    assert torch.allclose(together[:1], alone, atol=1e-5)


def test_new_head_is_a_trainable_independent_copy(tiny):
    head = tiny.new_head()
    assert all(p.requires_grad for p in head.parameters())
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(1.0)
    original = dict(tiny.head.named_parameters())
    assert all(not torch.equal(p, original[name]) for name, p in head.named_parameters())


def test_head_keys_are_open_clip_visual_keys(tiny):
    visual = tiny.model.visual.state_dict()
    head_state = tiny.head.state_dict()
    assert head_state, "head has no parameters"
    for key, value in head_state.items():
        assert key in visual, key
        assert visual[key].shape == value.shape
        assert torch.equal(visual[key], value)
    # and a fine-tuned state dict moves into the open_clip model unchanged
    tuned = tiny.new_head()
    with torch.no_grad():
        for parameter in tuned.parameters():
            parameter.mul_(1.5)
    clip = load_backbone(tiny.card["model"]).model
    result = clip.visual.load_state_dict(tuned.state_dict(), strict=False)
    assert not result.unexpected_keys
    images = images_for(tiny)
    with torch.no_grad():
        merged = clip.encode_image(images, normalize=False)
    assert relative_error(tuned(tiny.trunk(images)), merged) <= 1e-4


def test_card_is_json_and_stable(tiny):
    card = tiny.card
    assert json.loads(json.dumps(card)) == card
    again = load_backbone(card["model"])
    assert again.card == card
    assert again.fingerprint == tiny.fingerprint
    for key in ("model", "pretrained", "weights_sha256", "image_size", "mean", "std",
                "interpolation", "resize_mode", "cut", "tokens", "channels", "embed_dim",
                "logit_scale",
                "open_clip_version", "torch_version"):
        assert key in card
    assert card["open_clip_version"] == open_clip.__version__


def test_random_init_is_seeded(load_cached):
    base = load_cached("safe-cache-tiny-vit")
    other = load_backbone("safe-cache-tiny-vit", init_seed=1)
    assert other.fingerprint != base.fingerprint
    assert not torch.equal(other.head.proj, base.head.proj)
    assert torch.equal(load_backbone("safe-cache-tiny-vit", init_seed=1).head.proj, other.head.proj)


def test_preprocess_is_the_eval_transform(tiny):
    from PIL import Image

    image = Image.new("RGB", (150, 120), color=(200, 30, 60))
    tensor = tiny.preprocess(image)
    assert tuple(tensor.shape) == (3, *tiny.card["image_size"])
    expected_red = (200 / 255 - tiny.card["mean"][0]) / tiny.card["std"][0]
    assert tensor[0].mean().item() == pytest.approx(expected_red, abs=1e-2)


# --- weights ---------------------------------------------------------------------------------

def _source_model(seed: int):
    return load_backbone("safe-cache-tiny-rn", init_seed=seed).model


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_local_checkpoint_file(tmp_path, fmt):
    source = _source_model(seed=7)
    path = tmp_path / f"tiny.{fmt}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if fmt == "pt":
        torch.save(state, path)
    else:
        save_file(state, path)
    backbone = load_backbone("safe-cache-tiny-rn", str(path))
    assert backbone.card["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert backbone.card["pretrained"] == f"file:{path.name}"
    assert backbone.card["init_seed"] is None
    images = images_for(backbone)
    with torch.no_grad():
        expected = source.encode_image(images, normalize=False)
    assert relative_error(backbone.head(backbone.trunk(images)), expected) <= 1e-5


@pytest.mark.slow
def test_openai_torchscript_archive(tmp_path):
    """OpenAI's .pt files are TorchScript archives with three extra non-tensor entries."""
    source = _source_model(seed=3)

    class Archive(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            for name, child in model.named_children():
                self.add_module(name, child)
            for name, param in model.named_parameters(recurse=False):
                self.register_parameter(name, param)
            persistent = model.state_dict()
            for name, buf in model.named_buffers(recurse=False):
                if name in persistent:
                    self.register_buffer(name, buf)
            self.register_buffer("input_resolution", torch.tensor(96))
            self.register_buffer("context_length", torch.tensor(77))
            self.register_buffer("vocab_size", torch.tensor(49408))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    path = tmp_path / "RN-tiny.pt"
    with pytest.warns(FutureWarning):
        torch.jit.save(torch.jit.script(Archive(source)), str(path))
    backbone = load_backbone("safe-cache-tiny-rn", str(path))  # no QuickGELU warning here
    images = images_for(backbone)
    with torch.no_grad():
        expected = source.encode_image(images, normalize=False)
    assert relative_error(backbone.head(backbone.trunk(images)), expected) <= 1e-5


@pytest.mark.slow
def test_local_file_warns_about_quick_gelu(tmp_path):
    config = open_clip.get_model_config("safe-cache-tiny-vit")
    config.pop("quick_gelu")
    config_path = tmp_path / "tiny-vit-gelu.json"
    config_path.write_text(json.dumps(config))
    weights = tmp_path / "w.safetensors"
    state = load_backbone(config_path).model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, weights)
    with pytest.warns(SafeCacheWarning, match="QuickGELU"):
        backbone = load_backbone(config_path, str(weights))
    assert backbone.card["quick_gelu"] is False
    assert load_backbone(config_path, str(weights), quick_gelu=True).card["quick_gelu"] is True


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": socket.socket}, path)
    with pytest.raises(WeightsUnavailableError, match="safetensors"):
        load_backbone("safe-cache-tiny-rn", str(path))


def test_mismatched_checkpoint_names_the_problem(tmp_path):
    path = tmp_path / "vit.safetensors"
    state = load_backbone("safe-cache-tiny-vit").model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    with pytest.raises(WeightsUnavailableError, match="does not fit this architecture"):
        load_backbone("safe-cache-tiny-rn", str(path))


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(WeightsUnavailableError, match="openai"):
        load_backbone("RN50", "no-such-tag")


def test_offline_tag_gives_a_clear_error(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable (simulated)")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(WeightsUnavailableError) as error:
        load_backbone("RN50", "openai", cache_dir=tmp_path)
    message = str(error.value)
    assert "Could not fetch the pretrained weights 'openai' of RN50" in message
    assert str(tmp_path) in message  # where open_clip caches
    assert "local checkpoint" in message and "--pretrained /path/to/" in message
    assert "--cache-dir (extract, backbone" in message
    assert "Traceback" not in message


def test_offline_uses_a_cached_tag_without_network(tmp_path):
    tag_cfg = open_clip.get_pretrained_cfg("RN50", "openai")
    repo, filename = tag_cfg["hf_hub"].rstrip("/"), "open_clip_model.safetensors"
    snapshot = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / filename).write_bytes(b"weights")
    (tmp_path / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (tmp_path / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("abc123")
    assert _cached_copy(tag_cfg, tmp_path) == snapshot / filename


# --- models ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["convnext_base", "ViT-L-14-CLIPA", "MobileCLIP-B"])
def test_unsupported_architectures_are_refused(name):
    with pytest.raises(UnsupportedModelError, match=r"ModifiedResNet.*VisionTransformer"):
        load_backbone(name)


def test_a_tower_without_attention_pooling_says_why_safe_does_not_apply():
    with pytest.raises(UnsupportedModelError, match=r"convnext_base pools by 'its own head',"
                                                    r" without attention: SAFE fine-tunes an"
                                                    r" attention-pooling layer"):
        load_backbone("convnext_base")


def test_family_of_checks_the_built_module():
    from open_clip.transformer import VisionTransformer

    pooled = VisionTransformer(32, 8, 32, 1, 2, 4.0, attentional_pool=True, output_dim=16,
                               attn_pooler_queries=4, attn_pooler_heads=2)
    assert family_of(pooled) == "coca"
    parallel = VisionTransformer(32, 8, 32, 1, 2, 4.0, attentional_pool="parallel",
                                 output_dim=16, attn_pooler_queries=4, attn_pooler_heads=2)
    with pytest.raises(UnsupportedModelError, match=r"second \(contrastive\) attentional pooler"):
        family_of(parallel)
    with pytest.raises(UnsupportedModelError, match="Linear"):
        family_of(torch.nn.Linear(2, 2))


def test_architecture_listing_classifies_families():
    families = {row["model"]: row["family"] for row in list_architectures()}
    assert families["RN50"] == "resnet" and families["ViT-B-16"] == "vit"
    assert families["safe-cache-tiny-rn"] == "resnet"
    assert families["convnext_base"] == "unsupported"
    assert families["PE-Core-B-16"] == families["ViT-B-16-SigLIP2"] == "map"
    assert families["coca_ViT-B-32"] == families["safe-cache-tiny-coca"] == "coca"
    assert families["EVA02-B-16"] == families["EVA02-L-14"] == families["EVA02-E-14"] == "eva"
    assert families["EVA01-g-14"] == families["safe-cache-tiny-eva"] == "eva"
    assert families["MobileCLIP-B"] == "unsupported"  # a class-token timm ViT, but not an Eva


def test_model_config_file(tmp_path):
    config = open_clip.get_model_config("safe-cache-tiny-vit")
    wrapped = {"model_cfg": config, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5],
                                                       "std": [0.25, 0.25, 0.25]}}
    path = tmp_path / "my-tiny.json"
    path.write_text(json.dumps(wrapped))
    backbone = load_backbone(path)
    assert backbone.card["model"] == "my-tiny"
    assert backbone.card["mean"] == [0.5, 0.5, 0.5]
    assert_split_exact(backbone)
    reference = load_backbone("safe-cache-tiny-vit")
    assert backbone.card["model_config_sha256"] == reference.card["model_config_sha256"]
    assert backbone.fingerprint != reference.fingerprint  # preprocessing differs


def test_model_config_errors(tmp_path):
    with pytest.raises(ModelConfigError, match="Unknown model"):
        load_backbone("no-such-model")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"embed_dim\": 3}")
    with pytest.raises(ModelConfigError, match="vision_cfg"):
        load_backbone(bad)
    clash = tmp_path / "RN50.json"
    clash.write_text(json.dumps(open_clip.get_model_config("safe-cache-tiny-rn")))
    with pytest.raises(ModelConfigError, match="Rename"):
        load_backbone(clash)
    with pytest.raises(ModelConfigError, match="Unknown cut"):
        load_backbone("safe-cache-tiny-rn", cut="layer9")
