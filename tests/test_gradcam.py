"""Grad-CAM at the dense map (analysis/gradcam.py) against Grad-CAM through open_clip's own
module with hooks, on the same images; the command from a store and a fit result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import images_for
from factories import extract_miniature

from safe_cache.analysis.gradcam import class_maps, gradcam_maps, smooth_maps
from safe_cache.cli import main
from safe_cache.errors import StoreError
from safe_cache.fit import FitConfig, fit
from safe_cache.model.inference import blend_features

MODELS = ["safe-cache-tiny-rn", "safe-cache-tiny-vit",
          pytest.param("RN50", marks=pytest.mark.slow),
          pytest.param("ViT-B-16", marks=pytest.mark.slow)]


def hooked_maps(backbone, images, classifier, target, method):
    """The textbook recipe on open_clip's model: a hook keeps the activation the pooling layer
    reads (ResNet: attnpool's input (B, C, H, W); ViT: the last block's input tokens), the
    class logit of encode_image goes backward, and the maps come from the activation and its
    gradient in open_clip's own layout (pytorch-grad-cam's formulas)."""
    visual = backbone.model.visual
    kept = {}

    def keep(_module, inputs):
        inputs[0].retain_grad()
        kept["a"] = inputs[0]

    module = visual.attnpool if backbone.card["family"] == "resnet" else \
        visual.transformer.resblocks[-1]
    handle = module.register_forward_pre_hook(keep)
    try:
        features = backbone.model.encode_image(images.clone().requires_grad_(True))
    finally:
        handle.remove()
    logits = backbone.card["logit_scale"] * F.normalize(features, dim=-1) @ classifier.T
    logits.gather(1, target[:, None]).sum().backward()
    a, g = kept["a"].detach(), kept["a"].grad
    height, width = backbone.card["token_grid"]
    if a.dim() == 3:  # ViT tokens (B, 1 + HW, C): the patches, as (B, C, H, W)
        a = a[:, -height * width:].transpose(1, 2).reshape(-1, a.shape[-1], height, width)
        g = g[:, -height * width:].transpose(1, 2).reshape(-1, g.shape[-1], height, width)
    if method == "gradcam":
        weights = g.mean(dim=(2, 3))
    else:
        g2, g3 = g**2, g**3
        sum_a = a.sum(dim=(2, 3))
        aij = g2 / (2 * g2 + sum_a[:, :, None, None] * g3 + 1e-7)
        aij = torch.where(g != 0, aij, torch.zeros_like(aij))
        weights = (torch.clamp(g, min=0) * aij).sum(dim=(2, 3))
    return (weights[:, :, None, None] * a).sum(1).clamp(min=0)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
@pytest.mark.parametrize("name", MODELS)
def test_maps_from_the_dense_map_are_open_clips_with_hooks(name, method, load_cached):
    backbone = load_cached(name)
    images = images_for(backbone)
    classes = 5
    classifier = F.normalize(torch.randn(classes, backbone.card["embed_dim"],
                                         generator=torch.Generator().manual_seed(2)), dim=-1)
    target = torch.tensor([1, 3])
    with torch.no_grad():
        dense = backbone.trunk(images)
    ours, explained = class_maps(dense, backbone.head, classifier,
                                 backbone.card["logit_scale"], tuple(backbone.card["token_grid"]),
                                 method, target)
    theirs = hooked_maps(backbone, images, classifier, target, method)
    assert torch.equal(explained, target)
    assert ours.abs().max() > 0  # not a vacuous comparison of two zero maps
    assert torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4 * theirs.abs().max().item())


def test_the_predicted_class_is_the_heads_argmax(load_cached):
    backbone = load_cached("safe-cache-tiny-rn")
    classifier = F.normalize(torch.randn(4, backbone.card["embed_dim"]), dim=-1)
    with torch.no_grad():
        dense = backbone.trunk(images_for(backbone, batch=3))
        predicted = (F.normalize(backbone.head(dense), dim=-1) @ classifier.T).argmax(-1)
    _, explained = class_maps(dense, backbone.head, classifier, 100.0,
                              tuple(backbone.card["token_grid"]))
    assert torch.equal(explained, predicted)


def test_smoothgrad_without_noise_is_the_plain_map(load_cached):
    backbone = load_cached("safe-cache-tiny-vit")
    images = images_for(backbone)
    classifier = F.normalize(torch.randn(3, backbone.card["embed_dim"]), dim=-1)
    grid, target = tuple(backbone.card["token_grid"]), torch.tensor([0, 2])
    with torch.no_grad():
        dense = backbone.trunk(images)
    plain, _ = class_maps(dense, backbone.head, classifier, 50.0, grid, target=target)
    quiet = smooth_maps(backbone.trunk, images, backbone.head, classifier, 50.0, grid, target,
                        samples=2, noise=1e-7)
    assert torch.allclose(quiet, plain, rtol=1e-3, atol=1e-5 * plain.abs().max().item())
    noisy = smooth_maps(backbone.trunk, images, backbone.head, classifier, 50.0, grid, target,
                        samples=2, noise=0.3)
    again = smooth_maps(backbone.trunk, images, backbone.head, classifier, 50.0, grid, target,
                        samples=2, noise=0.3)
    assert torch.equal(noisy, again) and not torch.allclose(noisy, plain)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("cam")
    store = extract_miniature(root, "safe-cache-tiny-rn", root / "store.zarr",
                              counts={"train": 2, "val": 2, "test": 4})
    (result,) = fit(FitConfig(store=str(store), out=str(root / "r"), shots=(1,), seeds=(1,),
                              iters=6, eval_every=3, lrs=(1e-2,), wds=(0.0,), methods=()))
    return root, store, result


@pytest.mark.slow
def test_the_blends_map_is_the_two_stored_heads_blended(fitted):
    """From the store: the blend's map is Grad-CAM of beta * original + SAFE's head, the two
    heads built here from the store's head and the result's safetensors."""
    import copy

    from safetensors.torch import load_file

    from safe_cache.fit.original import original_head
    from safe_cache.store import open_store

    _, store, result = fitted
    maps = gradcam_maps(str(store), result.path, [0, 2], method="gradcam++")
    opened = open_store(str(store))
    dense = torch.from_numpy(opened.read_rows("test", "dense", np.array([0, 2])).astype(
        np.float32))
    original = original_head(opened).eval()
    tuned = copy.deepcopy(original)
    tuned.load_state_dict(load_file(str(result.path.with_suffix(".safetensors"))))
    beta = result.config["beta"]
    card = opened.manifest["backbone"]
    blend, _ = class_maps(dense, lambda x: blend_features(original(x), tuned(x), beta),
                          torch.from_numpy(opened.classifier()), card["logit_scale"],
                          tuple(card["token_grid"]), "gradcam++",
                          target=torch.tensor(maps["labels"]))
    assert np.allclose(maps["blend"]["maps"], blend.numpy())
    assert maps["original"]["classes"] == maps["blend"]["classes"] == maps["labels"]
    assert not np.allclose(maps["original"]["maps"], maps["finetuned"]["maps"])


@pytest.mark.slow  # matplotlib draws the PNGs
def test_the_command_writes_a_png_per_image_and_the_maps(fitted, tmp_path):
    root, store, result = fitted
    out = tmp_path / "cams"
    run = CliRunner().invoke(main, ["gradcam", "--store", str(store), "--head",
                                    str(result.path), "--images", "0,2", "--image-root",
                                    str(root / "food-101" / "images"), "--out", str(out)])
    assert run.exit_code == 0, run.output
    record = json.loads((out / "gradcam.json").read_text())
    stems = [path.split("/")[-1].rsplit(".", 1)[0] for path in record["paths"]]
    assert sorted(p.name for p in out.glob("*.png")) == [
        f"gradcam_{i:03d}_{stem}.png" for i, stem in enumerate(stems)]
    for png in out.glob("*.png"):
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 5000
    maps = gradcam_maps(str(store), result.path, [0, 2])
    for name in ("original", "finetuned", "blend"):
        assert np.allclose(record[name]["maps"], maps[name]["maps"], atol=1e-6)
    smooth = CliRunner().invoke(main, ["gradcam", "--store", str(store), "--head",
                                       str(result.path), "--images", "0", "--smooth", "2",
                                       "--out", str(tmp_path / "s")])
    assert smooth.exit_code != 0 and "--image-root" in smooth.output


@pytest.mark.slow  # a second extract
def test_a_result_of_another_store_is_refused(fitted, tmp_path):
    _, _, result = fitted
    other = extract_miniature(tmp_path, "safe-cache-tiny-vit", tmp_path / "other.zarr",
                              counts={"train": 2, "val": 2, "test": 4})
    with pytest.raises(StoreError, match="another backbone fingerprint"):
        gradcam_maps(str(other), result.path, [0])


@pytest.mark.slow  # a second extract
def test_attention_refuses_a_result_of_another_store_as_gradcam_does(fitted, tmp_path):
    """`attention` explains the head a result names only on the store it was fitted on (it
    loaded any head onto any store of the same shapes before)."""
    from safe_cache.analysis.attention import attention_maps

    _, store, result = fitted
    maps = attention_maps(str(store), result.path, [0, 1])
    assert maps["original"].shape[0] == 2 and len(maps["paths"]) == 2
    other = extract_miniature(tmp_path, "safe-cache-tiny-rn", tmp_path / "other.zarr",
                              counts={"train": 2, "val": 2, "test": 4}, init_seed=1)
    with pytest.raises(StoreError, match="another backbone fingerprint"):
        attention_maps(str(other), result.path, [0])
