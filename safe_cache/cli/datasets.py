"""Datasets: `datasets` (the table of known datasets) and `datasets fetch`."""

from __future__ import annotations

import rich_click as click
from rich import box
from rich.table import Table

from ..data.unpack import DEFAULT_MARGIN
from .app import (
    byte_size,
    console,
    err_console,
    examples,
    keep_whole,
    main,
    print_json,
)


def _size(n: int | None) -> str:
    return "unknown" if n is None else f"about {byte_size(n)}"


@main.group(invoke_without_command=True, epilog=examples(
    "safe-cache datasets --root ~/data",
    "safe-cache datasets --root ~/data --make-split eurosat"))
@click.option("--root", default=None, type=click.Path(file_okay=False),
              show_default="$SAFE_CACHE_DATA, else ./data where it exists",
              help="Data root holding one folder per dataset: mark which are present.")
@click.option("--make-split", "make_split", metavar="DATASET", default=None,
              help="Write a seeded split (CoOp proportions) for DATASET under the data root when"
              " its published split file is missing. Its numbers are not comparable with"
              " papers'.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def datasets(ctx: click.Context, root: str | None, make_split: str | None,
             as_json: bool) -> None:
    """List the known datasets: folder, classes, split sizes, and presence under the data
    root. `datasets fetch NAME` downloads one."""
    if ctx.invoked_subcommand is not None:
        return
    from ..data.datasets import (
        DATA_ROOT_ENV,
        DEFAULT_DATA_ROOT,
        dataset_status,
        list_specs,
        open_dataset,
        resolve_data_root,
    )

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
        "fetch": "yes" if any(s.unpack for s in spec.sources) else
                 "split" if spec.sources else "no",
    } for spec in list_specs()]
    if as_json:
        print_json(rows)
        return
    table = Table(title="datasets" + (f" under {root}" if root else ""), box=box.SIMPLE_HEAD,
                  pad_edge=False)
    for column in ("dataset", "folder", "classes", "train/val/test"):
        table.add_column(column, justify="right" if column == "classes" else "left",
                         no_wrap=column in ("classes", "train/val/test"))
    if root:
        table.add_column("status")
    for row in rows:
        sizes = row["split_sizes"]
        status = row["status"]
        if status.startswith("no ") and status.endswith(".json"):
            status = "no split file"  # its name is in --json; the folder's column says where
        style = {"present": "green", "missing": "red"}.get(status, "yellow")
        cells = [row["name"], row["folder"] + "/", str(row["classes"]),
                 "/".join(f"{sizes[s]:,}" if s in sizes else "-"
                            for s in ("train", "val", "test"))]
        table.add_row(*cells, *([f"[{style}]{status}[/]"] if root else []))
    keep_whole(table, "status", "classes", share=0.18)
    console.print(keep_whole(keep_whole(table, "dataset", share=0.2), "folder", share=0.16))
    by_hand = {kind: [r["name"] for r in rows if r["fetch"] == kind] for kind in ("split", "no")}
    console.print(f"`datasets fetch NAME` downloads each of them, except: by hand"
                  f" {', '.join(by_hand['no'])}; the split file only (the images by hand)"
                  f" {', '.join(by_hand['split'])}. fetch says where to put what.",
                  highlight=False)
    if not root:
        err_console.print(f"presence not shown: no data root (--root not given, {DATA_ROOT_ENV}"
                          f" not set, no ./{DEFAULT_DATA_ROOT}/ here); pass --root DIR to see"
                          f" which datasets are there.", highlight=False, soft_wrap=True)


