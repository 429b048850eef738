"""Backbones and datasets: `backbone`, `models`, `datasets`."""

from __future__ import annotations

import json

import rich_click as click
from rich.table import Table

from .app import (
    console,
    err_console,
    main,
    print_json,
)


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
    from ..model.backbone import load_backbone

    loaded = load_backbone(
        model, pretrained, cut=cut, quick_gelu=quick_gelu, cache_dir=cache_dir,
        init_seed=init_seed,
    )
    card = {**loaded.card, "fingerprint": loaded.fingerprint}
    if as_json:
        print_json(card)
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
    from ..model.backbone import list_architectures

    rows = [row for row in list_architectures() if show_all or row["family"] != "unsupported"]
    if as_json:
        print_json(rows)
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
    from ..data.datasets import dataset_status, list_specs, open_dataset, resolve_data_root

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
        print_json(rows)
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
