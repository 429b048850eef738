"""Stores: `info`, `ls`, `verify`, `copy`."""

from __future__ import annotations

import json
import sys

import rich_click as click
from rich.table import Table

from .app import (
    STORAGE_OPTIONS,
    console,
    default_stores,
    err_console,
    examples,
    json_object,
    keep_whole,
    main,
    one_store,
    print_json,
    store_filters,
)


@main.command(epilog=examples(
    "safe-cache info stores/shapes/safe-cache-tiny-vit-random0.zarr",
    "safe-cache info --dataset food101 --json"))
@click.argument("store", required=False)
@store_filters
@STORAGE_OPTIONS
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(store: str | None, storage_options: dict | None, as_json: bool, **filters) -> None:
    """Show a store's manifest, sizes and completeness [STORE default: the one store under the
    store root matching --dataset / --model / --pretrained]."""
    from ..store import open_store

    store = store or one_store(**filters, storage_options=storage_options)
    opened = open_store(store, storage_options=storage_options)
    manifest, summary = opened.manifest, opened.summary()
    if as_json:
        print_json({"manifest": manifest, "splits": summary})
        return
    backbone, dataset = manifest["backbone"], manifest["dataset"]
    weights = backbone.get("pretrained") or \
        f"none (random weights, init seed {backbone.get('init_seed')})"
    head = Table(title=f"store {store}", show_header=False)
    head.add_column("field", style="bold cyan")
    head.add_column("value")
    for key, value in (
        ("dataset", f"{dataset.get('name')} ({dataset.get('num_classes')} classes)"),
        ("backbone", f"{backbone.get('model')} / {weights}"),
        ("fingerprint", manifest["backbone_fingerprint"][:16]),
        ("dense map", f"tokens={backbone['tokens']} channels={backbone['channels']}"
                      f" embed_dim={backbone['embed_dim']}"),
        ("views", f"{manifest['views'].get('count')} (decoded by"
                  f" {manifest['views'].get('decode', 'pil')})"),
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


@main.command(name="ls", epilog=examples(
    "safe-cache ls",
    "safe-cache ls s3://bucket/stores --json"))
@click.argument("root", required=False)
@STORAGE_OPTIONS
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls_command(root: str | None, storage_options: dict | None, as_json: bool) -> None:
    """List every store under ROOT (a folder or a bucket prefix), one row each. ROOT defaults
    to the store root: $SAFE_CACHE_STORES, else ./stores."""
    from ..store.catalog import find_stores
    from ..store.paths import store_root

    root = store_root(root)
    rows = find_stores(root, storage_options=storage_options)
    if as_json:
        print_json(rows)
        return
    console.print(f"stores under {root}:", highlight=False, soft_wrap=True)
    table = Table()
    for column in ("store", "dataset", "backbone", "train", "val", "test", "done"):
        table.add_column(column, no_wrap=column not in ("store", "dataset", "backbone"),
                         justify="right" if column in ("train", "val", "test") else "left")
    prefix = str(root).rstrip("/") + "/"
    for row in rows:
        sizes = row["readable_rows"]
        table.add_row(row["url"].removeprefix(prefix), row["dataset"], row["backbone"],
                      *(f"{sizes[s]:,}" if s in sizes else "-" for s in ("train", "val", "test")),
                      "yes" if row["complete"] else "[yellow]no[/]")
    console.print(keep_whole(keep_whole(table, "store", share=0.25), "dataset", "backbone",
                             share=0.16))


@main.command(epilog=examples(
    "safe-cache verify stores/shapes/safe-cache-tiny-vit-random0.zarr",
    "safe-cache verify --dataset food101 --seal"))
@click.argument("store", required=False)
@store_filters
@click.option("--seal", is_flag=True,
              help="Seal the manifest of a store that verifies but carries no seal (made by an"
              " older safe-cache): check what it names (backbone, dataset) first.")
@STORAGE_OPTIONS
def verify(store: str | None, storage_options: dict | None, seal: bool, **filters) -> None:
    """Check schema, manifest and its seal, shapes, dtypes, completeness, chunks and values
    (text classifier and head too); non-zero on problems [STORE default: every store under the
    store root matching the filters]."""
    from ..store.verify import verify_store

    stores = [store] if store else default_stores(**filters, storage_options=storage_options)
    failed = False
    for url in stores:
        problems = _seal(url, storage_options) if seal else \
            verify_store(url, storage_options=storage_options)
        if not problems:
            console.print(f"[green]ok[/]: {url}")
        for problem in problems:
            err_console.print(f"[bold red]error:[/] {url}: {problem}" if len(stores) > 1
                              else f"[bold red]error:[/] {problem}", highlight=False)
        failed = failed or bool(problems)
    if failed:
        sys.exit(1)


def _seal(url: str, storage_options: dict | None) -> list[str]:
    """verify --seal, after checking that the card describes the model it names."""
    from ..errors import StoreError
    from ..model.backbone import card_problems
    from ..store import open_store
    from ..store.verify import seal_verified

    try:
        card = open_store(url, storage_options=storage_options,
                          check_fingerprint=False).manifest.get("backbone") or {}
    except StoreError as exc:
        return [str(exc)]
    return card_problems(card) or seal_verified(url, storage_options=storage_options)


@main.command(name="copy", epilog=examples(
    "safe-cache copy stores/food101/RN50-openai.zarr "
    "s3://bucket/stores/food101/RN50-openai.zarr",
    "safe-cache copy s3://bucket/stores/dtd/RN50-openai.zarr stores/dtd/RN50-openai.zarr"))
@click.argument("source")
@click.argument("destination")
@click.option("--source-options", default=None, metavar="JSON", callback=json_object,
              help="fsspec options for SOURCE.")
@click.option("--destination-options", default=None, metavar="JSON", callback=json_object,
              help="fsspec options for DESTINATION.")
@click.option("--no-verify", is_flag=True, help="Skip verifying DESTINATION after the copy.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def copy_command(source: str, destination: str, source_options: dict | None,
                 destination_options: dict | None, no_verify: bool, as_json: bool) -> None:
    """Copy a store to a shared location (or fetch one), then verify the copy. Run it again to
    resume an interrupted copy."""
    from ..runtime.progress import RichProgress
    from ..store.transfer import copy_store

    with RichProgress(unit="B") as progress:
        report = copy_store(source, destination, source_options=source_options,
                            destination_options=destination_options,
                            verify=not no_verify, progress=progress)
    if as_json:
        print_json(report.__dict__)
    else:
        console.print(f"copied {report.objects - report.already_there} of {report.objects}"
                      f" objects ({report.bytes / 2**20:.1f} MiB) to {destination} in"
                      f" {report.seconds:.1f} s" + ("" if no_verify else "; verified"))
    for problem in report.problems:
        err_console.print(f"[red]problem[/]: {problem}")
    if report.problems:
        sys.exit(1)