def _print_plan(plans: list, root) -> None:
    table = Table(title=f"datasets fetch --dry-run under {root}")
    for column in ("dataset", "file", "state", "size"):
        table.add_column(column, no_wrap=column in ("state", "size"))
    for plan in plans:
        if plan.status == "present":
            table.add_row(plan.spec.name, "-", "[green]present: left alone[/]", "-")
        for state in plan.sources:
            table.add_row(plan.spec.name, state.source.file, state.state,
                          _size(state.source.approx_bytes))
    console.print(keep_whole(table, "dataset", "file", share=0.25))
    for plan in plans:
        for state in plan.sources:
            console.print(f"{plan.spec.name} {state.source.file} from {state.source.url}",
                          highlight=False, soft_wrap=True)
    for plan in plans:
        if plan.manual:
            console.print(f"{plan.spec.name}, by hand: {plan.manual}", highlight=False)
    for plan in plans:
        if plan.status != "present":
            console.print(f"{plan.spec.name}: into {root / plan.spec.folder}/ (downloads and"
                          f" unpacking under {root / '.fetch' / plan.spec.name}/, removed when"
                          f" done)", highlight=False, soft_wrap=True)
    needed = sum(p.disk_bytes for p in plans if p.status != "present")
    unknown = [f for p in plans for f in p.unknown_sizes]
    extra = f", plus {len(unknown)} file(s) of unknown size ({', '.join(unknown)})" \
        if unknown else ""
    console.print(f"disk needed while fetching: {_size(needed)}{extra}: archives plus their"
                      f" contents; about half stays after (all with --keep-archives)")


@datasets.command(epilog=examples(
    "safe-cache datasets fetch dtd,eurosat --root ~/data --dry-run",
    "safe-cache datasets fetch dtd --root ~/data",
    "safe-cache datasets fetch dtd --root ~/data --repair"))
@click.argument("names", metavar="NAME[,NAME...]")
@click.option("--root", default=None, type=click.Path(file_okay=False),
              show_default="$SAFE_CACHE_DATA, else ./data",
              help="Data root to put the dataset folders in.")
@click.option("--sources", "sources_file", default=None, type=click.Path(dir_okay=False),
              show_default="$SAFE_CACHE_SOURCES",
              help="JSON file replacing the specs' sources per dataset (a mirror).")
@click.option("--keep-archives", is_flag=True,
              help="Keep the downloaded archives (under ROOT/.fetch/) after unpacking.")
@click.option("--workers", default=None, type=click.IntRange(1),
              show_default="cores - 1",
              help="Processes that cut UCF101's frames.")
@click.option("--repair", is_flag=True,
              help="Complete a folder the reader rejects (images deleted, a damaged split"
              " file) from the archives: only what is missing or differs from the archive's"
              " copy is written; your other files stay.")
@click.option("--unpack-margin", "margin", default=DEFAULT_MARGIN, show_default=True,
              type=click.FloatRange(min=0, min_open=True, max=1e6),
              help="An archive may expand to at most this many times its expected size (and"
              " as many files); more is refused as an archive bomb.")
@click.option("--dry-run", is_flag=True,
              help="List what would be downloaded, from where, and the disk needed; fetch"
              " nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def fetch(names: str, root: str | None, sources_file: str | None, keep_archives: bool,
          workers: int | None, repair: bool, margin: float, dry_run: bool,
          as_json: bool) -> None:
    """Download NAME (or 'all'), check every checksum, lay it out as its spec says, and check
    it with the reader. Resumable; a complete folder is left alone. Writes only under the
    data root; local sources are copied, never moved."""
    from ..data.datasets import resolve_data_root
    from ..data.fetch import fetch as fetch_datasets
    from ..data.fetch import plan_fetch
    from ..runtime.progress import RichProgress

    wanted = [n.strip() for n in names.split(",") if n.strip()]
    data_root = resolve_data_root(root).path
    if dry_run:
        plans = plan_fetch(wanted, data_root, sources=sources_file)
        print_json([p.as_json() for p in plans]) if as_json else _print_plan(plans, data_root)
        return
    with RichProgress(unit="B") as progress:
        reports = fetch_datasets(wanted, data_root, sources=sources_file,
                                 keep_archives=keep_archives, progress=progress,
                                 workers=workers, repair=repair, margin=margin)
    if as_json:
        print_json([r.as_json() for r in reports])
        return
    table = Table(title=f"datasets fetch under {data_root}")
    for column in ("dataset", "status", "folder", "downloaded", "files added", "replaced",
                   "seconds"):
        table.add_column(column)
    for r in reports:
        table.add_row(r.dataset, r.status, r.folder, ", ".join(r.downloaded) or "-",
                      str(r.added), str(r.replaced), f"{r.seconds:.1f}")
    console.print(keep_whole(table, "dataset", "folder", "downloaded"))
