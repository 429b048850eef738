"""Benchmark scaling out: `extract` in-process vs on a LocalCluster of N worker processes.

    python benchmarks/cluster.py [--model ViT-B-32] [--images 256] [--local-workers 2] [--rounds 2]

Same generated dataset (512 x 384 JPEGs, benchmarks/extract.py), same model with random weights,
same batch size; each side extracts into a fresh store. The sides alternate round by round in one
run (the machine is shared and noisy); the cluster side includes starting the LocalCluster and
each worker loading the backbone, as a user pays them. With T cores, the in-process side uses
all T torch threads and each of N workers T/N; the ratio says what the distributed path costs or
gains on one machine, not across machines. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from extract import write_dataset

from safe_cache.extract import ExtractConfig, extract
from safe_cache.runtime.execution import Execution


def one_side(root: Path, model: str, batch: int, workers: int, store: Path) -> float:
    config = ExtractConfig(dataset="food101", root=str(root), model=model, pretrained=None,
                           store=str(store), shots=(1,), seeds=(1,), views=0, batch_size=batch,
                           workers=1, task_images=batch)
    started = time.perf_counter()
    extract(config, execution=Execution(local_workers=workers))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--local-workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="safe-cache-cluster-"))
    try:
        write_dataset(work, args.images)
        seconds: dict[str, list[float]] = {"in_process": [], "cluster": []}
        for round_ in range(args.rounds):
            for side, workers in (("in_process", 0), ("cluster", args.local_workers)):
                store = work / f"{side}-{round_}.zarr"
                seconds[side].append(one_side(work, args.model, args.batch_size, workers, store))
        images = args.images + 8  # test images plus one train and one val image a class
        median = {side: statistics.median(values) for side, values in seconds.items()}
        print(json.dumps({
            "model": args.model, "images": images, "batch_size": args.batch_size,
            "local_workers": args.local_workers, "cores": os.cpu_count(), "rounds": args.rounds,
            "seconds": seconds,
            "images_per_s": {side: images / value for side, value in median.items()},
            "cluster_over_in_process_speed": median["in_process"] / median["cluster"],
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        }, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
