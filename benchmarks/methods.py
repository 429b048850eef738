"""Benchmark the workbench: seconds per (16-shot, seed) run of every method on RN50-sized
features, beside SAFE's.

    python benchmarks/methods.py [--classes 100] [--test 5000] [--rounds 2] [--threads 1]

Inputs: synthetic CLIP-like features of RN50's sizes (pooled D = 1024; dense 7 x 7 x 2048 for
the methods that read maps), `--classes` classes x 16 shots x 10 stored views, the min(K, 4) =
4-shot val set and `--test` test rows; features are class means plus noise, normalised as CLIP's
are, so every method does its real work (searches, epochs, solves).

ProLIP reads dense maps, not pooled features: its training is timed whole on synthetic 2048-d
pre-projection features, and computing those from the maps is added at the per-map cost of
RN50's head measured in the same round. SAFE's run is fit's own training step (fit/step.py, the
12 lr x wd configurations stacked) timed for `--steps` iterations, plus its val evaluation every
100, extrapolated to the protocol's
12,800 iterations, plus one pass of the test maps through the head. Every other method is
timed whole, as fit calls it (fit/baselines.py and the workbench registry). The methods alternate
round by round and the median is kept; `fraction_of_safe` is a method's seconds over SAFE's
(the target: at most 0.1 for every method but SAFE and cross_modal_lp). One JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from safe_cache import load_backbone
from safe_cache.fit import adapters
from safe_cache.fit.grid import StackedHeads
from safe_cache.fit.methods import WORKBENCH_METHODS
from safe_cache.fit.recipe import PRESETS
from safe_cache.fit.step import GridStep
from safe_cache.fit.workbench import MethodInputs, registry
from safe_cache.store import FeatureStore

GRID = [(lr, wd) for lr in (1e-4, 1e-5, 1e-6, 1e-7) for wd in (0.0, 1e-3, 1e-5)]
ITERS, EVAL_EVERY, BATCH, SHOTS, VIEWS = 12_800, 100, 8, 16, 10
TEMPLATES = 7  # sentence embeddings per class (Tip-Adapter's ImageNet ensemble has 7)


class StandInStore:
    """What the workbench methods read from a store beyond MethodInputs' features: the prompt
    set's raw sentence embeddings (clap, cross_modal_lp), the mirrored center views'
    pooled features (cross_modal_lp) and the dataset's name (clip_adapter's epochs). A benchmark
    stand-in, not a FeatureStore."""

    center_flip = True

    def __init__(self, embeddings: np.ndarray, counts: list[int], flips: np.ndarray) -> None:
        self.embeddings, self.counts, self.flips = embeddings, counts, flips
        self.manifest = {"dataset": {"name": "benchmark"}}

    def sentence_embeddings(self, prompt_set: str = "hand") -> tuple[np.ndarray, list[int]]:
        return self.embeddings, self.counts

    def read_rows(self, split: str, name: str, rows: np.ndarray) -> np.ndarray:
        if (split, name) != ("train", "flip_pooled"):
            raise KeyError(f"the benchmark's stand-in store holds no {split}/{name}")
        return self.flips[rows]


def features(classes: int, test: int, dim: int = 1024, seed: int = 0) -> MethodInputs:
    """CLIP-like pooled features: a shared direction, a class mean each, noise."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, generator=g)
    means = torch.randn(classes, dim, generator=g)
    text = F.normalize(means + 0.5 * torch.randn(classes, dim, generator=g), dim=-1)

    def draw(labels: torch.Tensor, *shape: int) -> torch.Tensor:
        noise = torch.randn(*labels.shape, *shape, dim, generator=g)
        center = (3 * common + means[labels]).reshape(*labels.shape, *([1] * len(shape)), dim)
        return center + 2 * noise

    labels = torch.arange(classes).repeat_interleave(SHOTS)
    views = draw(labels, VIEWS)
    val_labels = torch.arange(classes).repeat_interleave(4)
    test_labels = torch.arange(test) % classes
    sentences = F.normalize(text.repeat_interleave(TEMPLATES, 0)
                            + 0.1 * torch.randn(classes * TEMPLATES, dim, generator=g), dim=-1)
    flips = draw(labels)
    return MethodInputs(
        train_views=views, center=draw(labels), labels=labels,
        val=adapters.Split(F.normalize(draw(val_labels), dim=-1), val_labels),
        test=adapters.Split(F.normalize(draw(test_labels), dim=-1), test_labels),
        classifier=text, scale=100.0, seed=1, device=torch.device("cpu"),
        store=cast(FeatureStore, StandInStore(
            sentences.numpy(), [TEMPLATES] * classes, flips.numpy())), prompts="hand",
        train_rows=np.arange(len(labels)), val_rows=np.arange(len(val_labels)),
        test_rows=np.arange(test), test_chunk=256)


def adapter_runs(inputs: MethodInputs) -> dict[str, Callable[[], Any]]:
    """The adapters fit always had, called as fit/baselines.py calls them."""
    tip = dict(adapters.DEFAULT_TIP)
    probe = adapters.Split(F.normalize(inputs.center, dim=-1), inputs.labels)
    args = (inputs.train_views, inputs.labels, inputs.val, inputs.test, inputs.classifier,
            inputs.scale, tip)
    return {
        "tip_adapter": lambda: adapters.tip_adapter(*args),
        "tip_adapter_f": lambda: adapters.tip_adapter_f(*args, epochs=20, seed=1),
        "linear_probe": lambda: adapters.linear_probe(probe, inputs.val, inputs.test,
                                                      inputs.classes),
    }


