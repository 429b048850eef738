"""Benchmark store layouts: write and read MB/s and bytes per image for codec/chunk choices, on
realistic dense maps (a random-weight RN50 trunk on random images: post-ReLU, float16).

    python benchmarks/store.py [--model RN50] [--images 256] [--rounds 3]

Every layout is written and read once per round, layouts interleaved; medians are printed as
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from safe_cache import card_fingerprint, load_backbone
from safe_cache.data.views import ViewRecipe
from safe_cache.store import StoreLayout, create_store, open_store

LAYOUTS = {
    "chunk32-none": StoreLayout(chunk_images=32, compression="none"),
    "chunk32-blosc-zstd1": StoreLayout(chunk_images=32),
    "chunk128-blosc-zstd1": StoreLayout(chunk_images=128),
    "shard256x32-blosc-zstd1": StoreLayout(chunk_images=32, shard_images=256),
}


def realistic_maps(model: str, count: int) -> tuple[np.ndarray, dict]:
    backbone = load_backbone(model)
    height, width = backbone.card["image_size"]
    generator = torch.Generator().manual_seed(0)
    maps = []
    for _ in range(-(-count // 16)):
        images = torch.randn(16, 3, height, width, generator=generator)
        maps.append(backbone.trunk(images).half().numpy())
    return np.concatenate(maps)[:count], backbone.card


def write(url: str, layout: StoreLayout, maps: np.ndarray, card: dict) -> float:
    start = time.perf_counter()
    with create_store(url, card, card_fingerprint(card), {"name": "bench", "num_classes": 1,
                      "classnames": ["bench"]}, views=ViewRecipe(count=0).describe(),
                      layout=layout) as store:
        store.append_rows("test", [f"{i}.jpg" for i in range(len(maps))], [0] * len(maps))
        pooled = np.zeros((layout.unit, card["embed_dim"]), dtype=np.float32)
        for unit in range(-(-len(maps) // layout.unit)):
            rows = maps[unit * layout.unit:(unit + 1) * layout.unit]
            store.write_unit("test", unit, {"dense": rows, "pooled": pooled[:len(rows)]})
    return time.perf_counter() - start


def read(url: str, batch: int = 256) -> tuple[float, float]:
    """(seconds for a sequential read of every map, seconds per random 8-image minibatch),
    through the store's own reader (`read_rows`, with its finite check): what fit pays."""
    store = open_store(url)
    rows = store.row_count("test")
    start = time.perf_counter()
    for lo in range(0, rows, batch):
        store.read_rows("test", "dense", np.arange(lo, min(lo + batch, rows)))
    sequential = time.perf_counter() - start
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(20):
        store.read_rows("test", "dense", np.sort(rng.choice(rows, 8, replace=False)))
    return sequential, (time.perf_counter() - start) / 20


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in (path / "test" / "dense").rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    maps, card = realistic_maps(args.model, args.images)
    megabytes = maps.nbytes / 1e6
    results: dict[str, dict[str, list[float]]] = {k: {"w": [], "r": [], "b": []} for k in LAYOUTS}
    sizes = {}
    folder = Path(tempfile.mkdtemp())
    try:
        for round_ in range(args.rounds):
            for name, layout in LAYOUTS.items():
                path = folder / f"{name}-{round_}.zarr"
                results[name]["w"].append(write(str(path), layout, maps, card))
                sequential, minibatch = read(str(path))
                results[name]["r"].append(sequential)
                results[name]["b"].append(minibatch)
                sizes[name] = size_of(path)
                shutil.rmtree(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({
        "benchmark": "store", "model": args.model, "images": args.images,
        "map_shape": list(maps.shape[1:]), "raw_mb": round(megabytes, 1), "rounds": args.rounds,
        "layouts": {name: {
            "write_mb_s": round(megabytes / statistics.median(r["w"]), 1),
            "read_mb_s": round(megabytes / statistics.median(r["r"]), 1),
            "random_minibatch_ms": round(1000 * statistics.median(r["b"]), 2),
            "bytes_per_image": sizes[name] // args.images,
            "ratio": round(maps.nbytes / sizes[name], 2),
        } for name, r in results.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
