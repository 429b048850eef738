"""Rich tables of results: what `fit`, `report` and the demo print. Each function returns tables;
the caller prints them (the CLI to its console, a notebook wherever it likes)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from ..fit.results import METHOD_LABELS, METHODS, RunResult
from .literature import LABELS
from .ood_table import OOD_COLUMNS, ood_rows
from .report import REFERENCE, TEST_SELECTED, base_method, cell, footnotes


def runs_table(results: list[RunResult]) -> Table:
    """Test accuracy of every method per run (chosen hyperparameters are in the JSON)."""
    present = [m for m in METHODS if any(m in r.methods for r in results)]
    skipped = any(r.skipped for r in results)
    notes = (["* an existing result of the same identity: kept, not computed again"]
             if skipped else []) + [r.note for r in results if r.note]
    table = Table(title="test accuracy (%)", caption="\n".join(notes) or None)
    for column in ("shots", "seed", *(METHOD_LABELS[m] for m in present)):
        table.add_column(column, justify="right")
    for r in results:
        cells = [f"{100 * r.methods[m]['test_acc']:.2f}" if m in r.methods else "-"
                 for m in present]
        cells = [f"[bold]{c}[/]" if m.startswith("safe") else c
                 for m, c in zip(present, cells, strict=True)]
        table.add_row(str(r.shots), f"{r.seed}{'*' if r.skipped else ''}", *cells)
    return table


def _label(method: str) -> str:
    base = base_method(method)
    suffix = " (reference)" if method.endswith(REFERENCE) else \
        " (test-sel.)" if method.endswith(TEST_SELECTED) else ""
    return LABELS.get(base, base) + suffix


def report_tables(rows: list[dict[str, Any]]) -> list[Table]:
    """One table per dataset and backbone: shots x method (x setting, side by side when there
    are several), ours beside the paper's where the row is the paper's setting (footnotes say
    why not elsewhere), and the published-only rows (methods a store cannot run)."""
    order = {m: i for i, m in enumerate(METHODS)}
    tables = []
    for dataset, backbone in sorted({(r["dataset"], r["backbone"]) for r in rows}):
        mine = [r for r in rows if (r["dataset"], r["backbone"]) == (dataset, backbone)]
        recipes = sorted({r["setting"] for r in mine if not r.get("published")})
        notes = footnotes(mine)
        table = Table(title=f"{dataset} / {backbone}: test accuracy (%), mean ± std over seeds"
                      + (f", {recipes[0]}" if len(recipes) == 1 else ""),
                      caption="\n".join(notes) or None)
        columns = ["shots", "method", *(["setting"] if len(recipes) > 1 else []), "accuracy",
                   "seeds", "paper", "delta"]
        for column in columns:
            table.add_column(column, justify="left" if column in ("method", "setting")
                             else "right")
        for row in sorted(mine, key=lambda r: (r["shots"], order.get(
                base_method(r["method"]), 99), r["method"], r["setting"])):
            delta = cell(row, "delta")
            style = "green" if delta.startswith("+") else "red" if delta != "-" else ""
            table.add_row(str(row["shots"]), _label(row["method"]),
                          *([row["setting"]] if len(recipes) > 1 else []),
                          "published" if row.get("published") else
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
    notes = list(dict.fromkeys(f"no paper number: {reason}" for row in rows
                               for reason in row["reasons"]))
    table = Table(title="out of distribution: 16-shot ImageNet -> variants, ours (paper), %",
                  caption="\n".join(notes) or None)
    table.add_column("backbone")
    table.add_column("setting")
    table.add_column("method")
    for column in OOD_COLUMNS:
        table.add_column(column.replace("imagenet_", "-").replace("imagenet", "ImageNet"),
                         justify="right")
    for row in rows:
        cells = [("-" if row[c] is None else f"{row[c]:.1f}")
                 + (f" ({row['paper'][c]:.1f})" if row["paper"][c] is not None else "")
                 for c in OOD_COLUMNS]
        label = _label(row["method"]) + (" (published)" if row["published"] else "")
        table.add_row(row["backbone"], row["setting"], label, *cells)
    return table
