"""The prepared device check: exactness and speed of safe-cache's hot paths on one accelerator,
as one JSON document. Run it through benchmarks/gpu.sh (one call, under 8 minutes on one GPU):

    bash benchmarks/gpu.sh                 # the full check on CUDA
    bash benchmarks/gpu.sh --device cpu    # short settings of the same code (CI runs this)

Sections (each one's failure is recorded in the document, the others still run):
- exactness: the trunk/head split on the device vs the CPU, head(trunk(x)) vs encode_image(x),
  fp16 / bf16 autocast of the trunk against fp32, and the fast head vs open_clip's module
  (outputs and every gradient), for RN50, ViT-B-16 and PE-Core-B-16 (tiny configs with
  --device cpu);
- heads: the fast vs the naive head, forward + backward, batch 8, interleaved rounds;
- fit_step: fit's training step (fit/step.py) replayed as a CUDA graph vs run eagerly, 200
  steps on the protocol's shapes: the outputs' relative difference (an exactness figure) and
  ms per step (skipped on the CPU);
- fit: one paper-protocol run through the library's `fit` on a generated store (RN50 shapes,
  101 classes, 16 shots, the safe recipe's 2 samples per image, 4-shot val, 12,800 iterations,
  the 12-configuration grid; random weights): wall time, graphed and eager (eager only on the
  CPU), whether they chose the same configuration, and the targets (<= 60 s a run; the Table I
  sweep's GPU-hours at this rate);
- extract: the whole pipeline (decode, views, trunk, head, compressed writes by 6 writer
  threads), JPEGs decoded by PIL in the workers and by nvJPEG on the device, vs the trunk
  alone on the same images (target: >= 0.9 of it);
- writer: RN50 maps compressed and written per second by 1, 4 and 8 writer threads (1 and 2
  with --device cpu), and the threads that keep up with the trunk rate the extract section
  measured (benchmarks/writer.py's arithmetic, on this machine's cores).
PE-Core-B-16 (a MAP head) joins RN50 and ViT-B-16 in the exactness and head sections
(safe-cache-tiny-map with --device cpu).
Random weights throughout: speed does not depend on the values, exactness is algebra.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract import end_to_end, trunk_only, write_dataset
from writer import realistic_maps, write_all

from safe_cache import card_fingerprint, load_backbone
from safe_cache.data.views import ViewRecipe
from safe_cache.fit import FitConfig, fit
from safe_cache.runtime.device import resolve_device
from safe_cache.store import StoreLayout, create_store

FULL = {"models": ("RN50", "ViT-B-16", "PE-Core-B-16"), "fit_model": "RN50", "classes": 101,
        "shots": 16, "iters": 12_800, "head_rounds": 5, "extract_images": 2048,
        "extract_batch": 128, "workers": "auto", "extract_writers": 6, "writer_model": "RN50",
        "writer_images": 512, "writer_threads": (1, 4, 8)}
SHORT = {"models": ("safe-cache-tiny-rn", "safe-cache-tiny-vit", "safe-cache-tiny-map"),
         "fit_model": "safe-cache-tiny-rn", "classes": 5, "shots": 2, "iters": 20,
         "head_rounds": 2, "extract_images": 16, "extract_batch": 8, "workers": 0,
         "extract_writers": 1, "writer_model": "safe-cache-tiny-rn", "writer_images": 64,
         "writer_threads": (1, 2)}


STARTED = time.perf_counter()
BUDGET_S = 450.0  # gpu.sh stops the process at 480 s: sections that would start later are skipped
OUT: Path | None = None  # --out: the document so far is written there after every section


def section(name: str, document: dict, function, *args) -> None:
    """Run one section; a failure is recorded (with its traceback's last line), not raised.
    Past the time budget the section is skipped; after it, the document so far is saved."""
    started = time.perf_counter()
    if started - STARTED > BUDGET_S:
        document[name] = {"skipped": f"past the {BUDGET_S:.0f} s budget"}
        return
    try:
        document[name] = function(*args)
    except Exception as exc:  # the other sections still run and report
        document[name] = {"error": f"{type(exc).__name__}: {exc}",
                          "where": traceback.format_exc().strip().splitlines()[-3:]}
    document.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 2)
    print(f"{name}: {document['seconds'][name]} s", file=sys.stderr)
    save(document)


def save(document: dict) -> None:
    """Write the document to --out (by rename: a file there is always whole JSON)."""
    if OUT is not None:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        partial = OUT.with_suffix(".part")
        partial.write_text(json.dumps(document, indent=2))
        partial.replace(OUT)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


@torch.no_grad()
def split_checks(model: str, device: torch.device) -> dict:
    """Device vs CPU, split vs encode_image, autocast vs fp32 (relative max errors)."""
    cpu, here = load_backbone(model), load_backbone(model, device=device)
    height, width = cpu.card["image_size"]
    images = torch.randn(4, 3, height, width, generator=torch.Generator().manual_seed(0))
    reference = cpu.forward_head(cpu.forward_features(images))
    dense = here.forward_features(images.to(device))
    encoded = here.model.encode_image(images.to(device), normalize=False)
    out = {"device_vs_cpu": relative(here.forward_head(dense).cpu(), reference),
           "split_vs_encode_image": relative(here.forward_head(dense), encoded)}
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16} if device.type == "cuda" \
        else {"bf16": torch.bfloat16}
    for name, dtype in dtypes.items():
        with torch.autocast(device.type, dtype=dtype):
            autocast = here.forward_features(images.to(device))
        out[f"{name}_dense_vs_fp32"] = relative(autocast, dense)
        out[f"{name}_pooled_vs_fp32"] = relative(here.forward_head(autocast.float()),
                                                 here.forward_head(dense))
    return out


def head_checks(model: str, device: torch.device) -> dict:
    """The fast head vs open_clip's module on the device: outputs and every gradient."""
    backbone = load_backbone(model, device=device)
    card = backbone.card
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, card["tokens"], card["channels"], generator=generator).relu().to(device)
    probe = torch.randn(8, card["embed_dim"], generator=generator).to(device)
    results = {}
    for name, head in (("fast", backbone.new_head()), ("naive", backbone.naive_head())):
        head = head.to(device).requires_grad_(True)
        inputs = x.clone().requires_grad_(True)
        out = head(inputs)
        (out * probe).sum().backward()
        results[name] = (out.detach(), inputs.grad, {n: p.grad for n, p in
                                                     head.named_parameters()})
    fast, naive = results["fast"], results["naive"]
    names = [n for n in naive[2] if n in fast[2]]  # relative to the largest gradient: some
    scale = max(naive[2][n].abs().max().item() for n in names)  # are exactly zero
    return {"output": relative(fast[0], naive[0]), "input_grad": relative(fast[1], naive[1]),
            "max_param_grad": max((fast[2][n] - naive[2][n]).abs().max().item()
                                  for n in names) / scale}


