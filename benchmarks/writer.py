"""Benchmark extract's writer: images/s that N writer threads compress and write, and by
arithmetic how many threads keep up with a trunk at a given rate. Prints one JSON object.

    python benchmarks/writer.py [--model RN50] [--images 512] [--threads 1,2] [--rounds 3]
                                [--trunk-rate 3000]

The maps are realistic (a random-weight trunk on random images: post-ReLU RN50 maps, 49 x 2048,
in float16 as extract hands them to the writer), written through extract's own writer
(`_Writer`, the default local layout: 32-image chunks, blosc zstd) into a fresh store per
round; thread counts interleave round by round and
each figure is the median. The thread count that keeps up is ceil(trunk rate / per-thread rate)
under linear scaling; the measured scaling from 1 to N threads on this machine is printed beside
it, since a machine with fewer cores than threads cannot scale linearly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from safe_cache import card_fingerprint, load_backbone
from safe_cache.data.views import ViewRecipe
from safe_cache.extract.pipeline import _Writer
from safe_cache.store import StoreLayout, create_store


def realistic_maps(model: str, count: int, device: str | torch.device = "cpu"
                   ) -> tuple[np.ndarray, np.ndarray, dict]:
    backbone = load_backbone(model, device=device)
    height, width = backbone.card["image_size"]
    generator = torch.Generator().manual_seed(0)
    dense, pooled = [], []
    with torch.no_grad():
        for _ in range(-(-count // 16)):
            images = torch.randn(16, 3, height, width, generator=generator).to(device)
            maps = backbone.trunk(images)
            dense.append(maps.half().cpu().numpy())  # as extract hands them over: float16
            pooled.append(backbone.head(maps).cpu().numpy())
    return np.concatenate(dense)[:count], np.concatenate(pooled)[:count], backbone.card


def write_all(url: str, dense: np.ndarray, pooled: np.ndarray, card: dict,
              threads: int) -> float:
    """Seconds for `threads` writer threads to write every unit (the store made beforehand)."""
    layout = StoreLayout(chunk_images=32)
    with create_store(url, card, card_fingerprint(card), {"name": "bench", "num_classes": 1,
                      "classnames": ["bench"]}, views=ViewRecipe(count=0).describe(),
                      layout=layout) as store:
        store.append_rows("test", [f"{i}.jpg" for i in range(len(dense))], [0] * len(dense))
        units = [{"unit": u, "first_view": 0, "features": {
            "dense": dense[u * layout.unit:(u + 1) * layout.unit],
            "pooled": pooled[u * layout.unit:(u + 1) * layout.unit]}}
            for u in range(-(-len(dense) // layout.unit))]
        start = time.perf_counter()
        with _Writer(store, "test", threads) as writer:
            for unit in units:
                writer.put(unit)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trunk-rate", type=float, default=3000.0,
                        help="images/s the trunk produces (an RN50 on one large GPU)")
    args = parser.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    dense, pooled, card = realistic_maps(args.model, args.images)
    folder = Path(tempfile.mkdtemp(prefix="safe-cache-writer-"))
    seconds: dict[int, list[float]] = {n: [] for n in counts}
    try:
        for round_ in range(args.rounds):
            for n in counts:
                url = str(folder / f"r{round_}-t{n}.zarr")
                seconds[n].append(write_all(url, dense, pooled, card, n))
                shutil.rmtree(url)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rates = {n: args.images / statistics.median(v) for n, v in seconds.items()}
    per_thread = rates[counts[0]] / counts[0]
    needed = math.ceil(args.trunk_rate / per_thread)
    print(json.dumps({
        "benchmark": "writer",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": args.model, "map": [card["tokens"], card["channels"]], "images": args.images,
        "layout": "32-image chunks, blosc zstd (default local layout)",
        "images_per_s": {str(n): round(r, 1) for n, r in rates.items()},
        "mb_per_s_in": {str(n): round(r * card["tokens"] * card["channels"] * 2 / 1e6, 1)
                        for n, r in rates.items()},
        "scaling_vs_1_thread": {str(n): round(rates[n] / rates[counts[0]], 2) for n in counts},
        "trunk_rate": args.trunk_rate,
        "threads_to_keep_up_if_linear": needed,
        "rounds": args.rounds,
    }, indent=2))


if __name__ == "__main__":
    main()
