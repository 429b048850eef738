"""Shapley part importance (analysis/shapley.py): the masked heads are open_clip's pooling on the
kept tokens, the values obey Shapley's axioms, and an informative part is found."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import images_for

from safe_cache.analysis.shapley import (
    coalition_keep,
    exact_shapley,
    monte_carlo_shapley,
    token_parts,
)
from safe_cache.errors import UnsupportedModelError


def open_clip_on_subset(backbone, images, kept):
    """open_clip's own pooling run on a subset of the tokens: attnpool's math with the subset's
    positional embeddings (the mean token the subset's mean), or the ViT's last block on the
    class token and the kept patches, then ln_post and proj."""
    visual = backbone.model.visual
    with torch.no_grad():
        dense = backbone.trunk(images)
        if backbone.card["family"] == "resnet":
            pool = visual.attnpool
            x = dense.transpose(0, 1)[kept]  # (K, B, C)
            x = torch.cat([x.mean(dim=0, keepdim=True), x])
            pos = torch.cat([pool.positional_embedding[:1], pool.positional_embedding[1:][kept]])
            x = x + pos[:, None]
            out, _ = F.multi_head_attention_forward(
                query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1],
                num_heads=pool.num_heads, q_proj_weight=pool.q_proj.weight,
                k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
                in_proj_weight=None, in_proj_bias=torch.cat(
                    [pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
                bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
                out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
                use_separate_proj_weight=True, training=False, need_weights=False)
            return out[0]
        prefix = dense.shape[1] - math.prod(backbone.card["token_grid"])
        tokens = torch.cat([dense[:, :prefix], dense[:, prefix:][:, kept]], dim=1)
        if backbone.card["family"] == "eva":  # timm's last block on the kept tokens, each
            trunk, rope = visual.trunk, backbone.head.rope  # key with its own position's rope
            x = trunk.blocks[-1](tokens, rope=None if rope is None else rope[kept])
            return visual.head(trunk.head(trunk.fc_norm(trunk.norm(x)[:, 0])))
        if backbone.card["family"] == "coca":  # open_clip's pooler on the kept tokens
            return visual.ln_post(visual.attn_pool(tokens))[:, 0] @ visual.proj
        if backbone.card["family"] == "map":  # timm's MAP pool on the kept tokens
            trunk = visual.trunk
            if not trunk.pool_include_prefix:
                tokens = tokens[:, trunk.num_prefix_tokens:]
            pooled = trunk.head(trunk.fc_norm(trunk.attn_pool(tokens)))
            return visual.head(pooled)
        block = visual.transformer.resblocks[-1]
        cls = block(tokens)[:, 0]
        return visual.ln_post(cls) @ visual.proj


@pytest.mark.parametrize("name", ["safe-cache-tiny-rn", "safe-cache-tiny-vit",
                                  "safe-cache-tiny-map", "safe-cache-tiny-map-cls",
                                  "safe-cache-tiny-coca", "safe-cache-tiny-eva",
                                  "safe-cache-tiny-eva-post",
                                  pytest.param("RN50", marks=pytest.mark.slow)])
def test_a_masked_head_is_open_clips_pooling_on_the_kept_tokens(name, load_cached):
    backbone = load_cached(name)
    images = images_for(backbone)
    height, width = backbone.card["token_grid"]
    with torch.no_grad():
        dense = backbone.trunk(images)
        everything = torch.ones(2, height * width, dtype=torch.bool)
        assert torch.allclose(backbone.head.masked(dense, everything), backbone.head(dense),
                              atol=1e-5)
    kept = torch.tensor([0, 2, 3, height * width - 1])
    keep = torch.zeros(2, height * width, dtype=torch.bool)
    keep[:, kept] = True
    with torch.no_grad():
        ours = backbone.head.masked(dense, keep)
    theirs = open_clip_on_subset(backbone, images, kept)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())
    whole = backbone.head(dense)  # the subset matters (relative: tiny heads output ~1e-4)
    assert not torch.allclose(ours, whole, rtol=1e-2, atol=1e-2 * whole.abs().max().item())


def test_a_map_pool_with_no_token_kept_pools_nothing(load_cached):
    """SigLIP-like MAP pools have no token that always stays (no class token, no mean token):
    the empty coalition pools no value (zero weights), a finite output, not softmax's 0/0."""
    backbone = load_cached("safe-cache-tiny-map")
    with torch.no_grad():
        dense = backbone.trunk(images_for(backbone))
        none = torch.zeros(2, math.prod(backbone.card["token_grid"]), dtype=torch.bool)
        empty = backbone.head.masked(dense, none)
    assert torch.isfinite(empty).all()
    assert torch.allclose(empty[0], empty[1])  # nothing of either image reaches it


@pytest.mark.parametrize("name", ["safe-cache-tiny-vit", "safe-cache-tiny-eva"])
def test_heads_that_mix_tokens_first_refuse_a_mask(load_cached, name):
    """A cut with an earlier head block (last2) mixes every token before the pool: removing
    a part's tokens from the last block alone would not remove the part. Refused."""
    backbone = load_cached(name, "last2")
    keep = torch.ones(1, math.prod(backbone.card["token_grid"]), dtype=torch.bool)
    with pytest.raises(UnsupportedModelError, match="subset of its tokens"):
        backbone.head.masked(torch.zeros(1, backbone.card["tokens"],
                                         backbone.card["channels"]), keep)


def game(weights: list[float], pair: float = 0.0):
    """v(S) = sum of the parts' weights in S, plus `pair` when parts 0 and 1 are both in,
    read back from the kept tokens (part i owns token i; token 4 belongs to no part)."""
    def value(keep: torch.Tensor) -> torch.Tensor:
        held = keep[:, :len(weights)].double()
        return held @ torch.tensor(weights, dtype=torch.float64) + pair * held[:, 0] * held[:, 1]
    return value


PARTS = torch.tensor([0, 1, 2, 3, -1])


def test_exact_values_are_efficient_symmetric_and_split_an_interaction_evenly():
    result = exact_shapley(game([0.5, 0.5, 0.2, 0.0], pair=0.3), PARTS, 4)
    phi = result["phi"]
    assert sum(phi) == pytest.approx(result["v_all"] - result["v_none"])  # efficiency
    assert phi[0] == pytest.approx(phi[1]) == pytest.approx(0.5 + 0.15)  # symmetry
    assert phi[2] == pytest.approx(0.2) and phi[3] == pytest.approx(0.0)  # dummy
    assert result["coalitions"] == 16 and result["exact"]


def test_monte_carlo_agrees_with_the_exact_values_within_its_error():
    value = game([0.9, 0.1, 0.4, 0.2], pair=-0.6)
    exact = exact_shapley(value, PARTS, 4)["phi"]
    estimate = monte_carlo_shapley(value, PARTS, 4, orders=400, seed=3)
    for e, m, s in zip(exact, estimate["phi"], estimate["stderr"], strict=True):
        assert abs(e - m) <= 4 * s + 1e-12
    assert sum(estimate["phi"]) == pytest.approx(estimate["v_all"] - estimate["v_none"])


def test_coalitions_keep_their_parts_tokens_and_the_tokens_of_no_part():
    keep = coalition_keep(PARTS, torch.tensor([[True, False, False, True],
                                               [False, False, False, False]]))
    assert keep.tolist() == [[True, False, False, True, True],
                             [False, False, False, False, True]]


def test_each_token_takes_the_part_covering_most_of_its_cell():
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[:2, :2] = 1  # the top-left cell all part 1 (index 0)
    mask[2:, 2:] = 2
    mask[0, 2] = 2  # a quarter of the top-right cell: the cell stays no part
    assert token_parts(mask, (2, 2)).tolist() == [0, -1, -1, 1]


@pytest.mark.slow  # trains a head (seconds)
def test_the_informative_part_is_worth_most_to_safes_head(tmp_path):
    """test_fit's synthetic store: the class is a pattern at the 3 x 3 map's center token only.
    With the center, the top row and the bottom row as parts, SAFE's fine-tuned head (which
    learnt to read the center) gives the center the largest value; the values of one image
    are the head's own class probabilities on the kept tokens, recomputed here through
    open_clip's attention pool on the token subset."""
    import json

    from click.testing import CliRunner
    from PIL import Image
    from test_fit import synthetic_store

    from safe_cache.analysis.shapley import shapley_values
    from safe_cache.cli import main
    from safe_cache.fit import FitConfig, fit
    from safe_cache.model.backbone import load_backbone
    from safe_cache.store import open_store

    store = synthetic_store(str(tmp_path / "spots.zarr"))
    (result,) = fit(FitConfig(store=store, shots=(8,), seeds=(1,), lrs=(1e-2,), wds=(0.0,),
                              iters=60, eval_every=20, methods=(), out=str(tmp_path / "r")))
    parts = tmp_path / "parts"
    (parts / "test").mkdir(parents=True)
    (parts / "parts.json").write_text(json.dumps({"names": ["center", "top", "bottom"]}))
    mask = np.zeros((96, 96), dtype=np.uint8)
    mask[32:64, 32:64], mask[:32], mask[64:] = 1, 2, 3
    rows = [0, 30, 60, 90]
    for row in rows:
        Image.fromarray(mask).save(parts / "test" / f"{row}.png")
    values = shapley_values(store, result.path, rows, str(parts))
    for entry in values["images"]:
        assert entry["token_parts"] == [1, 1, 1, -1, 0, -1, 2, 2, 2]
        tuned = entry["finetuned"]
        assert tuned["exact"] and max(range(3), key=lambda i: tuned["phi"][i]) == 0
        assert sum(tuned["phi"]) == pytest.approx(tuned["v_all"] - tuned["v_none"])
    # one image's values from open_clip's pool on the kept tokens, the fine-tuned weights in it
    opened = open_store(store)
    dense = torch.from_numpy(opened.read_rows("test", "dense", np.array([rows[0]])).astype(
        np.float32))
    backbone = load_backbone("safe-cache-tiny-rn", init_seed=3)
    from safetensors.torch import load_file

    backbone.model.visual.attnpool.load_state_dict({
        k[len("attnpool."):]: v for k, v in load_file(str(
            result.path.with_suffix(".safetensors"))).items()})
    classifier = torch.from_numpy(opened.classifier())
    label = values["images"][0]["label"]

    class Trunk:  # open_clip_on_subset's interface, the stored map for the trunk's
        card = backbone.card
        model = backbone.model

        @staticmethod
        def trunk(_images):
            return dense

    def probability(kept):
        pooled = open_clip_on_subset(Trunk, None, torch.tensor(kept))
        logits = opened.manifest["backbone"]["logit_scale"] * F.normalize(
            pooled, dim=-1) @ classifier.T
        return logits.softmax(-1)[0, label].item()

    first = values["images"][0]["finetuned"]
    assert first["v_all"] == pytest.approx(probability(list(range(9))), rel=1e-4)
    assert first["v_none"] == pytest.approx(probability([3, 5]), rel=1e-4)
    run = CliRunner().invoke(main, ["shapley", "--store", store, "--head", str(result.path),
                                    "--parts", str(parts), "--images", "0,30",
                                    "--out", str(tmp_path / "out")])
    assert run.exit_code == 0, run.output
    assert len(list((tmp_path / "out").glob("shapley_*.png"))) == 2
    record = json.loads((tmp_path / "out" / "shapley.json").read_text())
    assert record["parts"] == ["center", "top", "bottom"] and len(record["images"]) == 2


def test_parts_without_tokens_are_dummies_left_out_of_the_game():
    from safe_cache.analysis.shapley import shapley

    value = game([0.3, 0.0, 0.6, 0.1])
    # part 1 owns no token here (token 1 is no part's): phi 0, and three players, exact
    tokens = torch.tensor([0, -1, 2, 3, -1])
    result = shapley(value, tokens, 4)
    assert result["absent"] == [1] and result["exact"] and result["coalitions"] == 8
    assert result["phi"] == pytest.approx([0.3, 0.0, 0.6, 0.1])
    nobody = shapley(value, torch.full((5,), -1), 4)
    assert nobody["phi"] == [0.0] * 4 and nobody["v_all"] == nobody["v_none"]


def test_an_unreadable_mask_or_image_is_one_error_naming_the_file(tmp_path):
    """part_mask (tokens and pixels modes both read masks through it): a PNG of garbage bytes
    was PIL's UnidentifiedImageError as a traceback."""
    from PIL import Image

    from safe_cache.analysis.shapley import part_mask
    from safe_cache.errors import ImageReadError

    (tmp_path / "parts" / "food").mkdir(parents=True)
    (tmp_path / "parts" / "food" / "a.png").write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match=r"parts/food/a\.png is not a readable part mask PNG"
                                             r" \(UnidentifiedImageError.*write the parts folder"
                                             r" again"):
        part_mask(tmp_path / "parts", "food/a.jpg", {}, 3)
    Image.fromarray(np.ones((4, 4), dtype=np.uint8)).save(tmp_path / "parts" / "food" / "a.png")
    (tmp_path / "images" / "food").mkdir(parents=True)
    (tmp_path / "images" / "food" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ImageReadError, match=r"images/food/a\.jpg: .*the image of the part mask"):
        part_mask(tmp_path / "parts", "food/a.jpg", {}, 3, tmp_path / "images")


