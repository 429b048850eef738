"""Benchmark stage 1: images/s of `extract` end to end (decode, views, trunk, head, compressed
writes) vs the trunk alone on pre-decoded tensors; same model, device and batch size.

    python benchmarks/extract.py [--model RN50] [--images 320] [--batch-size 32] [--workers 1]
                                 [--decode workers|device] [--writer-threads 1]

Images are generated JPEGs of a typical benchmark size (512 x 384). The two sides alternate
round by round in one process; medians are printed as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from safe_cache import load_backbone
from safe_cache.extract import ExtractConfig, extract
from safe_cache.runtime.device import resolve_device


def write_dataset(root: Path, images: int, classes: int = 4) -> None:
    """A food101-layout dataset: `images` test images, one train and one val image a class."""
    rng = random.Random(0)
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    folder = root / "food-101" / "images"
    counts = {"train": classes, "val": classes, "test": images}
    for part, count in counts.items():
        for index in range(count):
            label = index % classes
            relative = f"class_{label}/{part}_{index}.jpg"
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            image = Image.new("RGB", (512, 384), tuple(rng.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(image)
            for _ in range(30):
                x, y = rng.randrange(512), rng.randrange(384)
                draw.ellipse([x, y, x + rng.randrange(10, 120), y + rng.randrange(10, 120)],
                             fill=tuple(rng.randrange(256) for _ in range(3)))
            image.save(folder / relative, quality=90)
            split[part].append([relative, label, f"class_{label}"])
    (root / "food-101" / "split_zhou_Food101.json").write_text(json.dumps(split))


def trunk_only(model: str, images: int, batch: int, device: torch.device) -> float:
    """Seconds for the trunk (and original head) alone on pre-decoded, pre-processed tensors."""
    backbone = load_backbone(model, device=device)
    height, width = backbone.card["image_size"]
    tensors = torch.randn(images, 3, height, width)
    start = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, images, batch):
            dense = backbone.trunk(tensors[lo:lo + batch].to(device))
            backbone.head(dense.float()).cpu()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def end_to_end(root: Path, model: str, batch: int, workers: int | str, device: str,
               decode: str = "workers", writer_threads: int = 1) -> tuple:
    store = root / f"store-{time.monotonic_ns()}.zarr"
    config = ExtractConfig(dataset="food101", root=str(root), model=model, pretrained=None,
                           store=str(store), shots=(1,), seeds=(1,), views=0,
                           batch_size=batch, workers=workers, device=device, decode=decode,
                           writer_threads=writer_threads)
    report = extract(config)
    shutil.rmtree(store)
    return (sum(report.pipeline_seconds.values()), report.seconds,
            sum(report.extracted.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--decode", choices=("workers", "device"), default="workers")
    parser.add_argument("--writer-threads", type=int, default=1)
    args = parser.parse_args()
    device = resolve_device(args.device)
    root = Path(tempfile.mkdtemp())
    try:
        write_dataset(root, args.images)
        e2e, whole, trunk, total = [], [], [], 0
        for _ in range(args.rounds):
            seconds, command, total = end_to_end(root, args.model, args.batch_size,
                                                 args.workers, str(device), args.decode,
                                                 args.writer_threads)
            e2e.append(seconds)
            whole.append(command)
            trunk.append(trunk_only(args.model, total, args.batch_size, device))
            print(f"round: pipeline {seconds:.1f} s (command {command:.1f} s), trunk"
                  f" {trunk[-1]:.1f} s", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    e2e_rate = total / statistics.median(e2e)
    trunk_rate = total / statistics.median(trunk)
    print(json.dumps({
        "benchmark": "extract", "model": args.model, "device": str(device),
        "threads": torch.get_num_threads(), "images": total, "batch_size": args.batch_size,
        "workers": args.workers, "decode": args.decode, "writer_threads": args.writer_threads,
        "rounds": args.rounds,
        "end_to_end_images_per_s": round(e2e_rate, 2),
        "trunk_only_images_per_s": round(trunk_rate, 2),
        "ratio": round(e2e_rate / trunk_rate, 3),
        "whole_command_images_per_s": round(total / statistics.median(whole), 2),
        "note": "end to end = every split's pipeline (decode, views, trunk, head, compressed"
                " writes, completion records); the whole command also loads the backbone,"
                " builds the text classifier and creates the store once",
    }, indent=2))


if __name__ == "__main__":
    main()