def head_speed(model: str, device: torch.device, rounds: int) -> dict:
    """Forward + backward of one head, batch 8: fast vs naive, interleaved, median ms."""
    backbone = load_backbone(model, device=device)
    card = backbone.card
    x = torch.randn(8, card["tokens"], card["channels"], device=device).relu()
    heads = {"fast": backbone.new_head().to(device), "naive": backbone.naive_head().to(device)
             .requires_grad_(True)}
    times: dict[str, list[float]] = {name: [] for name in heads}
    for _ in range(rounds):
        for name, head in heads.items():
            for step in range(6):  # 1 warm-up + 5 timed
                if step == 1:
                    _sync(device)
                    started = time.perf_counter()
                head(x).sum().backward()
            _sync(device)
            times[name].append((time.perf_counter() - started) / 5 * 1000)
    medians = {name: float(np.median(values)) for name, values in times.items()}
    return {"fast_ms": medians["fast"], "naive_ms": medians["naive"],
            "speedup": medians["naive"] / medians["fast"]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def protocol_store(folder: Path, model: str, classes: int, shots: int) -> str:
    """A store of `model`-shaped maps (RN50: T 49, C 2048, D 1024): `shots` train images a
    class with their mirrored view, 4-shot val, 2 test images a class; a random head."""
    backbone = load_backbone(model)
    card = backbone.card
    url = str(folder / "protocol.zarr")
    rng = np.random.default_rng(0)
    counts = {"train": shots, "val": min(shots, 4), "test": 2}
    with create_store(url, card, card_fingerprint(card), {"name": "protocol",
                      "num_classes": classes, "classnames": [str(c) for c in range(classes)]},
                      views=ViewRecipe(count=1).describe(), layout=StoreLayout(chunk_images=64),
                      center_flip=True) as store:
        rows = {}
        for split, per_class in counts.items():
            labels = np.repeat(np.arange(classes), per_class)
            rows[split] = store.append_rows(split, [f"{split}/{i}" for i in range(len(labels))],
                                            labels)
            unit = store.layout.unit
            for start in range(0, len(labels), unit):
                n = min(unit, len(labels) - start)
                maps = rng.random((n, card["tokens"], card["channels"]), dtype=np.float32)
                pooled = rng.random((n, card["embed_dim"]), dtype=np.float32)
                features = {"dense": maps, "pooled": pooled}
                if split == "train":
                    features.update(flip_dense=maps[:, ::-1], flip_pooled=pooled,
                                    aug_dense=maps[:, None], aug_pooled=pooled[:, None])
                store.write_unit(split, start // unit, features)
        store.write_fewshot(1, shots, rows["train"], rows["val"])
        classifier = F.normalize(torch.randn(classes, card["embed_dim"]), dim=-1).numpy()
        store.write_classifier("hand", classifier, [[str(c)] for c in range(classes)])
        store.write_head({k: v.numpy() for k, v in backbone.head.state_dict().items()},
                         backbone.model_config)
    return url


def protocol_fit(device: torch.device, settings: dict) -> dict:
    """One paper-protocol run through the library's `fit`, graphed (CUDA only) and eager, on
    the same store; wall times and how far the two runs' choices agree."""
    folder = Path(tempfile.mkdtemp())
    runs = {}
    try:
        url = protocol_store(folder, settings["fit_model"], settings["classes"],
                             settings["shots"])
        for mode in ("graphed", "eager") if device.type == "cuda" else ("eager",):
            config = FitConfig(store=url, shots=(settings["shots"],), seeds=(1,),
                               iters=settings["iters"], device=str(device), methods=(),
                               out=str(folder / mode), cuda_graph=mode == "graphed")
            started = time.perf_counter()
            (record,) = fit(config)
            runs[mode] = (record, time.perf_counter() - started)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    record = runs["eager"][0]
    out = {"model": settings["fit_model"], "classes": settings["classes"],
           "shots": settings["shots"], "iters": settings["iters"],
           "configurations": len(record.grid), "train_samples": record.train_samples}
    for mode, (run, wall) in runs.items():
        out[mode] = {"wall_s": round(wall, 2), "train_s": round(run.timings["train_s"], 2),
                     "train_iters_per_s": round(run.timings["train_iters_per_s"], 1),
                     "execution": run.execution}
    if "graphed" in runs:
        graphed = runs["graphed"][0]
        out["graphed_speedup_train"] = round(record.timings["train_s"]
                                             / graphed.timings["train_s"], 2)
        out["grid_val_acc_max_abs_diff"] = max(
            abs(a["val_acc"] - b["val_acc"]) for a, b in zip(graphed.grid, record.grid,
                                                            strict=True))
        out["same_choice"] = (graphed.methods["safe"]["lr"], graphed.methods["safe"]["wd"]) \
            == (record.methods["safe"]["lr"], record.methods["safe"]["wd"])
    best = runs.get("graphed", runs["eager"])[1]
    if settings is not FULL:
        return out  # the targets are for the full protocol on a GPU
    out["targets"] = {"protocol_run_s": 60, "stretch_s": 20, "met": best <= 60,
                      "table1_sweep_gpu_hours_at_this_rate": round(165 * best / 3600, 2),
                      "note": "Table I = 11 datasets x 5 shots x 3 seeds = 165 runs; the"
                              " arithmetic assumes each takes this 16-shot run's wall time"}
    return out


def step_agreement(device: torch.device, settings: dict) -> dict:
    """fit's training step (fit/step.py) on the protocol's shapes: replayed as a CUDA graph vs
    run eagerly, the same batches; relative max difference of every configuration's output."""
    if device.type != "cuda":
        return {"skipped": "CUDA graphs need CUDA"}
    from safe_cache.fit.grid import StackedHeads
    from safe_cache.fit.recipe import PRESETS
    from safe_cache.fit.step import GridStep

    backbone = load_backbone(settings["fit_model"], device=device)
    card, classes, steps = backbone.card, settings["classes"], 200
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(64, card["tokens"], card["channels"], generator=generator)
    dense = dense.relu().half().to(device)
    labels = torch.randint(0, classes, (64,), generator=generator).to(device)
    text = F.normalize(torch.randn(classes, card["embed_dim"], generator=generator), dim=-1)
    text = text.to(device)
    batches = [torch.randint(0, 64, (8,), generator=generator).to(device) for _ in range(steps)]
    grid = FitConfig(store="unused").grid  # the paper's 12 (lr, wd) configurations
    lrs, wds = [lr for lr, _ in grid], [wd for _, wd in grid]
    outputs, seconds = {}, {}
    for mode in ("eager", "graphed"):
        stacked = StackedHeads(backbone.new_head().to(device), len(lrs))
        step = GridStep(stacked, dense, labels, text, 100.0, lrs, wds, steps, PRESETS["safe"], 8)
        if mode == "graphed":
            step.capture()
        _sync(device)
        started = time.perf_counter()
        for rows in batches:
            step.step(rows)
        _sync(device)
        seconds[mode] = time.perf_counter() - started
        with torch.no_grad():
            outputs[mode] = stacked(dense[:16].float())
    return {"steps": steps, "output": relative(outputs["graphed"], outputs["eager"]),
            "eager_ms_per_step": round(1000 * seconds["eager"] / steps, 3),
            "graphed_ms_per_step": round(1000 * seconds["graphed"] / steps, 3),
            "speedup": round(seconds["eager"] / seconds["graphed"], 2)}


def extract_ratio(device: torch.device, settings: dict) -> dict:
    """The whole extract pipeline, images decoded by PIL in the workers and by torchvision on
    the device, against the trunk alone on the same images; one round each, in that order."""
    root = Path(tempfile.mkdtemp())
    out = {"model": settings["models"][0], "workers": settings["workers"],
           "writer_threads": settings["extract_writers"], "target_ratio": 0.9}
    try:
        write_dataset(root, settings["extract_images"])
        model = settings["models"][0]
        for decode in ("workers", "device"):
            pipeline, _, images = end_to_end(root, model, settings["extract_batch"],
                                             settings["workers"], str(device), decode,
                                             settings["extract_writers"])
            out[f"decode_{decode}_images_per_s"] = round(images / pipeline, 1)
        trunk = trunk_only(model, images, settings["extract_batch"], device)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out.update(images=images, trunk_only_images_per_s=round(images / trunk, 1))
    for decode in ("workers", "device"):
        out[f"ratio_decode_{decode}"] = round(out[f"decode_{decode}_images_per_s"]
                                              / out["trunk_only_images_per_s"], 3)
    return out


def writer_threads(device: torch.device, settings: dict, trunk_rate: float | None) -> dict:
    """Maps written per second by N writer threads; the threads the trunk rate needs."""
    dense, pooled, card = realistic_maps(settings["writer_model"], settings["writer_images"],
                                         device)
    folder = Path(tempfile.mkdtemp())
    rates = {}
    try:
        for threads in settings["writer_threads"]:
            url = str(folder / f"t{threads}.zarr")
            rates[threads] = len(dense) / write_all(url, dense, pooled, card, threads)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    per_thread = rates[1]
    return {"model": settings["writer_model"], "cores": os.cpu_count(),
            "images_per_s": {str(n): round(r, 1) for n, r in rates.items()},
            "trunk_images_per_s": trunk_rate,
            "threads_needed_if_linear": math.ceil(trunk_rate / per_thread)
            if trunk_rate else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--short", action="store_true", help="Short settings (default on CPU).")
    parser.add_argument("--out", type=Path, help="Also write the document here, section by"
                        " section.")
    args = parser.parse_args()
    global OUT
    OUT = args.out
    device = resolve_device(args.device)
    settings = SHORT if args.short or device.type == "cpu" else FULL
    document: dict = {"benchmark": "gpu", "device": str(device), "torch": torch.__version__,
                      "settings": "short" if settings is SHORT else "full",
                      "host": platform.node(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        document["gpu"] = torch.cuda.get_device_name(device)
    for model in settings["models"]:
        section(f"split_{model}", document, split_checks, model, device)
        section(f"head_exact_{model}", document, head_checks, model, device)
        section(f"head_speed_{model}", document, head_speed, model, device,
                settings["head_rounds"])
    section("fit_step", document, step_agreement, device, settings)
    section("fit", document, protocol_fit, device, settings)
    section("extract", document, extract_ratio, device, settings)
    trunk_rate = document["extract"].get("trunk_only_images_per_s")
    section("writer", document, writer_threads, device, settings, trunk_rate)
    errors = [name for name, value in document.items()
              if isinstance(value, dict) and "error" in value]
    document["errors"] = errors
    document["exactness_failures"] = failures = exactness_failures(document, device)
    document["total_s"] = round(time.perf_counter() - STARTED, 1)
    save(document)
    print(json.dumps(document, indent=2))
    sys.exit(1 if errors or failures else 0)


# Relative max errors allowed. On CUDA, cuDNN convolutions may use TF32 (torch's default), so a
# ResNet trunk differs from the CPU's by ~1e-3; everything else is float32 arithmetic.
TOLERANCES = {"device_vs_cpu": (1e-5, 1e-2), "split_vs_encode_image": (1e-5, 1e-4),
              "bf16_pooled_vs_fp32": (1e-1, 1e-1), "fp16_pooled_vs_fp32": (1e-2, 1e-2),
              "output": (1e-4, 1e-3), "input_grad": (1e-4, 1e-3), "max_param_grad": (1e-3, 1e-2)}
# "output" also bounds fit_step: the graphed step's outputs vs the eager step's (CUDA only).


def exactness_failures(document: dict, device: torch.device) -> list[str]:
    """Every exactness figure over its tolerance (CPU, CUDA)."""
    failures = []
    for name, value in document.items():
        if not (name.startswith(("split_", "head_exact_", "fit_step"))
                and isinstance(value, dict)):
            continue
        for metric, figure in value.items():
            if metric in TOLERANCES:
                limit = TOLERANCES[metric][device.type == "cuda"]
                if not figure <= limit:
                    failures.append(f"{name}.{metric} = {figure:.3g} > {limit:g}")
    return failures


if __name__ == "__main__":
    main()