def safe_seconds(classes: int, test: int, steps: int) -> dict[str, float]:
    """SAFE's run: the measured step (and val evaluation) at the protocol's iterations, plus
    the test maps once through the chosen head."""
    backbone = load_backbone("RN50")
    card = backbone.card
    g = torch.Generator().manual_seed(0)
    samples = 2 * SHOTS * classes  # the safe recipe: center and mirrored center
    pool = torch.randn(samples, card["tokens"], card["channels"], generator=g).relu().half()
    labels = torch.randint(0, classes, (samples,), generator=g)
    text = F.normalize(torch.randn(classes, card["embed_dim"], generator=g), dim=-1)
    stacked = StackedHeads(backbone.new_head(), len(GRID))
    step = GridStep(stacked, pool, labels, text, card["logit_scale"], [c[0] for c in GRID],
                    [c[1] for c in GRID], ITERS, PRESETS["safe"], BATCH)
    step.step(torch.randint(0, samples, (BATCH,), generator=g))  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step.step(torch.randint(0, samples, (BATCH,), generator=g))
    per_step = (time.perf_counter() - start) / steps
    maps = torch.randn(256, card["tokens"], card["channels"], generator=g).relu()
    with torch.no_grad():
        start = time.perf_counter()
        stacked(maps)
        per_map_grid = (time.perf_counter() - start) / 256
        head = stacked.config_head(0).eval()
        start = time.perf_counter()
        head(maps)
        per_map = (time.perf_counter() - start) / 256
    evaluation = ITERS / EVAL_EVERY * 4 * classes * per_map_grid
    return {"seconds": ITERS * per_step + evaluation + test * per_map, "step_s": per_step,
            "val_evaluations_s": evaluation, "test_pass_s": test * per_map}


def prolip_run(inputs: MethodInputs, test: int) -> Callable[[], float]:
    """ProLIP's run at RN50's sizes: its training (fit_prolip's train_projections, 4 lrs x 300
    full-batch epochs) on synthetic 2048-d pre-projection features of the 10 views, timed whole;
    plus computing those features from the dense maps (train views, val, test) at the per-map
    cost of RN50's head.pre_projection measured on 256 maps. Returns that sum."""
    from safe_cache.fit.workbench.prolip import EPOCHS, LRS, train_projections

    head = load_backbone("RN50").head.eval()
    card = load_backbone("RN50").card
    weight0, bias = (t.detach().clone() if t is not None else None for t in head.projection())
    g = torch.Generator().manual_seed(2)
    pre = torch.randn(len(inputs.labels), VIEWS, weight0.shape[1], generator=g)
    maps = torch.randn(256, card["tokens"], card["channels"], generator=g).relu()
    shots = SHOTS

    def run() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            head.pre_projection(maps)
        per_map = (time.perf_counter() - start) / 256
        start = time.perf_counter()
        train_projections(pre, inputs.labels, weight0, bias, inputs.classifier, LRS,
                          1.0 / shots, EPOCHS)
        trained = time.perf_counter() - start
        count = len(inputs.labels) * VIEWS + len(inputs.val.labels) + test
        return trained + count * per_map

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--test", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="SAFE steps timed per round")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", default=None,
                        help="Comma-separated methods to time beside SAFE (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = features(args.classes, args.test)
    workbench = registry()
    runs = {**adapter_runs(inputs),
            **{name: (lambda m=workbench[name]: m(inputs)) for name in WORKBENCH_METHODS
               if name in workbench and name != "prolip"}}
    only = set(args.only.split(",")) if args.only else None
    if only is not None:
        runs = {name: run for name, run in runs.items() if name in only}
    timed_prolip = "prolip" in workbench and (only is None or "prolip" in only)
    prolip = prolip_run(inputs, args.test) if timed_prolip else None
    times: dict[str, list[float]] = {name: [] for name in ("safe", *runs)}
    if prolip is not None:
        times["prolip"] = []
    safe_parts = []
    for _ in range(args.rounds):  # interleaved: every method once per round
        safe_parts.append(safe_seconds(args.classes, args.test, args.steps))
        times["safe"].append(safe_parts[-1]["seconds"])
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
        if prolip is not None:
            times["prolip"].append(prolip())
    safe = statistics.median(times["safe"])
    methods = {name: {"seconds": round(statistics.median(values), 3),
                      "fraction_of_safe": round(statistics.median(values) / safe, 5)}
               for name, values in times.items()}
    print(json.dumps({
        "benchmark": "methods", "device": "cpu", "threads": torch.get_num_threads(),
        "classes": args.classes, "shots": SHOTS, "views": VIEWS, "test": args.test,
        "rounds": args.rounds, "safe_extrapolated_from_steps": args.steps,
        "safe_parts": {k: round(statistics.median(p[k] for p in safe_parts), 4)
                       for k in safe_parts[0]},
        "methods": methods,
        "not_timed": sorted(set(WORKBENCH_METHODS) - set(times)),
        "prolip_note": "training timed whole on synthetic pre-projection features; computing"
                       " them from the maps at the measured per-map cost of RN50's head",
    }, indent=2))


if __name__ == "__main__":
    main()
