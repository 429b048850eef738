"""Shapley values through the live trunk (analysis/shapley_pixels.py), and a PartImageNet folder
(analysis/partimagenet.py) converted against a store and run in both modes."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from safe_cache.analysis.shapley import exact_shapley, monte_carlo_shapley
from safe_cache.analysis.shapley_pixels import PixelGame, masked_images, pixel_index
from safe_cache.cli import main
from safe_cache.errors import ConfigError


def test_absent_parts_pixels_go_to_the_mean_and_no_parts_pixels_stay():
    mask = np.array([[0, 2, 2], [3, 3, 0]], dtype=np.uint8)  # parts 1 and 2; part 0 absent
    present, index = pixel_index(mask)
    assert present == [1, 2] and index.tolist() == [-1, 0, 0, 1, 1, -1]
    image = torch.arange(1, 19, dtype=torch.float32).view(3, 2, 3)
    out = masked_images(image, index, torch.tensor([[True, False], [False, False]]))
    kept = torch.tensor([[1, 1, 1], [0, 0, 1]], dtype=torch.float32)
    assert torch.equal(out[0], image * kept)
    assert torch.equal(out[1], image * torch.tensor([[1, 0, 0], [0, 0, 1.0]]))


def test_one_trunk_pass_per_coalition_serves_every_head():
    """A fake trunk (each image's per-channel sums as its 'map'): exact Shapley over 3 parts
    runs 8 passes for both heads, Monte Carlo reuses them; values are efficient."""
    calls = []

    def trunk(images):
        calls.append(len(images))
        return images.sum(dim=(2, 3))[:, None]  # (N, 1, 3)

    mask = np.array([[1, 1, 2, 2], [3, 3, 0, 0]], dtype=np.uint8)
    present, index = pixel_index(mask)
    image = torch.rand(3, 2, 4, generator=torch.Generator().manual_seed(0))
    features = {"a": lambda d: d[:, 0], "b": lambda d: d[:, 0] ** 2}
    game = PixelGame(trunk, features, image, index, torch.eye(3), 10.0, label=1, batch=3)
    parts = torch.tensor(present)
    exact = {name: exact_shapley(game.value(name), parts, 3) for name in features}
    assert game.passes == 8 and sum(calls) == 8 and max(calls) == 3
    for result in exact.values():
        assert sum(result["phi"]) == pytest.approx(result["v_all"] - result["v_none"])
    estimate = monte_carlo_shapley(game.value("a"), parts, 3, orders=20)
    assert game.passes == 8 and sum(calls) == 8  # every coalition already run
    assert sum(estimate["phi"]) == pytest.approx(exact["a"]["v_all"] - exact["a"]["v_none"])


PARTS_OF = {"Fish Head": [0, 0, 20, 0, 20, 40, 0, 40], "Fish Body": [20, 0, 40, 0, 40, 25, 20, 25],
            "Fish Tail": [40, 0, 48, 0, 48, 40, 40, 40]}  # x 20..40, y 25..40: no part


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """tests/miniatures.py's ImageNet extracted with the tiny ResNet, a SAFE fit, and a
    PartImageNet split file annotating two of the store's val images and one it lacks."""
    from miniatures import WNIDS, write_imagenet

    from safe_cache.analysis.partimagenet import PARTS
    from safe_cache.extract import ExtractConfig, extract
    from safe_cache.fit import FitConfig, fit

    root = tmp_path_factory.mktemp("partimagenet")
    write_imagenet(root)
    store = root / "store.zarr"
    extract(ExtractConfig(dataset="imagenet", root=str(root), model="safe-cache-tiny-rn",
                          pretrained=None, store=str(store), shots=(1,), seeds=(1,), views=1,
                          workers=0))
    (result,) = fit(FitConfig(store=str(store), out=str(root / "r"), shots=(1,), seeds=(1,),
                              iters=6, eval_every=3, lrs=(1e-2,), wds=(0.0,), methods=()))
    names = [f"{WNIDS[1]}_2.JPEG", f"{WNIDS[4]}_2.JPEG", f"{WNIDS[3]}_9.JPEG"]
    images = [{"id": i, "file_name": n, "width": 48, "height": 40} for i, n in enumerate(names)]
    annotations = [{"id": 10 * i + k, "image_id": i, "category_id": PARTS.index(part),
                    "segmentation": [polygon], "iscrowd": 0}
                   for i in range(3) for k, (part, polygon) in enumerate(PARTS_OF.items())]
    (root / "train.json").write_text(json.dumps({
        "images": images, "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": n.split()[0]}
                       for i, n in enumerate(PARTS)]}))
    return root, str(store), result


def convert_args(root, *more):
    return ["parts", "partimagenet", "--annotations", str(root / "train.json"), "--classnames",
            str(root / "imagenet" / "classnames.txt"), *more]


