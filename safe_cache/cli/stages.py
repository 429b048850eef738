"""The two stages and the demo: `extract`, `demo`, `fit`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import rich_click as click
from rich.table import Table

from ..extract.config import ExtractConfig
from ..fit.config import FitConfig
from ..fit.methods import expand_methods
from .app import (
    STORAGE_OPTIONS,
    STORE_ROOT,
    THREADS,
    cluster_options,
    console,
    default_of,
    default_stores,
    err_console,
    examples,
    execution_of,
    float_list,
    int_list,
    listed,
    main,
    print_json,
    recipe_defaults,
    store_filters,
)


def _fit_choice(name: str, choices: list[str], text: str) -> Callable[[Any], Any]:
    """A fit option of fixed choices, its default FitConfig's."""
    return click.option(f"--{name}", type=click.Choice(choices),
                        default=default_of(FitConfig, name), show_default=True, help=text)


def _count(value: str, option: str) -> int:
    """A number (its range is ExtractConfig's to check, in the library's one-line form)."""
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{option} takes a number or 'auto', not '{value}'.") from None


@main.command(epilog=examples(
    "safe-cache extract --dataset food101 --root ~/data",
    "safe-cache extract --dataset my_spec.json --model ViT-B-16 --pretrained openai",
    "safe-cache extract --dataset dtd --pretrained ~/weights/RN50.pt --quick-gelu"))
@click.option("--dataset", required=True, help="Dataset spec name (see `datasets`) or spec file.")
@click.option("--root", default=None, type=click.Path(file_okay=False),
              show_default="$SAFE_CACHE_DATA, else ./data",
              help="Data root, holding one folder per dataset.")
@click.option("--model", default=default_of(ExtractConfig, "model"), show_default=True,
              envvar="SAFE_CACHE_MODEL", show_envvar=True, help="open_clip model or config JSON.")
@click.option("--pretrained", default=default_of(ExtractConfig, "pretrained"), show_default=True,
              envvar="SAFE_CACHE_PRETRAINED",
              show_envvar=True,
              help="open_clip tag, checkpoint file, or 'none' for random weights.")
@click.option("--store", default=None,
              show_default="under --store-root: <dataset>/<model>-<pretrained>.zarr",
              help="Store URL.")
@STORE_ROOT
@click.option("--shots", default=listed(ExtractConfig, "shots"), show_default=True,
              callback=int_list, help="Shot counts whose few-shot train rows are extracted.")
@click.option("--seeds", default=listed(ExtractConfig, "seeds"), show_default=True,
              callback=int_list, help="Seeds of the CoOp few-shot draws.")
@click.option("--views", default=default_of(ExtractConfig, "views"), show_default=True,
              help="Augmented views per train image.")
@click.option("--center-flip/--no-center-flip", default=default_of(ExtractConfig, "center_flip"),
              show_default=True,
              help="Also store the mirrored center view of train images (the safe fit recipe's"
              " second sample); added to an existing store that lacks it.")
@click.option("--full-val", is_flag=True,
              help="Store the whole val split, not only the few-shot val rows (what fit"
              " --protocol reference searches on).")
@click.option("--prompts", default=default_of(ExtractConfig, "prompts"), show_default=True,
              help="hand, classname, vanilla, pool (Cross-Modal's 180 templates; also what"
              " mined needs), mined, or a CuPL JSON file.")
