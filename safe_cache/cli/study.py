"""Studies: `study run` (a whole paper table in one command) and `study list`."""

from __future__ import annotations

import rich_click as click
from rich.table import Table

from .app import (
    STORE_ROOT,
    THREADS,
    byte_size,
    cluster_options,
    console,
    err_console,
    examples,
    execution_of,
    keep_whole,
    main,
    print_json,
)


@main.group(epilog=examples(
    "safe-cache study list",
    "safe-cache study run table1-rn50 --root ~/data --dry-run"))
def study() -> None:
    """Run a whole paper table (or ablation) from one TOML file, resumably, with a report."""


@study.command("list", epilog=examples(
    "safe-cache study list",
    "safe-cache study list --json"))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(as_json: bool) -> None:
    """The studies shipped with safe-cache."""
    from ..study import list_studies

    studies = list_studies()
    rows = [{"name": s.name, "datasets": len(s.datasets), "backbones": [b.name for b in
             s.backbones], "shots": list(s.shots), "seeds": list(s.seeds),
             "methods": list(s.methods), "description": s.description} for s in studies]
    if as_json:
        print_json(rows)
        return
    table = Table(title="shipped studies (safe-cache study run NAME --root DATA)")
    for column in ("study", "datasets", "backbones", "shots x seeds"):
        table.add_column(column, no_wrap=column in ("datasets", "shots x seeds"))
    table.add_column("description")
    for row in rows:
        table.add_row(row["name"], str(row["datasets"]), ",\n".join(row["backbones"]),
                      f"{len(row['shots'])} x {len(row['seeds'])}", row["description"])
    console.print(keep_whole(keep_whole(table, "study"), "backbones", share=0.15))


def _print_plan(plan) -> None:
    root = plan.stores[0].url.rsplit("/", 2)[0] + "/" if plan.stores else "-"
    console.print(f"study {plan.study.name}: its stores, <dataset>/<backbone>.zarr under {root}"
                  f" (size: estimated when complete)", highlight=False, soft_wrap=True)
    table = Table()
    for column in ("dataset", "backbone", "status", "images", "size"):
        table.add_column(column, no_wrap=column in ("status", "images", "size"))
    for item in plan.stores:
        style = {"present": "green", "no data": "red"}.get(item.status, "yellow")
        table.add_row(item.dataset + (" (test only)" if item.test_only else ""),
                      item.backbone.name, f"[{style}]{item.status}[/]",
                      "-" if item.images is None else f"{item.images:,}",
                      byte_size(item.bytes, '-'))
    console.print(keep_whole(table, "dataset", "backbone", share=0.2))
    todo = [r for r in plan.runs if r.status == "todo"]
    console.print(f"runs: {len(todo)} to do, {len(plan.runs) - len(todo)} done (skipped)")
    unknown = sum(s.status == "no data" for s in plan.stores)
    later = f", plus {unknown} store(s) whose data is missing (unknown until it is there)" \
        if unknown else ""
    where = plan.stores[0].url.rsplit("/", 2)[0] if plan.stores else "-"
    console.print(f"disk for the stores to create or extend: {byte_size(plan.disk_bytes, '-')}"
                  f"{later}; stores under {where}, results under {plan.out}", highlight=False)
    when = "unknown" if plan.seconds is None else f"about {plan.seconds / 3600:,.1f} h"
    console.print(f"estimated time: {when} ({plan.estimate_note})")
    for problem in plan.missing:
        err_console.print(f"[bold red]missing:[/] {problem}", highlight=False)


@study.command("run", epilog=examples(
    "safe-cache study run table1-rn50 --root ~/data --dry-run",
    "safe-cache study run my_study.toml --root ~/data --out study-out/"))
@click.argument("study_name", metavar="STUDY")
@click.option("--root", default=None, type=click.Path(file_okay=False),
              show_default="$SAFE_CACHE_DATA, else ./data",
              help="Data root.")
@STORE_ROOT
@click.option("--out", default="study-out", show_default=True,
              help="Folder for results/, plots/ and the report (study.md, study.html).")
@cluster_options
@THREADS
@click.option("--device", default="cpu", show_default=True,
              help="For the time estimate: which measured throughput applies (cpu, cuda).")
@click.option("--dry-run", is_flag=True,
              help="Print the plan (stores, sizes, runs to do and to skip, missing data, time)"
              " and stop.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def run_(study_name: str, root: str | None, store_root: str | None, out: str,
         scheduler: str | None, local_workers: int, device: str, dry_run: bool,
         as_json: bool) -> None:
    """Run STUDY (a shipped name or a TOML file): extract what is missing, fit what has no
    result, write the report. Run it again after any failure: it resumes."""
    from ..data.datasets import resolve_data_root
    from ..runtime.progress import RichProgress
    from ..study import load_study, plan_study
    from ..study import run as run_study

    spec = load_study(study_name)
    data_root = resolve_data_root(root).path
    if dry_run:
        plan = plan_study(spec, data_root, stores=store_root, out=out, device=device)
        print_json(plan.as_json()) if as_json else _print_plan(plan)
        raise SystemExit(1 if plan.missing else 0)
    with RichProgress(unit="step") as progress:
        result = run_study(spec, data_root, stores=store_root, out=out,
                           execution=execution_of({"scheduler": scheduler,
                                                   "local_workers": local_workers}),
                           progress=progress, device=device)
    summary = {"study": spec.name, "extracted": result.extracted, "fitted": result.fitted,
               "skipped": result.skipped, "seconds": round(result.seconds, 1),
               "report": [str(p) for p in result.pages]}
    if as_json:
        print_json(summary)
        return
    console.print(f"study {spec.name}: {len(result.extracted)} stores extracted or extended,"
                  f" {result.fitted} runs fitted, {result.skipped} skipped;"
                  f" report {result.pages[1] if len(result.pages) > 1 else '-'}")
