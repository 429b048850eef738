"""What fits give: `report`, `export`, `predict`, `attention`, `gradcam`, `shapley` (and
`parts`, its masks), `correspond`."""

from __future__ import annotations

from pathlib import Path

import rich_click as click
from rich.table import Table

from .app import (
    STORAGE_OPTIONS,
    STORE_ROOT,
    console,
    err_console,
    examples,
    int_list,
    main,
    one_store,
    print_json,
    store_filters,
)


def result_rows(command):
    """--store (and the filters that find one), --head, --images, --split: the store rows a fit
    result's heads are looked at on (attention, gradcam, shapley)."""
    for decorator in reversed((
        click.option("--store", default=None,
                     show_default="the one store under the store root matching --dataset /"
                                  " --model / --pretrained",
                     help="Store URL (the one the result was fitted on)."),
        store_filters,
        click.option("--head", "result", required=True,
                     type=click.Path(exists=True, dir_okay=False),
                     help="A fit result (.json; its .safetensors head is used)."),
        click.option("--images", "rows", default="0,1,2,3", show_default=True,
                     callback=int_list, help="Row ids in the split."),
        click.option("--split", default="test", show_default=True),
    )):
        command = decorator(command)
    return command


@main.command(epilog=examples(
    "safe-cache report results/",
    "safe-cache report results/ --format md --plots plots/"))
@click.argument("results_dir", default="results", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["table", "md", "csv", "json"]),
              default="table", show_default=True)
@click.option("--plots", "plots_dir", default=None, type=click.Path(file_okay=False),
              help="Write PNG plots (accuracy vs shots, beta curve, lr x wd grid) here.")
def report(results_dir: str, fmt: str, plots_dir: str | None) -> None:
    """Mean and std over seeds per dataset, shots and method, beside the paper's numbers.
    RESULTS_DIR is fit's --out folder (by default: results)."""
    from ..analysis.report import aggregate, load_results, render, write_plots
    from ..analysis.tables import ood_table, report_tables

    if not Path(results_dir).is_dir():
        raise click.UsageError(f"no results folder {results_dir}: fit writes one (fit --out,"
                               f" default results/), or name the folder: report DIR.")
    runs = load_results(results_dir)
    if not runs:
        raise click.UsageError(f"no result files under {results_dir} (fit writes"
                               f" <dataset>/<backbone>/shots<K>_seed<S>_<recipe>[_o<hash>].json)")
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


@main.command(epilog=examples(
    "safe-cache export results/food101/RN50-openai/shots16_seed1_safe.json --out models/food101",
    "safe-cache export RESULT.json --out models/m --method safe_a --merge"))
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
    from ..export import export_model

    folder = export_model(result, out, method=method, merge=merge, weights=weights,
                          storage_options=storage_options, force=force)
    console.print(f"model folder: {folder}")