@pytest.mark.slow  # an extract and a fit
def test_shapley_runs_on_a_siglip_like_store_and_its_values_are_efficient(tmp_path):
    """A MAP-pooled store (no class token: an empty coalition pools nothing) through the
    store-level path: finite values summing to v(all) - v(none) for the three heads."""
    import json

    from factories import extract_miniature
    from PIL import Image

    from safe_cache.analysis.shapley import shapley_values
    from safe_cache.fit import FitConfig, fit
    from safe_cache.store import open_store

    store = extract_miniature(tmp_path / "data", "safe-cache-tiny-map", tmp_path / "s.zarr",
                              counts={"train": 2, "val": 2, "test": 2})
    (result,) = fit(FitConfig(store=str(store), shots=(1,), seeds=(1,), lrs=(1e-2,),
                              wds=(0.0,), iters=6, eval_every=3, methods=(),
                              out=str(tmp_path / "r")))
    opened = open_store(str(store))
    rows = [0, 1]
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "parts.json").write_text(json.dumps({"names": ["left", "right"]}))
    image_root = tmp_path / "data" / "food-101" / "images"
    for path in opened.read_rows("test", "path", np.array(rows)):
        with Image.open(image_root / path) as image:
            width, height = image.size
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[:, : width // 2], mask[:, width // 2:] = 1, 2  # every token in a part
        (parts / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save((parts / path).with_suffix(".png"))
    values = shapley_values(str(store), result.path, rows, str(parts))
    for entry in values["images"]:
        for head in ("original", "finetuned", "blend"):
            game = entry[head]
            assert all(math.isfinite(v) for v in game["phi"])
            assert sum(game["phi"]) == pytest.approx(game["v_all"] - game["v_none"], abs=1e-9)
