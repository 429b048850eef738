"""Benchmark: what torch's intra-op threads buy fit's training step and extract's trunk, per op
size, on an otherwise idle machine (the numbers runtime/threads.py's policy is chosen from).

    python benchmarks/threads.py [--models safe-cache-tiny-vit,RN50,ViT-B-16] [--rounds 3]

For each model: fit's own step (fit/step.py: 12 configurations, batch 8, maps of the model's
shape) and the trunk on a batch of 8 images, at 1, 2, ... usable-core threads, the counts
alternating round by round. Printed: median seconds per count and the speed-up of each count
over one thread. One JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from safe_cache import load_backbone
from safe_cache.fit.grid import StackedHeads
from safe_cache.fit.recipe import PRESETS
from safe_cache.fit.step import GridStep
from safe_cache.runtime.threads import usable_cores

GRID = [(lr, wd) for lr in (1e-4, 1e-5, 1e-6, 1e-7) for wd in (0.0, 1e-3, 1e-5)]


def timed(fn, repeats: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def sides(model: str):
    backbone = load_backbone(model, None)
    card, generator = backbone.card, torch.Generator().manual_seed(0)
    pool = torch.randn(64, card["tokens"], card["channels"], generator=generator).relu().half()
    labels = torch.randint(0, 101, (64,), generator=generator)
    text = F.normalize(torch.randn(101, card["embed_dim"], generator=generator), dim=-1)
    stacked = StackedHeads(backbone.new_head(), len(GRID))
    step = GridStep(stacked, pool, labels, text, card["logit_scale"], [g[0] for g in GRID],
                    [g[1] for g in GRID], 12_800, PRESETS["safe"], 8)
    images = torch.randn(8, 3, *card["image_size"], generator=generator)

    def fit_step() -> None:
        step.step(torch.randint(0, 64, (8,), generator=generator))

    def trunk() -> None:
        with torch.no_grad():
            backbone.trunk(images)

    repeats = 50 if card["channels"] * card["tokens"] < 100_000 else 5
    return {"fit_step": (fit_step, repeats), "trunk_batch8": (trunk, max(1, repeats // 5))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="safe-cache-tiny-vit,RN50,ViT-B-16")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    counts = list(range(1, usable_cores() + 1))
    results = {}
    for model in args.models.split(","):
        for name, (fn, repeats) in sides(model).items():
            seconds: dict[int, list[float]] = {n: [] for n in counts}
            for _ in range(args.rounds):
                for n in counts:
                    torch.set_num_threads(n)
                    seconds[n].append(timed(fn, repeats))
            median = {n: statistics.median(v) for n, v in seconds.items()}
            results[f"{model}/{name}"] = {
                "seconds": {str(n): round(s, 5) for n, s in median.items()},
                "speedup_over_1_thread": {str(n): round(median[1] / s, 2)
                                          for n, s in median.items()},
            }
    print(json.dumps({"benchmark": "threads", "usable_cores": len(counts),
                      "rounds": args.rounds, "results": results}, indent=2))


if __name__ == "__main__":
    main()