@click.option("--device", default=default_of(ExtractConfig, "device"), show_default=True,
              help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps.")
@click.option("--batch-size", default=default_of(ExtractConfig, "batch_size"), show_default=True,
              help="Images per trunk batch.")
@click.option("--workers", default=default_of(ExtractConfig, "workers"), show_default=True,
              callback=lambda c, p, v: v
              if v == "auto" else _count(v, "--workers"),
              help="Image decoding processes; auto: cores - 1.")
@click.option("--writer-threads", default=default_of(ExtractConfig, "writer_threads"),
              show_default=True, type=click.IntRange(1),
              help="Threads compressing and writing units (benchmarks/writer.py: how many keep"
              " up with the trunk).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]),
              default=default_of(ExtractConfig, "precision"), show_default=True,
              help="Trunk autocast on CUDA; stored maps are float16 anyway.")
@click.option("--decode", type=click.Choice(["workers", "device"]),
              default=default_of(ExtractConfig, "decode"), show_default=True,
              help="Where JPEGs are decoded and cropped: PIL in the --workers,"
              " or torchvision on the --device (nvJPEG on CUDA; a store keeps one way).")
@click.option("--cut", default=default_of(ExtractConfig, "cut"), show_default=True,
              help="pool, layer4 (ResNet), lastN.")
@click.option("--quick-gelu/--no-quick-gelu", default=None, show_default="from the weights",
              help="Force QuickGELU on or off (OpenAI's weights need it; a tag says so itself, a"
              " local checkpoint file does not). Recorded in the store's card.")
@click.option("--cache-dir", default=None, metavar="DIR",
              show_default="open_clip's: ~/.cache/clip or the Hugging Face cache",
              help="Where open_clip caches downloaded weights (a shared folder that holds"
              " them).")
@click.option("--skip-bad", is_flag=True,
              help="Record unreadable images in the store's manifest and go on.")
@click.option("--max-pixels", default=None, type=int, show_default="PIL's limit, 178,956,970",
              help="Images larger than this are unreadable (decompression bombs).")
@click.option("--make-split", is_flag=True, help="Generate a seeded split if none is published.")
@click.option("--takeover", is_flag=True, help="Take over a stale writer lease.")
@cluster_options
@THREADS
@click.option("--task-images", "task_images",
              default=default_of(ExtractConfig, "task_images"), show_default=True,
              help="Images per distributed task, rounded up to whole write units.")
@STORAGE_OPTIONS
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def extract(as_json: bool, storage_options: dict | None, pretrained: str, **options) -> None:
    """Run the frozen trunk once per image and write dense maps to a store (resumable)."""
    from ..extract.job import extract as run_extract
    from ..runtime.progress import RichProgress

    execution = execution_of(options)
    config = ExtractConfig(pretrained=None if pretrained.lower() == "none" else pretrained,
                           storage_options=storage_options, **options)
    with RichProgress() as progress:
        report = run_extract(config, progress, execution)
    if as_json:
        print_json(report.__dict__)
        return
    console.print(f"extracted into {report.store} in {report.seconds:.1f} s", soft_wrap=True,
                  highlight=False)
    table = Table()
    for column in ("split", "extracted now", "readable rows"):
        table.add_column(column, justify="right")
    for split, rows in report.rows.items():
        table.add_row(split, str(report.extracted.get(split, 0)), str(rows))
    console.print(table)
    for skipped in report.skipped:
        err_console.print(f"[yellow]skipped[/] {skipped['split']}: {skipped['error']}")


@main.command(epilog=examples(
    "safe-cache demo",
    "safe-cache demo --stores /tmp/demo-stores --iters 100"))
@click.option("--stores", "store_root", default="stores", show_default=True,
              help="Store root (the demo data goes to <stores>/demo-data).")
@click.option("--model", default="safe-cache-tiny-vit", show_default=True)
@click.option("--pretrained", default="none", show_default=True,
              help="'none' (random weights, offline) or a tag such as openai (needs network).")
@click.option("--workers", default=1, show_default=True)
@click.option("--iters", default=300, show_default=True, help="Training iterations per run.")
@THREADS
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def demo(store_root: str, model: str, pretrained: str, workers: int, iters: int,
         as_json: bool) -> None:
    """Generate a small shapes dataset, extract it into a store, check it, and fit SAFE."""
    from ..demo import run_demo
    from ..runtime.progress import RichProgress

    with RichProgress() as progress:
        result = run_demo(store_root, model, None if pretrained.lower() == "none" else pretrained,
                          progress, workers, iters)
    if as_json:
        print_json({**result, "results": [r.to_json() for r in result["results"]]})
    else:
        done = "extracted" if sum(result["extracted"].values()) else \
            "nothing new to extract; the store was checked"
        console.print(f"demo: {done} in {result['seconds']:.1f} s", highlight=False)
        table = Table()
        for column in ("split", "rows"):
            table.add_column(column, justify="right")
        for split, rows in result["rows"].items():
            table.add_row(split, str(rows))
        console.print(table)
        console.print(f"store: {result['store']}", soft_wrap=True, highlight=False)
        console.print(f"data: {result['data']} (spec {result['spec']})", soft_wrap=True,
                      highlight=False)
        if result["results"]:
            from ..analysis.tables import runs_table

            console.print(runs_table(result["results"]))
            console.print(f"results: {result['data']}/results/ (safe-cache report"
                          f" {result['data']}/results); plots: {result['data']}/plots/",
                          soft_wrap=True, highlight=False)
        console.print(f"next: [bold]safe-cache info {result['store']}[/]", soft_wrap=True,
                      highlight=False)
    if result["problems"]:
        for problem in result["problems"]:
            err_console.print(f"[red]problem[/]: {problem}")
        sys.exit(1)

@main.command(epilog=examples(
    "safe-cache fit --shots 1,2,4,8,16",
    "safe-cache fit --store stores/food101/RN50-openai.zarr --seeds 1",
    "safe-cache fit --dataset dtd --beta 0.9 --methods none"))
@click.option("--store", "stores", multiple=True,
              show_default="every store under the store root matching --dataset / --model / "
                           "--pretrained",
              help="Store URL (repeat for several stores).")
@store_filters
@click.option("--shots", default=listed(FitConfig, "shots"), show_default=True,
              callback=int_list, help="Shot counts: one run per shots x seed.")
@click.option("--seeds", default=listed(FitConfig, "seeds"), show_default=True,
              callback=int_list, help="Seeds of the few-shot draws (the store's).")
@click.option("--lr", "lrs", default=listed(FitConfig, "lrs"), show_default=True,
              callback=float_list, help="Learning rates of the grid.")
@click.option("--wd", "wds", default=listed(FitConfig, "wds"), show_default=True,
              callback=float_list, help="Weight decays of the grid.")
@click.option("--iters", default=default_of(FitConfig, "iters"), show_default=True,
              help="Training iterations.")
@click.option("--batch-size", default=default_of(FitConfig, "batch_size"), show_default=True,
              help="Images per training batch.")
@click.option("--eval-every", default=default_of(FitConfig, "eval_every"), show_default=True,
              help="Iterations between validations (early stopping).")
@click.option("--beta", default=default_of(FitConfig, "beta"), show_default=True,
              help="The blend reported as SAFE.")
@click.option("--betas", default=listed(FitConfig, "betas"), show_default=True,
              callback=float_list, help="The beta curve (val and test).")
@_fit_choice("blend", ["blend", "each"],
             "blend then normalise (the paper), or normalise each branch first.")
@click.option("--prompts", default=default_of(FitConfig, "prompts"), show_default=True,
              help="Stored prompt set; mined: the 21 of the stored pool's 180 templates with the"
              " best zero-shot accuracy on the run's val set (Template Mining).")
@_fit_choice("classifier", ["text", "linear"],
             "linear: fine-tune the prompt set's classifier on the few-shot images first"
             " (Cross-Modal's linear probe from the text, chosen on val); SAFE and every method"
             " then use it (Linear Fine-tuning).")
@click.option("--methods", default=listed(FitConfig, "methods"),
              show_default=True, callback=lambda c, p, v: expand_methods(v.split(",")),
              help="Methods besides zero-shot and SAFE, which always run: 'workbench' adds"
              " gda,lp_pp,clap,prolip,cross_modal_lp,clip_adapter, 'all' every method, 'none'"
              " none.")
@click.option("--eval-ood", default="", callback=lambda c, p, v: tuple(
                  n for n in v.split(",") if n),
              help="After training on ImageNet, test on these variants' stores (names such as "
              "imagenet_v2,imagenet_sketch,imagenet_a,imagenet_r, or store URLs).")
@click.option("--recipe", "--recipes", "recipes", default=default_of(FitConfig, "recipe").name,
              show_default=True,
              help="Training recipe preset(s), comma-separated, each run on the same store:"
              " safe (the paper's stated values, Cross-Modal Fine-tuning's for the rest),"
              " views (safe-cache 0.1). The options below change the presets.")
@click.option("--logit-scale", default=None, metavar="FLOAT|backbone",
              show_default=recipe_defaults("logit_scale"),
              help="The loss's logit scale (safe: exp(4); backbone: CLIP's own, 100).")
@click.option("--warmup", default=None, type=int, show_default=recipe_defaults("warmup"),
              help="Linear warmup iterations from 1e-5.")
@click.option("--train-views", default=None, type=click.Choice(["center+flip", "stored", "all"]),
              show_default=recipe_defaults("train_views"), help="Training samples per image.")
@click.option("--sampling", default=None, type=click.Choice(["epoch", "replace"]),
              show_default=recipe_defaults("sampling"),
              help="Batches from shuffled epochs or drawn with replacement.")
@click.option("--eval-first/--no-eval-first", default=None,
              show_default=recipe_defaults("eval_first"),
              help="Evaluate at iterations 0, 100, ... or after 100, 200, ... and the last.")
@click.option("--text-average", default=None, type=click.Choice(["normalised", "raw"]),
              show_default=recipe_defaults("text_average"),
              help="Average the templates' embeddings normalised (Tip-Adapter) or raw"
              " (Cross-Modal).")
@_fit_choice("protocol", ["ours", "reference"],
             "reference: Tip-Adapter(-F) and GDA as their authors' code runs them (keys"
             " averaged raw, Tip-F's epoch on test, searches on the whole val split, ImageNet's"
             " on test); results labelled, never averaged with ours.")
@click.option("--tip-epochs", default=None, type=click.IntRange(1),
              help="Tip-Adapter-F and SAFE-A epochs (default: the dataset spec's, 20 for most).")
@click.option("--select-on", default=default_of(FitConfig, "select_on"), show_default=True,
              type=click.Choice(["val", "test"]),
              help="Where Tip-Adapter-F and SAFE-A choose their epoch; 'test' reproduces the"
              " reference code (results labelled test-selected).")
@click.option("--device", default=default_of(FitConfig, "device"), show_default=True,
              help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps.")
@click.option("--test-chunk", default=default_of(FitConfig, "test_chunk"), show_default=True,
              type=click.IntRange(1),
              help="Test maps per evaluation step (lower it when the device runs out of"
              " memory).")
@click.option("--cuda-graph/--no-cuda-graph", default=default_of(FitConfig, "cuda_graph"),
              show_default=True,
              help="On CUDA, capture the training step once and replay it: one launch per"
              " step instead of hundreds of kernels (results equal the eager step's within float"
              " rounding).")
@click.option("--out", default=default_of(FitConfig, "out"), show_default=True,
              help="Results folder (<out>/<dataset>/<backbone>/...).")
@click.option("--force", is_flag=True,
              help="Recompute results that exist (a result of other options is never reused:"
              " it is written beside the old one).")
@click.option("--partial", is_flag=True,
              help="Evaluate a test split that is not fully extracted on the rows it has"
              " (results and report say partial).")
@click.option("--cache", default=None, metavar="DIR",
              help="Keep the feature chunks read from a remote store in this local folder.")
@cluster_options
@THREADS
@STORAGE_OPTIONS
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def fit(as_json: bool, storage_options: dict | None, stores: tuple[str, ...], dataset: str | None,
        model: str | None, pretrained: str | None, store_root: str | None, recipes: str,
        logit_scale: str | None, warmup: int | None, train_views: str | None,
        sampling: str | None, eval_first: bool | None, text_average: str | None,
        **options) -> None:
    """Train SAFE from a store for every shots x seed: the lr x wd grid at once, early stopping
    on val, the blend with beta; one result JSON (+ head) per run. Without --store, every store
    under the store root that matches --dataset / --model / --pretrained, in one job."""
    from ..fit.recipe import make_recipe
    from ..fit.runs import fit_stores
    from ..runtime.progress import RichProgress

    if logit_scale is not None and logit_scale != "backbone":
        try:
            logit_scale = float(logit_scale)
        except ValueError as exc:
            raise click.BadParameter(f"{logit_scale!r} is neither a number nor 'backbone'.",
                                     param_hint="--logit-scale") from exc
    chosen = [make_recipe(name.strip(), logit_scale=logit_scale, warmup=warmup,
                          train_views=train_views, sampling=sampling, eval_first=eval_first,
                          text_average=text_average)
              for name in recipes.split(",") if name.strip()]
    if not chosen:
        raise click.BadParameter("give at least one recipe.", param_hint="--recipe")
    if not stores:
        stores = tuple(default_stores(dataset, model, pretrained, store_root, storage_options))
        err_console.print(f"fitting {len(stores)} store{'s' * (len(stores) > 1)}: "
                          + ", ".join(stores), highlight=False)
    execution = execution_of(options)
    configs = [FitConfig(store=store, storage_options=storage_options, recipe=recipe,
                         **options) for store in stores for recipe in chosen]
    with RichProgress(unit="it") as progress:
        results = fit_stores(configs, progress, execution)
    if as_json:
        print_json([result.to_json() for result in results])
        return
    from ..analysis.tables import runs_table

    console.print(runs_table(results))
