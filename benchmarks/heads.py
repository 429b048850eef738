"""Benchmark the pooling heads: naive (open_clip's modules) vs fast (single-query), and a stacked
grid of G configurations vs G sequential heads. Prints one JSON object.

    python benchmarks/heads.py [--models RN50,ViT-B-16,PE-Core-B-16] [--batch 8] [--grid 12]
                               [--device auto]

The two sides of every comparison run in the same process, interleaved round by round (this
machine is shared and noisy), and each figure is the median over rounds. Random weights: speed
does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from safe_cache import load_backbone
from safe_cache.fit.grid import StackedHeads, grid_optimizer
from safe_cache.runtime.allocator import tune_cpu_allocator


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def interleaved(
    sides: dict[str, Callable[[], None]], rounds: int, iters: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per call of each side, measured alternately round by round."""
    for fn in sides.values():  # warm-up (allocations, kernel selection)
        fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / iters)
    return {name: statistics.median(values) for name, values in times.items()}


def forward_backward(head, x: torch.Tensor) -> Callable[[], None]:
    params = list(head.parameters())
    assert params and all(p.requires_grad for p in params)

    def run() -> None:
        head(x).square().mean().backward()
        for p in params:
            p.grad = None

    return run


def bench_model(name: str, batch: int, grid: int, rounds: int, device: torch.device) -> dict:
    backbone = load_backbone(name, device=device)
    card = backbone.card
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, card["tokens"], card["channels"], device=device, generator=generator)
    x = x.relu() if backbone.family_rules.nonnegative_dense else x  # post-ReLU maps
    naive = backbone.naive_head().requires_grad_(True)
    fast = backbone.new_head()
    heavy = device.type == "cpu"
    single = interleaved(
        {"naive": forward_backward(naive, x), "fast": forward_backward(fast, x)},
        rounds, 1 if heavy else 20, device,
    )

    stacked = StackedHeads(backbone.new_head(), grid)
    sequential = [backbone.new_head() for _ in range(grid)]
    seq_runs = [forward_backward(head, x) for head in sequential]
    multi = interleaved(
        {"stacked": forward_backward(stacked, x),
         "sequential": lambda: [run() for run in seq_runs]},
        rounds, 1 if heavy else 10, device,
    )
    optim = bench_optimizers(stacked, sequential, grid, rounds, device)
    return {
        "model": name,
        "tokens": card["tokens"], "channels": card["channels"],
        "embed_dim": card["embed_dim"],
        "fwd_bwd_samples_per_s": {
            "naive": batch / single["naive"],
            "fast": batch / single["fast"],
            f"stacked_{grid}": grid * batch / multi["stacked"],
            f"sequential_{grid}": grid * batch / multi["sequential"],
        },
        "fast_over_naive": single["naive"] / single["fast"],
        "stacked_over_sequential": multi["sequential"] / multi["stacked"],
        "optimizer_step_ms": optim,
    }


def bench_optimizers(stacked, sequential, grid, rounds, device) -> dict[str, float]:
    """One AdamW step for all G configurations: the grid optimizer (one param group per
    configuration) vs G independent torch optimizers (what a naive sweep does)."""
    for head in [stacked, *sequential]:
        for p in head.parameters():
            p.grad = torch.randn_like(p)
    lrs, wds = [1e-4] * grid, [1e-3] * grid
    together, _ = grid_optimizer(stacked, lrs, wds, total_steps=12_800)
    independent = [torch.optim.AdamW(h.parameters(), lr=1e-4, weight_decay=1e-3, fused=True)
                   for h in sequential]
    times = interleaved(
        {"grid_optimizer": together.step,
         "independent_torch": lambda: [opt.step() for opt in independent]},
        rounds, 1 if device.type == "cpu" else 10, device,
    )
    return {name: 1000 * seconds for name, seconds in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="RN50,ViT-B-16,PE-Core-B-16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--grid", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-allocator-tuning", action="store_true",
                        help="Leave glibc's malloc as it is (see safe_cache.runtime.allocator).")
    args = parser.parse_args()
    device = pick_device(args.device)
    tuned = False if args.no_allocator_tuning else tune_cpu_allocator()
    results = [bench_model(m, args.batch, args.grid, args.rounds, device)
               for m in args.models.split(",")]
    print(json.dumps({
        "benchmark": "heads",
        "device": describe(device),
        "torch": torch.__version__,
        "batch": args.batch,
        "grid": args.grid,
        "rounds": args.rounds,
        "allocator_tuned": tuned,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
