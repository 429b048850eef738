"""Benchmark model/stacked.py: a grid's weight products as one batched op against one product
per configuration, forward and backward, interleaved round by round.

    python benchmarks/stacked.py [--grid 12] [--width 2048] [--batch 8] [--rounds 5]

The shapes are a RN50 attention pool's (2048 x 2048 weights, batch 8, 12 configurations); each
side computes out_g = a_g W_g^T for every configuration g and the gradients of a and of every
W_g (the per-configuration side as fit computed it before: F.linear per configuration, autograd
writing each weight's gradient). The allocator is tuned as fit tunes it (runtime/allocator.py).
One JSON object: each side's median seconds and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from safe_cache.model.stacked import stacked_product
from safe_cache.runtime.allocator import tune_cpu_allocator


def timed(fn, repeats: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=12)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    tuned = tune_cpu_allocator()
    generator = torch.Generator().manual_seed(0)
    storage = torch.randn(args.grid, args.width, args.width, generator=generator) * 0.01
    leaves = [torch.nn.Parameter(storage[g]) for g in range(args.grid)]
    a = torch.randn(args.grid, args.batch, args.width, generator=generator, requires_grad=True)

    def per_configuration() -> None:
        for leaf in leaves:
            leaf.grad = None
        out = torch.stack([F.linear(a[g], leaves[g]) for g in range(args.grid)])
        out.sum().backward()

    def batched() -> None:
        for leaf in leaves:
            leaf.grad = None
        stacked_product(a, leaves).sum().backward()

    times: dict[str, list[float]] = {"per_configuration": [], "batched": []}
    for _ in range(args.rounds):
        times["per_configuration"].append(timed(per_configuration))
        times["batched"].append(timed(batched))
    median = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "benchmark": "stacked", "threads": torch.get_num_threads(), "allocator_tuned": tuned,
        "grid": args.grid, "width": args.width, "batch": args.batch, "rounds": args.rounds,
        "seconds_forward_backward": {k: round(v, 4) for k, v in median.items()},
        "per_configuration_over_batched": round(median["per_configuration"]
                                                / median["batched"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