@main.command(epilog=examples(
    "safe-cache predict models/food101 photo.jpg more_photos/ --top-k 5",
    "safe-cache predict models/food101 photos/ --json --skip-bad"))
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
    from ..export import load_model
    from ..runtime.progress import RichProgress

    model = load_model(model_dir, weights=weights, device=device)
    with RichProgress() as progress:
        predictions = model.predict(list(images), top_k=top_k, batch_size=batch_size,
                                    skip_bad=skip_bad, progress=progress)
    if as_json:
        print_json([{"path": p.path, "top": [{"class": c, "probability": v} for c, v in p.top]}
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


@main.command(epilog=examples(
    "safe-cache attention --store stores/shapes/safe-cache-tiny-vit-random0.zarr "
    "--head stores/demo-data/results/shapes/safe-cache-tiny-vit-"
    "random0/shots4_seed1_safe_o52e6f092.json --images 0,13 --out maps/",
    "safe-cache attention --dataset food101 --head RESULT.json --image-root "
    "~/data/food-101/images --out maps/ --per-head"))
@result_rows
@click.option("--image-root", default=None, type=click.Path(file_okay=False),
              help="The dataset's image folder, to draw the maps over the images.")
@click.option("--per-head", is_flag=True, help="One row of maps per attention head.")
@click.option("--out", required=True, type=click.Path(file_okay=False))
def attention(store: str | None, dataset: str | None, model: str | None, pretrained: str | None,
              store_root: str | None, result: str, rows: tuple[int, ...], split: str,
              image_root: str | None, per_head: bool, out: str) -> None:
    """Pooling attention of the original and the fine-tuned head, side by side (PNG)."""
    from ..analysis.attention import attention_maps, plot_attention

    store = store or one_store(dataset=dataset, model=model, pretrained=pretrained,
                                store_root=store_root)
    maps = attention_maps(store, result, list(rows), split)
    written = plot_attention(maps, image_root, out, per_head)
    console.print(f"{len(written)} attention maps written to {out}")


@main.command(epilog=examples(
    "safe-cache gradcam --store stores/shapes/safe-cache-tiny-vit-random0.zarr "
    "--head stores/demo-data/results/shapes/safe-cache-tiny-vit-"
    "random0/shots4_seed1_safe_o52e6f092.json --images 0,13 --out cams/",
    "safe-cache gradcam --dataset food101 --head RESULT.json --image-root "
    "~/data/food-101/images --method gradcam++ --smooth 16 --out cams/"))
@result_rows
@click.option("--method", type=click.Choice(["gradcam", "gradcam++"]), default="gradcam",
              show_default=True)
@click.option("--target", type=click.Choice(["true", "predicted"]), default="true",
              show_default=True, help="The class each map explains: the label, or what the "
                                      "head predicts.")
@click.option("--image-root", default=None, type=click.Path(file_okay=False),
              help="The dataset's image folder, to draw the maps over the images.")
@click.option("--smooth", "samples", default=0, show_default=True,
              type=click.IntRange(0, 256), help="SmoothGrad: average the maps of this many "
              "noisy copies of each image through the live trunk (needs --image-root).")
@click.option("--noise", default=0.15, show_default=True,
              type=click.FloatRange(0, 1, min_open=True),
              help="SmoothGrad's noise, a fraction of each image's value range.")
@click.option("--out", required=True, type=click.Path(file_okay=False))
def gradcam(store: str | None, dataset: str | None, model: str | None, pretrained: str | None,
            store_root: str | None, result: str, rows: tuple[int, ...], split: str,
            method: str, target: str, image_root: str | None, samples: int, noise: float,
            out: str) -> None:
    """Grad-CAM at the dense map for the original pooling, SAFE's and the blend (PNG, JSON)."""
    from ..analysis.gradcam import gradcam_maps, plot_gradcam, smooth_gradcam_maps

    if samples and image_root is None:
        raise click.UsageError("--smooth runs the trunk on the images: name their folder with"
                               " --image-root.")
    store = store or one_store(dataset=dataset, model=model, pretrained=pretrained,
                                store_root=store_root)
    if samples:
        maps = smooth_gradcam_maps(store, result, list(rows), image_root, split, method,
                                   target, samples, noise)
    else:
        maps = gradcam_maps(store, result, list(rows), split, method, target)
    written = plot_gradcam(maps, image_root, out)
    label = "Grad-CAM++" if method == "gradcam++" else "Grad-CAM"
    console.print(f"{len(written)} {label} figure{'s' if len(written) != 1 else ''} written to"
                  f" {out} (and gradcam.json)")


@main.command(epilog=examples(
    "safe-cache shapley --store stores/imagenet/RN50-openai.zarr --head RESULT.json "
    "--parts ~/data/parts --images 0,1 --image-root ~/data/imagenet/images --out shapley/",
    "safe-cache shapley --dataset imagenet --head RESULT.json --parts ~/data/parts "
    "--images 4 --orders 500 --out shapley/",
    "safe-cache shapley --dataset imagenet --head RESULT.json --parts ~/data/parts "
    "--images 4 --mode pixels --image-root ~/data/imagenet/images --out shapley/"))
@result_rows
@click.option("--parts", "parts_dir", required=True, type=click.Path(file_okay=False,
                                                                        exists=True),
              help="Part masks: parts.json with the part names and, per image, a PNG at the "
                   "image's path (value k: the k-th part, 0: none).")
@click.option("--orders", default=200, show_default=True, type=click.IntRange(2, 100_000),
              help="Monte Carlo's random orders, for more than 8 parts.")
@click.option("--mode", type=click.Choice(["tokens", "pixels"]), default="tokens",
              show_default=True, help="tokens: drop absent parts' tokens from the stored maps' "
              "pool; pixels: set their pixels to the preprocessing mean and run the whole model "
              "live, a trunk pass per coalition (needs --image-root).")
@click.option("--image-root", default=None, type=click.Path(file_okay=False),
              help="The dataset's image folder, to draw the parts over the images.")
@click.option("--out", required=True, type=click.Path(file_okay=False))
def shapley(store: str | None, dataset: str | None, model: str | None, pretrained: str | None,
            store_root: str | None, result: str, parts_dir: str, rows: tuple[int, ...],
            split: str, orders: int, mode: str, image_root: str | None, out: str) -> None:
    """Each part's Shapley value for the original pooling, SAFE's and the blend (PNG, JSON)."""
    from ..analysis.shapley import plot_shapley, shapley_values

    if mode == "pixels" and image_root is None:
        raise click.UsageError("--mode pixels runs the model on the images: name their folder"
                               " with --image-root.")
    store = store or one_store(dataset=dataset, model=model, pretrained=pretrained,
                                store_root=store_root)
    if mode == "pixels":
        from ..analysis.shapley_pixels import pixel_shapley_values

        values = pixel_shapley_values(store, result, list(rows), parts_dir, str(image_root),
                                      split, orders)
    else:
        values = shapley_values(store, result, list(rows), parts_dir, split, orders,
                                image_root)
    written = plot_shapley(values, image_root, out)
    console.print(f"{len(written)} images' part values written to {out} (and shapley.json)")


@main.group(epilog=examples(
    "safe-cache parts partimagenet --annotations ~/data/PartImageNet/annotations/train/"
    "train.json --out ~/data/parts",
    "safe-cache parts partimagenet --annotations ~/data/PartImageNet/annotations/test/ "
    "--store stores/imagenet/RN50-openai.zarr --only-in-store --out ~/data/parts"))
def parts() -> None:
    """Part masks for `shapley --parts` from a dataset's part annotations."""


@parts.command("partimagenet", epilog=examples(
    "safe-cache parts partimagenet --annotations ~/data/PartImageNet/annotations/train/"
    "train.json --out ~/data/parts",
    "safe-cache parts partimagenet --annotations ~/data/PartImageNet/annotations/test/ "
    "--store stores/imagenet/RN50-openai.zarr --only-in-store --out ~/data/parts"))
@click.option("--annotations", required=True, type=click.Path(exists=True),
              help="A split's COCO-style JSON (annotations/<split>/<split>.json), or the folder "
                   "of its segmentation PNGs (PartImageNet_Seg).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="The parts folder to write (parts.json and a PNG per image).")
@click.option("--classnames", default=None, type=click.Path(dir_okay=False),
              show_default="<data root>/imagenet/classnames.txt",
              help="ImageNet's classnames.txt: a synset's line is its label.")
@click.option("--root", default=None, type=click.Path(file_okay=False),
              help="The data root, for the default --classnames ($SAFE_CACHE_DATA or ./data "
                   "when not given).")
@click.option("--store", default=None, help="An ImageNet store: put each mask at its row's "
              "path, check the row's label, and list the rows (for shapley --images).")
@click.option("--only-in-store", is_flag=True, help="With --store: skip the images it does "
              "not hold (else they are an error).")
@click.option("--force", is_flag=True, help="Replace an existing parts folder (one holding "
              "parts.json) whole; other folders are never replaced.")
def partimagenet(annotations: str, out: str, classnames: str | None, root: str | None,
                 store: str | None, only_in_store: bool, force: bool) -> None:
    """Convert PartImageNet's part annotations (polygons, RLE or PNGs) into a parts folder:
    its 40 part categories as the part names, each image's class from its file name's
    synset. The folder is written whole (staged beside --out, then renamed in) or not at all.
    """
    from ..analysis.partimagenet import convert

    if only_in_store and store is None:
        raise click.UsageError("--only-in-store needs --store.")
    record = convert(annotations, out, classnames, store, only_in_store, root, force)
    console.print(f"{len(record['images'])} part masks written to {out} (and parts.json)")
    if record["skipped"]:
        err_console.print(f"{len(record['skipped'])} images not in {store} skipped")
    for split, rows in record.get("rows", {}).items():
        console.print(f"{split} rows: {','.join(map(str, rows))}")


@main.command(epilog=examples(
    "safe-cache correspond --store stores/shapes/safe-cache-tiny-vit-random0.zarr "
    "--source 13 --point 40,30 --targets 14,15 --out corr/",
    "safe-cache correspond --source a.jpg --targets b.jpg,c.jpg --point 112,80 "
    "--model RN50 --pretrained openai --out corr/"))
@click.option("--store", default=None,
              show_default="for row ids: the one store under the store root matching --dataset"
                           " / --model / --pretrained",
              help="Store URL, whose rows --source / --targets name.")
@click.option("--dataset", default=None, help="With no store named: the stores of this dataset.")
@STORE_ROOT
@click.option("--source", required=True, help="Row id in the store, or an image file.")
@click.option("--point", required=True, callback=int_list, help="x,y in the model's input "
              "pixels (after resize and center crop).")
@click.option("--targets", required=True, help="Row ids, or image files, comma-separated.")
@click.option("--split", default="test", show_default=True)
@click.option("--image-root", default=None, type=click.Path(file_okay=False),
              help="The dataset's image folder, to draw over the images (store rows).")
@click.option("--model", default=None, envvar="SAFE_CACHE_MODEL", show_envvar=True,
              show_default="RN50",
              help="For image files; for row ids, the store's model.")
@click.option("--pretrained", default=None, envvar="SAFE_CACHE_PRETRAINED", show_envvar=True,
              show_default="openai",
              help="For image files: tag, file, or 'none'; for row ids, the store's weights.")
@click.option("--cut", default="pool", show_default=True,
              help="For image files: pool, layer4 (ResNet), lastN (ViT): earlier maps.")
@click.option("--out", required=True, type=click.Path(file_okay=False))
def correspond(store: str | None, dataset: str | None, store_root: str | None, source: str,
               point: tuple[int, ...], targets: str, split: str, image_root: str | None,
               model: str | None, pretrained: str | None, cut: str, out: str) -> None:
    """Semantic correspondence (the paper's Eq. 1): stored dense maps, or image files through
    the trunk live at any cut (PNG)."""
    from ..analysis.correspond import correspond as run_correspond
    from ..analysis.correspond import correspond_images, plot_correspondence

    if len(point) != 2:
        raise click.BadParameter("--point takes x,y")
    target_list = [t for t in targets.split(",") if t]
    rows = source.isdigit() and all(t.isdigit() for t in target_list)
    if store or rows:
        store = store or one_store(dataset=dataset, model=model, pretrained=pretrained,
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