@pytest.mark.slow  # an extract and a fit (seconds)
def test_a_converted_partimagenet_folder_runs_in_both_modes(imagenet, tmp_path):
    root, store, result = imagenet
    parts = tmp_path / "parts"
    refused = CliRunner().invoke(main, convert_args(root, "--store", store, "--out", str(parts)))
    assert refused.exit_code != 0
    assert "n00000003_9.JPEG is not in" in " ".join(refused.output.split())
    assert "--only-in-store" in refused.output
    run = CliRunner().invoke(main, convert_args(root, "--store", store, "--only-in-store",
                                                "--out", str(parts)))
    assert run.exit_code == 0, run.output
    record = json.loads((parts / "parts.json").read_text())
    assert record["rows"] == {"val": [1, 4]} and record["skipped"] == ["n00000003_9.JPEG"]
    assert [(e["label"], e["split"], e["classname"]) for e in record["images"]] == [
        (1, "val", "goldfish"), (4, "val", "hammerhead")]
    assert (parts / "train" / "n00000001" / "n00000001_2.png").is_file()
    image_root = str(root / "imagenet" / "images")
    for mode in ("tokens", "pixels"):
        out = tmp_path / mode
        shown = CliRunner().invoke(main, [
            "shapley", "--store", store, "--head", str(result.path), "--parts", str(parts),
            "--split", "val", "--images", "1,4", "--image-root", image_root, "--mode", mode,
            "--out", str(out)])
        assert shown.exit_code == 0, shown.output
        values = json.loads((out / "shapley.json").read_text())
        assert values["mode"] == mode and len(values["parts"]) == 40
        # the tail (8 of 48 columns) owns no token of the 3 x 3 grid, but it owns pixels
        players = 2 if mode == "tokens" else 3
        for entry in values["images"]:
            for head in ("original", "finetuned", "blend"):
                game = entry[head]
                assert game["exact"] and game["coalitions"] == 2 ** players
                assert len(game["absent"]) == 40 - players
                assert sum(game["phi"]) == pytest.approx(game["v_all"] - game["v_none"])
    alone = CliRunner().invoke(main, ["shapley", "--store", store, "--head", str(result.path),
                                      "--parts", str(parts), "--mode", "pixels",
                                      "--out", str(tmp_path / "x")])
    assert alone.exit_code != 0 and "--image-root" in alone.output


@pytest.mark.slow  # an extract and a fit (seconds)
def test_a_coalitions_value_is_the_model_run_on_its_masked_image(imagenet, tmp_path):
    """The game's values equal open_clip's encode_image (trunk and attention pool, the original
    or the fitted pool's weights in it) on the image with the absent parts' pixels zeroed by
    hand here, for three coalitions; and the values of shapley_values are those."""
    from PIL import Image
    from safetensors.torch import load_file

    from safe_cache.analysis.gradcam import head_features
    from safe_cache.analysis.partimagenet import convert
    from safe_cache.analysis.shapley import part_mask
    from safe_cache.analysis.shapley_pixels import pixel_shapley_values
    from safe_cache.model.backbone import load_backbone
    from safe_cache.store import open_store

    root, store, result = imagenet
    parts = tmp_path / "parts"
    convert(root / "train.json", parts, root / "imagenet" / "classnames.txt", store, True)
    image_root = root / "imagenet" / "images"
    opened = open_store(store)
    card = opened.manifest["backbone"]
    backbone = load_backbone(card["model"], None, init_seed=card["init_seed"] or 0)
    path = "train/n00000004/n00000004_2.JPEG"
    image = backbone.preprocess(Image.open(image_root / path).convert("RGB"))
    mask = part_mask(parts, path, card, 40, image_root)  # Fish Head 10, Body 11, Tail 13
    assert sorted(np.unique(mask).tolist()) == [0, 10, 11, 13]
    classifier = torch.from_numpy(opened.classifier())
    tuned = copy.deepcopy(backbone.model)
    tuned.visual.attnpool.load_state_dict({
        k[len("attnpool."):]: v for k, v in load_file(str(result.path.with_suffix(
            ".safetensors"))).items()})

    def by_hand(model, absent):
        masked = image.clone()
        for y in range(mask.shape[0]):
            for x in range(mask.shape[1]):
                if mask[y, x] in absent:
                    masked[:, y, x] = 0.0
        with torch.no_grad():
            feature = model.encode_image(masked[None])
        logits = card["logit_scale"] * F.normalize(feature, dim=-1) @ classifier.T
        return logits.softmax(-1)[0, 4].item()

    features, _ = head_features(opened, result.path)
    present, index = pixel_index(mask)
    game = PixelGame(backbone.trunk, features, image, index, classifier,
                     float(card["logit_scale"]), 4)
    coalitions = torch.tensor([[True, True, True], [True, False, True], [False, False, False]])
    for head, model in (("original", backbone.model), ("finetuned", tuned)):
        values = game.value(head)(coalitions)
        for coalition, value in zip(coalitions.tolist(), values.tolist(), strict=True):
            absent = {k + 1 for k, held in zip(present, coalition, strict=True) if not held}
            assert value == pytest.approx(by_hand(model, absent), rel=1e-4, abs=1e-7)
    record = pixel_shapley_values(store, result.path, [4], str(parts), image_root, "val")
    (entry,) = record["images"]
    assert entry["trunk_passes"] == 8
    assert entry["original"]["v_all"] == pytest.approx(game.value("original")(
        coalitions[:1]).item(), rel=1e-5)
    assert entry["finetuned"]["v_none"] == pytest.approx(by_hand(tuned, {10, 11, 13}),
                                                         rel=1e-4, abs=1e-7)
    with pytest.raises(ConfigError, match="--image-root is the dataset's image folder"):
        pixel_shapley_values(store, result.path, [4], str(parts), tmp_path, "val")
