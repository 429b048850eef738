"""Correspondence (Eq. 1) finds a pattern planted at different places in two dense maps."""

from __future__ import annotations

import numpy as np

from safe_cache import card_fingerprint
from safe_cache.correspond import correspond, plot_correspondence
from safe_cache.store import StoreLayout, create_store

CARD = {"model": "toy", "pretrained": None, "family": "resnet", "T": 16, "C": 8, "D": 4,
        "grid": [4, 4], "image_size": [64, 64]}


def test_a_planted_pattern_is_found(tmp_path):
    rng = np.random.default_rng(0)
    dense = np.abs(rng.standard_normal((2, 16, 8))).astype(np.float32) * 0.3
    pattern = np.array([0, 0, 0, 5, 0, 5, 0, 0], dtype=np.float32)
    dense[0, 1 * 4 + 2] = pattern  # source: grid row 1, column 2
    dense[1, 3 * 4 + 0] = pattern  # target: grid row 3, column 0
    url = str(tmp_path / "c.zarr")
    with create_store(url, CARD, card_fingerprint(CARD), {"name": "toy", "num_classes": 1},
                      views={"count": 0}, layout=StoreLayout(chunk_images=2)) as store:
        store.append_rows("test", ["a.png", "b.png"], [0, 0])
        store.write_unit("test", 0, {"dense": dense, "pooled": np.zeros((2, 4))})
    result = correspond(url, 0, (40, 24), [1])  # the center of cell (row 1, column 2)
    x, y = result["points"][0]
    assert abs(x - 8) <= 8 and abs(y - 56) <= 8  # within the cell (row 3, column 0)
    assert result["maps"].shape == (1, 64, 64) and result["maps"].max() <= 1 + 1e-5
    written = plot_correspondence(result, None, tmp_path / "png")
    assert [p.name for p in written] == ["correspond_00_b.png", "correspond_grid.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


def test_image_files_through_the_trunk_at_two_cuts(tmp_path):
    from safe_cache.correspond import correspond_images
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
        assert len(result["paths"]) == 3 and result["grid"] == [cells, cells]
