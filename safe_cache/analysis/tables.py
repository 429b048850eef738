"""Rich tables of results: what `fit`, `report` and the demo print. Each function returns tables;
the caller prints them (the CLI to its console, a notebook wherever it likes)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from ..fit.results import METHOD_LABELS, METHODS, RunResult
from .report import OOD_COLUMNS, cell, ood_rows


def runs_table(results: list[RunResult]) -> Table:
    """Test accuracy of every method per run (chosen hyperparameters are in the JSON)."""
    present = [m for m in METHODS if any(m in r.methods for r in results)]
    skipped = any(r.skipped for r in results)
    table = Table(title="test accuracy (%)",
                  caption="* an existing result, not recomputed (--force)" if skipped else None)
    for column in ("shots", "seed", *(METHOD_LABELS[m] for m in present)):
        table.add_column(column, justify="right")
    for r in results:
        cells = [f"{100 * r.methods[m]['test_acc']:.2f}" if m in r.methods else "-"
                 for m in present]
        cells = [f"[bold]{c}[/]" if m.startswith("safe") else c
                 for m, c in zip(present, cells, strict=True)]
        table.add_row(str(r.shots), f"{r.seed}{'*' if r.skipped else ''}", *cells)
    return table


def report_tables(rows: list[dict[str, Any]]) -> list[Table]:
    """One table per dataset and backbone: shots x method, ours beside the paper's."""
    order = {m: i for i, m in enumerate(METHODS)}
    tables = []
    for dataset, backbone in sorted({(r["dataset"], r["backbone"]) for r in rows}):
        table = Table(title=f"{dataset} / {backbone}: test accuracy (%), mean ± std over seeds")
        for column in ("shots", "method", "accuracy", "seeds", "paper", "delta"):
            table.add_column(column, justify="left" if column == "method" else "right")
        mine = [r for r in rows if (r["dataset"], r["backbone"]) == (dataset, backbone)]
        for row in sorted(mine, key=lambda r: (r["shots"], order.get(r["method"], 99))):
            delta = cell(row, "delta")
            style = "green" if delta.startswith("+") else "red" if delta != "-" else ""
            table.add_row(str(row["shots"]), METHOD_LABELS.get(row["method"], row["method"]),
                          f"{row['mean']:.2f} ± {row['std']:.2f}", str(row["seeds"]),
                          cell(row, "paper"), f"[{style}]{delta}[/]" if style else delta)
        tables.append(table)
    return tables


def ood_table(runs: list[RunResult]) -> Table | None:
    """Table III: ImageNet -> variants, ours (paper) per backbone and method; None without OOD
    results."""
    rows = ood_rows(runs)
    if not rows:
        return None
    table = Table(title="out of distribution: 16-shot ImageNet -> variants, ours (paper), %")
    table.add_column("backbone")
    table.add_column("method")
    for column in OOD_COLUMNS:
        table.add_column(column.replace("imagenet_", "-").replace("imagenet", "ImageNet"),
                         justify="right")
    for row in rows:
        cells = [("-" if row[c] is None else f"{row[c]:.1f}")
                 + (f" ({row['paper'][c]:.1f})" if row["paper"][c] is not None else "")
                 for c in OOD_COLUMNS]
        table.add_row(row["backbone"], METHOD_LABELS.get(row["method"], row["method"]), *cells)
    return table
