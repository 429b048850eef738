"""The `safe-cache` command line: a thin click layer over library functions.

Each command parses options, calls one library function, and renders its result (a rich table, or
JSON with `--json`). A `SafeCacheError` is printed as a one-paragraph message, not a traceback.
"""

from __future__ import annotations

import errno
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import rich_click as click
from rich.console import Console
from rich.table import Table

from ._version import __version__
from .errors import SafeCacheError, SafeCacheWarning

console = Console()
err_console = Console(stderr=True)

click.rich_click.TEXT_MARKUP = "rich"
click.rich_click.SHOW_ARGUMENTS = True


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """SafeCacheWarnings as one readable line on stderr; others as Python prints them."""
    if issubclass(category, SafeCacheWarning):
        err_console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


_IO_FIXES = {
    errno.ENOSPC: "free some space (or write elsewhere) and run the command again: it resumes",
    errno.EDQUOT: "free some of your quota and run the command again: it resumes",
    errno.EACCES: "check the permissions, or write elsewhere",
    errno.EPERM: "check the permissions, or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.ENOTDIR: "a path that should be a folder is a file: choose another path",
    errno.EISDIR: "a path that should be a file is a folder: choose another path",
    errno.EEXIST: "the path exists and is not what is needed: choose another path",
}


def _io_message(exc: OSError) -> str | None:
    """One line for an I/O failure a user can fix (disk full, permissions, a file where a folder
    belongs), naming the file; None for anything else."""
    fix = _IO_FIXES.get(exc.errno)
    if fix is None:
        return None
    where = exc.filename if exc.filename is not None else "a file"
    return f"{exc.strerror or exc}: {where}. {fix}."


class SafeCacheGroup(click.RichGroup):
    """Turns SafeCacheError (and I/O failures a user can fix) into a clear message and exit
    status 2, warnings into one line."""

    def invoke(self, ctx: click.Context) -> Any:
        previous, warnings.showwarning = warnings.showwarning, _show_warning
        try:
            return super().invoke(ctx)
        except SafeCacheError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(2)
        except OSError as exc:
            message = _io_message(exc)
            if message is None:
                raise
            err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            sys.exit(2)
        finally:
            warnings.showwarning = previous


@click.group(cls=SafeCacheGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.command_panel("Backbones", commands=["backbone", "models"])
@click.command_panel("Start here", commands=["demo"])
@click.command_panel("Stage 1", commands=["extract"])
@click.command_panel("Stage 2", commands=["fit", "report"])
@click.command_panel("Use a model", commands=["export", "predict"])
@click.command_panel("Look inside", commands=["attention", "correspond"])
@click.command_panel("Datasets", commands=["datasets"])
@click.command_panel("Stores", commands=["info", "ls", "verify", "copy"])
@click.version_option(__version__, prog_name="safe-cache")
def main() -> None:
    """[bold]safe-cache[/]: few-shot CLIP adaptation with SAFE from cached dense features.

    Stage 1 runs the frozen trunk of a CLIP visual encoder once per image and stores the dense
    pre-pooling maps; stage 2 trains the attention-pooling head (SAFE) and the adapters (SAFE-A)
    straight from the store.
    """


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@main.command()
@click.argument("model")
@click.option("--pretrained", default=None,
              help="open_clip tag (e.g. openai) or a checkpoint file; omit for random weights.")
@click.option("--cut", default="pool", show_default=True,
              help="Where the trunk ends: pool, layer4 (ResNet), lastN (ViT).")
@click.option("--quick-gelu/--no-quick-gelu", default=None,
              help="Force QuickGELU on or off (default: inferred from the tag or file).")
@click.option("--cache-dir", default=None, help="Where open_clip caches downloaded weights.")
@click.option("--init-seed", default=0, show_default=True, help="Seed of a random initialisation.")
@click.option("--json", "as_json", is_flag=True, help="Print the card as JSON.")
def backbone(
    model: str, pretrained: str | None, cut: str, quick_gelu: bool | None,
    cache_dir: str | None, init_seed: int, as_json: bool,
) -> None:
    """Load MODEL (open_clip name or config JSON) and show its backbone card and fingerprint."""
    from .model.backbone import load_backbone

    loaded = load_backbone(
        model, pretrained, cut=cut, quick_gelu=quick_gelu, cache_dir=cache_dir,
        init_seed=init_seed,
    )
    card = {**loaded.card, "fingerprint": loaded.fingerprint}
    if as_json:
        _print_json(card)
        return
    table = Table(title=f"backbone {card['model']}", show_header=False)
    table.add_column("field", style="bold cyan")
    table.add_column("value")
    for key, value in card.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (list, dict)) else str(value))
    console.print(table)


