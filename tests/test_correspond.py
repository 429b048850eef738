"""Correspondence (Eq. 1) finds a pattern planted at different places in two dense maps."""

from __future__ import annotations

import numpy as np
import pytest

from safe_cache.analysis.correspond import correspond, plot_correspondence
from safe_cache.store import StoreLayout

CARD = {"model": "toy", "pretrained": None, "family": "resnet", "tokens": 16, "channels": 8,
        "embed_dim": 4,
        "token_grid": [4, 4], "image_size": [64, 64]}


@pytest.mark.slow
def test_a_planted_pattern_is_found(tmp_path, store_factory):
    rng = np.random.default_rng(0)
    dense = np.abs(rng.standard_normal((2, 16, 8))).astype(np.float32) * 0.3
    pattern = np.array([0, 0, 0, 5, 0, 5, 0, 0], dtype=np.float32)
    dense[0, 1 * 4 + 2] = pattern  # source: grid row 1, column 2
    dense[1, 3 * 4 + 0] = pattern  # target: grid row 3, column 0
    url = str(tmp_path / "c.zarr")
    store_factory.build_store(url, CARD, splits={"test": [0, 0]},
                              features={"test": {"dense": dense, "pooled": np.zeros((2, 4))}},
                              dataset={"name": "toy", "num_classes": 1},
                              layout=StoreLayout(chunk_images=2))
    result = correspond(url, 0, (40, 24), [1])  # the center of cell (row 1, column 2)
    x, y = result["points"][0]
    assert abs(x - 8) <= 8 and abs(y - 56) <= 8  # within the cell (row 3, column 0)
    assert result["maps"].shape == (1, 64, 64) and result["maps"].max() <= 1 + 1e-5
    written = plot_correspondence(result, None, tmp_path / "png")
    assert [p.name for p in written] == ["correspond_00_1.png", "correspond_grid.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


@pytest.mark.slow
def test_image_files_through_the_trunk_at_two_cuts(tmp_path):
    from safe_cache.analysis.correspond import correspond_images
    from safe_cache.demo import make_shapes_dataset

    make_shapes_dataset(tmp_path, per_class=2)
    images = sorted((tmp_path / "shapes" / "images").rglob("*.jpg"))
    for cut, cells in (("pool", 3), ("layer4", 6)):  # tiny ResNet at 96 px: 3x3, 6x6 maps
        result = correspond_images("safe-cache-tiny-rn", None, images[0], (50, 40),
                                   [images[0], images[3]], cut=cut)
        assert result["maps"].shape == (2, 96, 96)
        # an image matched against itself: the similarity peaks (at 1) at the source point
        assert result["maps"][0][40, 50] == result["maps"][0].max()
        assert abs(result["maps"][0][40, 50] - 1) < 1e-5
        assert len(result["paths"]) == 3 and result["card"]["token_grid"] == [cells, cells]