@main.command()
@click.option("--all", "show_all", is_flag=True, help="Also list architectures SAFE cannot split.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(show_all: bool, as_json: bool) -> None:
    """List open_clip architectures, their family and pretrained tags."""
    from .model.backbone import list_architectures

    rows = [row for row in list_architectures() if show_all or row["family"] != "unsupported"]
    if as_json:
        _print_json(rows)
        return
    table = Table(title="open_clip architectures")
    for column in ("model", "family", "image size", "pretrained tags"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["model"], row["family"], str(row["image_size"]), ", ".join(row["tags"]))
    console.print(table)


@main.command()
@click.option("--root", default=None, type=click.Path(file_okay=False),
              help="Data root holding one folder per dataset: mark which are present [default:"
              " $SAFE_CACHE_DATA, else ./data where it exists].")
@click.option("--make-split", "make_split", metavar="DATASET", default=None,
              help="Write a seeded split (CoOp proportions) for DATASET under the data root when"
              " its published split file is missing. Its numbers are not comparable with"
              " papers'.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def datasets(root: str | None, make_split: str | None, as_json: bool) -> None:
    """List the known datasets: folder, classes, split sizes, and presence under the data
    root."""
    from .data.datasets import dataset_status, list_specs, open_dataset, resolve_data_root

    data_root = resolve_data_root(root)
    root = str(data_root.path) if data_root.source != "default" or data_root.path.is_dir() \
        else None
    if make_split:
        dataset = open_dataset(make_split, root, make_split=True)
        where = dataset.split_source
        err_console.print(f"{dataset.spec.name}: split {where} "
                          f"({', '.join(f'{k} {len(v)}' for k, v in dataset.splits.items())})")

    rows = [{
        "name": spec.name, "kind": spec.kind, "folder": spec.folder,
        "classes": spec.num_classes, "split_sizes": spec.split_sizes,
        "status": dataset_status(spec, root),
    } for spec in list_specs()]
    if as_json:
        _print_json(rows)
        return
    table = Table(title="datasets" + (f" under {root}" if root else ""))
    table.add_column("dataset", no_wrap=True)
    table.add_column("folder", overflow="fold")
    for column in ("classes", "train", "val", "test"):
        table.add_column(column, justify="right")
    table.add_column("status")
    for row in rows:
        sizes = row["split_sizes"]
        status = row["status"]
        style = {"present": "green", "missing": "red"}.get(status, "yellow")
        table.add_row(row["name"], row["folder"] + "/", str(row["classes"]),
                      *(f"{sizes[s]:,}" if s in sizes else "-" for s in ("train", "val", "test")),
                      f"[{style}]{status}[/]" if root else status)
    console.print(table)


def _json_object(ctx, param, raw: str | None) -> dict | None:
    """A JSON-object option (fsspec storage options) parsed, or one line naming the option."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc.msg} at character {exc.pos}): {raw!r}."
                                 f" Quote it for the shell, e.g. '{{\"anon\": true}}'.") from exc
    if not isinstance(value, dict):
        raise click.BadParameter(f"expected a JSON object ({{...}}), got {raw!r}.")
    return value


STORAGE_OPTIONS = click.option(
    "--storage-options", default=None, metavar="JSON", callback=_json_object,
    help='fsspec options for remote stores, e.g. \'{"client_kwargs": {"endpoint_url": ...}}\'.')


def _cluster_options(command):
    """--scheduler / --local-workers: where extract and fit send their work (dask)."""
    command = click.option("--local-workers", default=0, show_default=True, metavar="N",
                           help="Run on a LocalCluster of N worker processes.")(command)
    return click.option("--scheduler", default=None, metavar="ADDRESS",
                        help="Run on a running dask scheduler's workers, e.g."
                        " tcp://10.0.0.5:8786 (see README 'Scaling out').")(command)


def _int_list(ctx, param, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated integers, got '{value}'") from exc


STORE_ROOT = click.option(
    "--store-root", default=None, metavar="DIR",
    help="Where default stores live [default: $SAFE_CACHE_STORES, else ./stores].")


def _store_filters(command):
    """--dataset / --model / --pretrained / --store-root: which stores a command uses when no
    store is named (those under the store root that match every filter given)."""
    for decorator in reversed((
        click.option("--dataset", default=None,
                     help="Without --store: the stores of this dataset (name or spec file)."),
        click.option("--model", default=None, envvar="SAFE_CACHE_MODEL", show_envvar=True,
                     help="Without --store: the stores of this model."),
        click.option("--pretrained", default=None, envvar="SAFE_CACHE_PRETRAINED",
                     show_envvar=True,
                     help="Without --store: the stores of these weights (tag, file, 'none')."),
        STORE_ROOT,
    )):
        command = decorator(command)
    return command


def _default_stores(dataset: str | None = None, model: str | None = None,
                    pretrained: str | None = None, store_root: str | None = None,
                    storage_options: dict | None = None) -> list[str]:
    """The stores under the store root matching the filters given (an error lists what is
    there when none does)."""
    from .data.datasets import load_spec
    from .store.catalog import select_stores

    if dataset and (dataset.endswith(".json") or Path(dataset).is_file()):
        dataset = load_spec(dataset).name
    return select_stores(store_root, dataset=dataset, model=model, pretrained=pretrained,
                         storage_options=storage_options)


def _one_store(**filters: Any) -> str:
    """The one store the filters select (several is an error that lists them)."""
    urls = _default_stores(**filters)
    if len(urls) > 1:
        raise click.UsageError(f"{len(urls)} stores match: {', '.join(urls)}. Name one (--store"
                               f" or STORE), or narrow with --dataset / --model / --pretrained.")
    return urls[0]


@main.command()
@click.option("--dataset", required=True, help="Dataset spec name (see `datasets`) or spec file.")
@click.option("--root", default=None, type=click.Path(file_okay=False),
              help="Data root, holding one folder per dataset [default: $SAFE_CACHE_DATA, else"
              " ./data].")
@click.option("--model", default="RN50", show_default=True, envvar="SAFE_CACHE_MODEL",
              show_envvar=True, help="open_clip model or config JSON.")
@click.option("--pretrained", default="openai", show_default=True, envvar="SAFE_CACHE_PRETRAINED",
              show_envvar=True,
              help="open_clip tag, checkpoint file, or 'none' for random weights.")
@click.option("--store", default=None, help="Store URL [default: <store root>/<dataset>/<model>-"
              "<pretrained>.zarr].")
@STORE_ROOT
@click.option("--shots", default="1,2,4,8,16", show_default=True, callback=_int_list)
@click.option("--seeds", default="1,2,3", show_default=True, callback=_int_list)
@click.option("--views", default=10, show_default=True, help="Augmented views per train image.")
@click.option("--center-flip/--no-center-flip", default=True, show_default=True,
              help="Also store the mirrored center view of train images (the safe fit recipe's"
              " second sample); added to an existing store that lacks it.")
@click.option("--prompts", default="hand", show_default=True,
              help="hand, classname, vanilla, or a CuPL JSON file.")
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--workers", default=2, show_default=True, help="Image decoding processes.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32",
              show_default=True, help="Trunk autocast on CUDA; stored maps are float16 anyway.")
@click.option("--cut", default="pool", show_default=True, help="pool, layer4 (ResNet), lastN.")
@click.option("--skip-bad", is_flag=True,
              help="Record unreadable images in the store's manifest and go on.")
@click.option("--max-pixels", default=None, type=int,
              help="Images larger than this are unreadable (decompression bombs) [PIL's limit,"
              " 178,956,970].")
@click.option("--make-split", is_flag=True, help="Generate a seeded split if none is published.")
@click.option("--takeover", is_flag=True, help="Take over a stale writer lease.")
@_cluster_options
@click.option("--task-images", "--shard-images", "task_images", default=256, show_default=True,
              help="Images per distributed task, rounded up to whole write units"
              " (--shard-images: its former name).")
@STORAGE_OPTIONS
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def extract(as_json: bool, storage_options: dict | None, pretrained: str, **options) -> None:
    """Run the frozen trunk once per image and write dense maps to a store (resumable)."""
    from .extract.config import ExtractConfig
    from .extract.job import extract as run_extract
    from .runtime.progress import RichProgress

    config = ExtractConfig(pretrained=None if pretrained.lower() == "none" else pretrained,
                           storage_options=storage_options, **options)
    with RichProgress() as progress:
        report = run_extract(config, progress)
    if as_json:
        _print_json(report.__dict__)
        return
    table = Table(title=f"extracted into {report.store} in {report.seconds:.1f} s")
    for column in ("split", "extracted now", "readable rows"):
        table.add_column(column, justify="right")
    for split, rows in report.rows.items():
        table.add_row(split, str(report.extracted.get(split, 0)), str(rows))
    console.print(table)
    for skipped in report.skipped:
        err_console.print(f"[yellow]skipped[/] {skipped['split']}: {skipped['error']}")


@main.command()
@click.option("--stores", "store_root", default="stores", show_default=True,
              help="Store root (the demo data goes to <stores>/demo-data).")
@click.option("--model", default="safe-cache-tiny-vit", show_default=True)
@click.option("--pretrained", default="none", show_default=True,
              help="'none' (random weights, offline) or a tag such as openai (needs network).")
@click.option("--workers", default=1, show_default=True)
@click.option("--iters", default=300, show_default=True, help="Training iterations per run.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def demo(store_root: str, model: str, pretrained: str, workers: int, iters: int,
         as_json: bool) -> None:
    """Generate a small shapes dataset, extract it into a store, check it, and fit SAFE."""
    from .demo import run_demo
    from .runtime.progress import RichProgress

    with RichProgress() as progress:
        result = run_demo(store_root, model, None if pretrained.lower() == "none" else pretrained,
                          progress, workers, iters)
    if as_json:
        _print_json({**result, "results": [r.to_json() for r in result["results"]]})
    else:
        table = Table(title=f"demo: extracted in {result['seconds']:.1f} s")
        for column in ("split", "rows"):
            table.add_column(column, justify="right")
        for split, rows in result["rows"].items():
            table.add_row(split, str(rows))
        console.print(table)
        console.print(f"store: {result['store']}")
        console.print(f"data: {result['data']} (spec {result['spec']})")
        if result["results"]:
            from .analysis.tables import runs_table

            console.print(runs_table(result["results"]))
            console.print(f"results: {result['data']}/results/ (safe-cache report"
                          f" {result['data']}/results); plots: {result['data']}/plots/")
        console.print(f"next: [bold]safe-cache info {result['store']}[/]")
    if result["problems"]:
        for problem in result["problems"]:
            err_console.print(f"[red]problem[/]: {problem}")
        sys.exit(1)


def _float_list(ctx, param, value: str) -> tuple[float, ...]:
    """'1e-4,1e-5' or a range 'start:stop:step' (stop included, step > 0, start <= stop)."""
    try:
        if ":" in value:
            start, stop, step = (float(v) for v in value.split(":"))
            if not step > 0 or start > stop:
                raise click.BadParameter(f"a range start:stop:step needs step > 0 and start <="
                                         f" stop, got '{value}'")
            count = round((stop - start) / step) + 1
            return tuple(round(start + i * step, 10) for i in range(count))
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise click.BadParameter(f"expected numbers like 1e-4,1e-5 or 0:1:0.1, got '{value}'") \
            from exc


@main.command()
@click.option("--store", "stores", multiple=True,
              help="Store URL (repeat for several stores) [default: every store under the store"
              " root matching --dataset / --model / --pretrained].")
@_store_filters
@click.option("--shots", default="1,2,4,8,16", show_default=True, callback=_int_list)
@click.option("--seeds", default="1,2,3", show_default=True, callback=_int_list)
@click.option("--lr", "lrs", default="1e-4,1e-5,1e-6,1e-7", show_default=True,
              callback=_float_list)
@click.option("--wd", "wds", default="0,1e-3,1e-5", show_default=True, callback=_float_list)
@click.option("--iters", default=12_800, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--eval-every", default=100, show_default=True)
@click.option("--beta", default=0.5, show_default=True, help="The blend reported as SAFE.")
@click.option("--betas", default="0:1:0.1", show_default=True, callback=_float_list,
              help="The beta curve (val and test).")
@click.option("--blend", type=click.Choice(["blend", "each"]), default="blend", show_default=True,
              help="blend then normalise (the paper), or normalise each branch first.")
@click.option("--prompts", default="hand", show_default=True, help="Stored prompt set.")
@click.option("--methods", default="tip_adapter,tip_adapter_f,safe_a,linear_probe",
              show_default=True, callback=lambda c, p, v: tuple(
                  m for m in v.split(",") if m and m != "none"),
              help="Methods besides zero-shot and SAFE ('none' for none).")
@click.option("--eval-ood", default="", callback=lambda c, p, v: tuple(
                  n for n in v.split(",") if n),
              help="After training on ImageNet, test on these variants' stores (names such as "
              "imagenet_v2,imagenet_sketch,imagenet_a,imagenet_r, or store URLs).")
@click.option("--recipe", "--recipes", "recipes", default="safe", show_default=True,
              help="Training recipe preset(s), comma-separated, each run on the same store:"
              " safe (the paper's stated values, Cross-Modal Fine-tuning's for the rest),"
              " views (safe-cache 0.1). The options below change the presets.")
@click.option("--logit-scale", default=None, metavar="FLOAT|backbone",
              help="The loss's logit scale [safe: exp(4) = 54.6; views: backbone (CLIP's 100)].")
@click.option("--warmup", default=None, type=int,
              help="Linear warmup iterations from 1e-5 [safe: 50; views: 0].")
@click.option("--train-views", default=None, type=click.Choice(["center+flip", "stored", "all"]),
              help="Training samples per image [safe: center+flip; views: stored].")
@click.option("--sampling", default=None, type=click.Choice(["epoch", "replace"]),
              help="Batches from shuffled epochs or drawn with replacement [safe: epoch].")
@click.option("--eval-first/--no-eval-first", default=None,
              help="Evaluate at iterations 0, 100, ... (safe) or after 100, 200, ... and the"
              " last (views).")
@click.option("--text-average", default=None, type=click.Choice(["normalised", "raw"]),
              help="Average the templates' embeddings normalised (Tip-Adapter) or raw"
              " (Cross-Modal) [normalised].")
@click.option("--select-on", default="val", show_default=True, type=click.Choice(["val", "test"]),
              help="Where Tip-Adapter-F and SAFE-A choose their epoch; 'test' reproduces the"
              " reference code (results labelled test-selected).")
@click.option("--device", default="auto", show_default=True)
@click.option("--out", default="results", show_default=True)
@click.option("--force", is_flag=True, help="Recompute results that exist.")
@click.option("--cache", default=None, metavar="DIR",
              help="Keep the feature chunks read from a remote store in this local folder.")
@_cluster_options
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
    from .fit.config import FitConfig
    from .fit.recipe import make_recipe
    from .fit.runs import fit_stores
    from .runtime.progress import RichProgress

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
        stores = tuple(_default_stores(dataset, model, pretrained, store_root, storage_options))
        err_console.print(f"fitting {len(stores)} store{'s' * (len(stores) > 1)}: "
                          + ", ".join(stores), highlight=False)
    configs = [FitConfig(store=store, storage_options=storage_options, recipe=recipe,
                         **options) for store in stores for recipe in chosen]
    with RichProgress(unit="it") as progress:
        results = fit_stores(configs, progress)
    if as_json:
        _print_json([result.to_json() for result in results])
        return
    from .analysis.tables import runs_table

    console.print(runs_table(results))


@main.command()
@click.argument("results_dir", default="results", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["table", "md", "csv", "json"]),
              default="table", show_default=True)
@click.option("--plots", "plots_dir", default=None, type=click.Path(file_okay=False),
              help="Write PNG plots (accuracy vs shots, beta curve, lr x wd grid) here.")
def report(results_dir: str, fmt: str, plots_dir: str | None) -> None:
    """Mean and std over seeds per dataset, shots and method, beside the paper's numbers."""
    from .analysis.report import aggregate, load_results, render, write_plots
    from .analysis.tables import ood_table, report_tables

    if not Path(results_dir).is_dir():
        raise click.UsageError(f"no results folder {results_dir}: fit writes one (fit --out,"
                               f" default results/), or name the folder: report DIR.")
    runs = load_results(results_dir)
    if not runs:
        raise click.UsageError(f"no result files (shots<K>_seed<S>.json) under {results_dir}")
    rows = aggregate(runs)
    if fmt != "table":
        click.echo(render(rows, fmt), nl=False)
    else:
        for table in [*report_tables(rows), ood_table(runs)]:
            if table is not None:
                console.print(table)
    if plots_dir:
        written = write_plots(rows, runs, plots_dir)
        err_console.print(f"{len(written)} plots written to {plots_dir}")


@main.command()
@click.argument("result", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model folder.")
@click.option("--method", type=click.Choice(["safe", "safe_a"]), default="safe",
              show_default=True)
@click.option("--merge", is_flag=True, help="Also write a plain open_clip checkpoint with the "
              "fine-tuned pooling (beta = 0: the blend is lost).")
@click.option("--weights", default=None, help="With --merge, for a backbone loaded from a local "
              "file: that file.")
@click.option("--force", is_flag=True, help="Replace an existing model folder.")
@STORAGE_OPTIONS
def export(result: str, out: str, method: str, merge: bool, weights: str | None, force: bool,
           storage_options: dict | None) -> None:
    """Write a self-contained model folder from a fit RESULT (its .json)."""
    from .export import export_model

    folder = export_model(result, out, method=method, merge=merge, weights=weights,
                          storage_options=storage_options, force=force)
    console.print(f"model folder: {folder}")


@main.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("images", nargs=-1, required=True)
@click.option("--top-k", default=5, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--weights", default=None, help="The backbone's weights file, for models whose "
              "backbone was loaded from a local file.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--skip-bad", is_flag=True, help="Go on past unreadable images (listed at the end).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def predict(model_dir: str, images: tuple[str, ...], top_k: int, batch_size: int,
            weights: str | None, device: str, skip_bad: bool, as_json: bool) -> None:
    """Classify IMAGES (files or folders) with an exported model."""
    from .export import load_model
    from .runtime.progress import RichProgress

    model = load_model(model_dir, weights=weights, device=device)
    with RichProgress() as progress:
        predictions = model.predict(list(images), top_k=top_k, batch_size=batch_size,
                                    skip_bad=skip_bad, progress=progress)
    if as_json:
        _print_json([{"path": p.path, "top": [{"class": c, "probability": v} for c, v in p.top]}
                     for p in predictions])
    else:
        table = Table(title=f"{model.card['method']} on {model.card['dataset']}: top {top_k}")
        table.add_column("image", overflow="fold")
        table.add_column("class")
        table.add_column("probability", justify="right")
        for p in predictions:
            for rank, (name, value) in enumerate(p.top):
                table.add_row(p.path if rank == 0 else "", name, f"{value:.3f}")
        console.print(table)
    for skipped in model.skipped:
        err_console.print(f"[yellow]skipped[/] {skipped}")


@main.command()
@click.option("--store", default=None,
              help="Store URL [default: the one store under the store root matching --dataset /"
              " --model / --pretrained].")
@_store_filters
@click.option("--head", "result", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A fit result (.json; its .safetensors head is used).")
@click.option("--images", "rows", default="0,1,2,3", show_default=True, callback=_int_list,
              help="Row ids in the split.")
@click.option("--split", default="test", show_default=True)
@click.option("--image-root", default=None, type=click.Path(file_okay=False),
              help="The dataset's image folder, to draw the maps over the images.")
@click.option("--per-head", is_flag=True, help="One row of maps per attention head.")
@click.option("--out", required=True, type=click.Path(file_okay=False))
def attention(store: str | None, dataset: str | None, model: str | None, pretrained: str | None,
              store_root: str | None, result: str, rows: tuple[int, ...], split: str,
              image_root: str | None, per_head: bool, out: str) -> None:
    """Pooling attention of the original and the fine-tuned head, side by side (PNG)."""
    from .analysis.attention import attention_maps, plot_attention

    store = store or _one_store(dataset=dataset, model=model, pretrained=pretrained,
                                store_root=store_root)
    maps = attention_maps(store, result, list(rows), split)
    written = plot_attention(maps, image_root, out, per_head)
    console.print(f"{len(written)} attention maps written to {out}")


@main.command()
@click.option("--store", default=None, help="Store URL, whose rows --source / --targets name"
              " [default, for row ids: the one store under the store root matching --dataset /"
              " --model / --pretrained].")
@click.option("--dataset", default=None, help="Without --store: the stores of this dataset.")
@STORE_ROOT
@click.option("--source", required=True, help="Row id in the store, or an image file.")
@click.option("--point", required=True, callback=_int_list, help="x,y in the model's input "
              "pixels (after resize and center crop).")
@click.option("--targets", required=True, help="Row ids, or image files, comma-separated.")
@click.option("--split", default="test", show_default=True)
@click.option("--image-root", default=None, type=click.Path(file_okay=False),
              help="The dataset's image folder, to draw over the images (store rows).")
@click.option("--model", default=None, envvar="SAFE_CACHE_MODEL", show_envvar=True,
              help="For image files [default: RN50]; for row ids, the store's model.")
@click.option("--pretrained", default=None, envvar="SAFE_CACHE_PRETRAINED", show_envvar=True,
              help="For image files: tag, file, or 'none' [default: openai]; for row ids, the"
              " store's weights.")
@click.option("--cut", default="pool", show_default=True,
              help="For image files: pool, layer4 (ResNet), lastN (ViT): earlier maps.")
@click.option("--out", required=True, type=click.Path(file_okay=False))
def correspond(store: str | None, dataset: str | None, store_root: str | None, source: str,
               point: tuple[int, ...], targets: str, split: str, image_root: str | None,
               model: str | None, pretrained: str | None, cut: str, out: str) -> None:
    """Semantic correspondence (the paper's Eq. 1): stored dense maps, or image files through
    the trunk live at any cut (PNG)."""
    from .analysis.correspond import correspond as run_correspond
    from .analysis.correspond import correspond_images, plot_correspondence

    if len(point) != 2:
        raise click.BadParameter("--point takes x,y")
    target_list = [t for t in targets.split(",") if t]
    rows = source.isdigit() and all(t.isdigit() for t in target_list)
    if store or rows:
        store = store or _one_store(dataset=dataset, model=model, pretrained=pretrained,
                                    store_root=store_root)
        result = run_correspond(store, int(source), (point[0], point[1]),
                                [int(t) for t in target_list], split)
    else:
        pretrained = "openai" if pretrained is None else pretrained
        result = correspond_images(model or "RN50",
                                   None if pretrained.lower() == "none" else pretrained,
                                   source, (point[0], point[1]), target_list, cut=cut)
        image_root = "/" if Path(source).is_absolute() else "."
    written = plot_correspondence(result, image_root, out)
    for path, xy in zip(result["paths"][1:], result["points"], strict=True):
        console.print(f"{path}: best match at x={xy[0]}, y={xy[1]}")
    console.print(f"{len(written)} images written to {out}")


@main.command()
@click.argument("store", required=False)
@_store_filters
@STORAGE_OPTIONS
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(store: str | None, storage_options: dict | None, as_json: bool, **filters) -> None:
    """Show a store's manifest, sizes and completeness [STORE default: the one store under the
    store root matching --dataset / --model / --pretrained]."""
    from .store import open_store

    store = store or _one_store(**filters, storage_options=storage_options)
    opened = open_store(store, storage_options=storage_options)
    manifest, summary = opened.manifest, opened.summary()
    if as_json:
        _print_json({"manifest": manifest, "splits": summary})
        return
    backbone, dataset = manifest["backbone"], manifest["dataset"]
    head = Table(title=f"store {store}", show_header=False)
    head.add_column("field", style="bold cyan")
    head.add_column("value")
    for key, value in (
        ("dataset", f"{dataset.get('name')} ({dataset.get('num_classes')} classes)"),
        ("backbone", f"{backbone.get('model')} / {backbone.get('pretrained')}"),
        ("fingerprint", manifest["backbone_fingerprint"][:16]),
        ("dense map", f"T={backbone['T']} C={backbone['C']} D={backbone['D']}"),
        ("views", str(manifest["views"].get("count"))),
        ("layout", json.dumps(manifest["layout"])),
        ("schema / tool", f"{manifest['schema_version']} / {manifest['tool_version']}"),
        ("created / updated", f"{manifest['created']} / {manifest['updated']}"),
    ):
        head.add_row(key, value)
    console.print(head)
    table = Table(title="splits")
    for column in ("split", "rows", "readable", "complete units"):
        table.add_column(column, justify="right")
    for split, row in summary.items():
        done = f"{row['complete_units']}/{row['units']}"
        style = "green" if row["complete_units"] == row["units"] else "yellow"
        table.add_row(split, str(row["rows"]), str(row["readable_rows"]), f"[{style}]{done}[/]")
    console.print(table)


@main.command(name="ls")
@click.argument("root", required=False)
@STORAGE_OPTIONS
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls_command(root: str | None, storage_options: dict | None, as_json: bool) -> None:
    """List every store under ROOT (a folder or a bucket prefix), one row each [default: the
    store root, $SAFE_CACHE_STORES or ./stores]."""
    from .store.catalog import find_stores
    from .store.paths import store_root

    root = store_root(root)
    rows = find_stores(root, storage_options=storage_options)
    if as_json:
        _print_json(rows)
        return
    table = Table(title=f"stores under {root}")
    for column in ("store", "dataset", "backbone", "train", "val", "test", "complete"):
        table.add_column(column)
    for row in rows:
        sizes = row["readable_rows"]
        table.add_row(row["url"], row["dataset"], row["backbone"],
                      *(str(sizes.get(s, "-")) for s in ("train", "val", "test")),
                      "yes" if row["complete"] else "[yellow]no[/]")
    console.print(table)


@main.command()
@click.argument("store", required=False)
@_store_filters
@STORAGE_OPTIONS
def verify(store: str | None, storage_options: dict | None, **filters) -> None:
    """Check schema, manifest, shapes, dtypes, completeness, chunks and values; non-zero on
    problems [STORE default: every store under the store root matching the filters]."""
    from .store.verify import verify_store

    stores = [store] if store else _default_stores(**filters, storage_options=storage_options)
    failed = False
    for url in stores:
        problems = verify_store(url, storage_options=storage_options)
        if not problems:
            console.print(f"[green]ok[/]: {url}")
        for problem in problems:
            err_console.print(f"[red]problem[/]: {url}: {problem}" if len(stores) > 1
                              else f"[red]problem[/]: {problem}", highlight=False)
        failed = failed or bool(problems)
    if failed:
        sys.exit(1)


@main.command(name="copy")
@click.argument("source")
@click.argument("destination")
@click.option("--source-options", default=None, metavar="JSON", callback=_json_object,
              help="fsspec options for SOURCE.")
@click.option("--destination-options", default=None, metavar="JSON", callback=_json_object,
              help="fsspec options for DESTINATION.")
@click.option("--no-verify", is_flag=True, help="Skip verifying DESTINATION after the copy.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def copy_command(source: str, destination: str, source_options: dict | None,
                 destination_options: dict | None, no_verify: bool, as_json: bool) -> None:
    """Copy a store to a shared location (or fetch one), then verify the copy. Run it again to
    resume an interrupted copy."""
    from .runtime.progress import RichProgress
    from .store.transfer import copy_store

    with RichProgress(unit="B") as progress:
        report = copy_store(source, destination, source_options=source_options,
                            destination_options=destination_options,
                            verify=not no_verify, progress=progress)
    if as_json:
        _print_json(report.__dict__)
    else:
        console.print(f"copied {report.objects - report.already_there} of {report.objects}"
                      f" objects ({report.bytes / 2**20:.1f} MiB) to {destination} in"
                      f" {report.seconds:.1f} s" + ("" if no_verify else "; verified"))
    for problem in report.problems:
        err_console.print(f"[red]problem[/]: {problem}")
    if report.problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
