"""The study page's tables of a paper figure: Fig. 8 (SAFE on ImageNet under each choice of the
text classifier), one row per variant and a column per shots, each variant beside its own
published numbers only (safe_paper.json's `figure_8`: what the paper's text gives).

A variant is a results folder of the study (`<recipe>-<prompt set>[-linear]`, spec.py's
variant_name); its published row is named by the study's own variant (published_keys), one row
per backbone and variant. A row of another setting
than the paper's (backbone, weights, recipe, grid...) shows ours alone: the reasons report.py's
paper_reasons gives, less the prompts and the classifier, which are what the figure varies.
"""

from __future__ import annotations

import html
from typing import Any

from ..analysis.literature import safe_paper

FIGURES = ("figure_8",)
VARIED = ("prompts ", "classifier ")  # paper_reasons' reasons that name what Fig. 8 varies


def published_keys(study: Any) -> dict[str, str]:
    """Each variant folder of a study -> the published row it stands beside: its prompt set
    (a built-in by name, a per-dataset file by its folder: `cupl/{dataset}.json` is "cupl", a
    file by its stem), `-linear` for a fine-tuned classifier; from the study's own variants,
    never parsed back from a folder name."""
    from .spec import prompt_label

    return {study.variant_name(recipe, prompts, classifier):
            prompt_label(prompts) + ("" if classifier == "text" else f"-{classifier}")
            for recipe, prompts, classifier in study.variants}


def figure_rows(rows: list[dict[str, Any]], figure: str,
                keys: dict[str, str]) -> list[dict[str, Any]]:
    """One row per backbone and variant: {"backbone", "variant", "published_as", "cells":
    {shots: {mean, std, seeds, paper, delta}}}, from report.aggregate's rows (their `setting`
    the variant's folder: page.py); `keys` the variants' published rows (published_keys)."""
    block = safe_paper()[figure]
    published = block["variants"]
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        if row["dataset"] != block["dataset"] or row["method"] != block["method"]:
            continue
        variant = row["setting"].split(", ")[0]
        key = keys.get(variant)
        other = [r for r in row["reasons"] if not r.startswith(VARIED)]
        paper = None if other or key is None else \
            published.get(key, {}).get(str(row["shots"]))
        entry = out.setdefault((row["backbone"], variant), {
            "backbone": row["backbone"], "variant": variant, "published_as": key or variant,
            "cells": {}})
        entry["cells"][row["shots"]] = {
            "mean": row["mean"], "std": row["std"], "seeds": row["seeds"], "paper": paper,
            "delta": None if paper is None else row["mean"] - paper}
    order = list(published)
    return sorted(out.values(), key=lambda r: (r["backbone"], order.index(r["published_as"])
                                               if r["published_as"] in order else len(order)))


def _shots(figure_rows_: list[dict[str, Any]]) -> list[int]:
    return sorted({k for row in figure_rows_ for k in row["cells"]})


def _cell(cell: dict[str, Any] | None) -> tuple[str, str]:
    if cell is None:
        return "-", ""
    ours = f"{cell['mean']:.2f} ± {cell['std']:.2f}"
    if cell["paper"] is None:
        return ours, ""
    return ours, f"paper {cell['paper']:.2f} ({cell['delta']:+.2f})"


def figure_markdown(figure: str, rows: list[dict[str, Any]]) -> list[str]:
    """The figure's table as markdown lines (none without rows)."""
    if not rows:
        return []
    block, shots = safe_paper()[figure], _shots(rows)
    lines = [f"## {figure.replace('_', ' ').capitalize()}: {block['method']} on"
             f" {block['dataset']}, by variant", "",
             "| backbone | variant | " + " | ".join(f"{k} shots" for k in shots) + " |",
             "|---|---|" + "---|" * len(shots)]
    for row in rows:
        cells = []
        for k in shots:
            ours, paper = _cell(row["cells"].get(k))
            cells.append(ours + (f"<br>{paper}" if paper else ""))
        lines.append(f"| {row['backbone']} | {row['variant']} | " + " | ".join(cells) + " |")
    return [*lines, "", f"- {block['note']}", ""]


def figure_html(figure: str, rows: list[dict[str, Any]]) -> str:
    """The figure's table as HTML ("" without rows)."""
    if not rows:
        return ""
    e, block, shots = html.escape, safe_paper()[figure], _shots(rows)
    parts = [f"<h2>{e(figure.replace('_', ' ').capitalize())}: {e(block['method'])} on"
             f" {e(block['dataset'])}, by variant</h2><table><tr><th>backbone</th>"
             f"<th>variant</th>"
             + "".join(f"<th>{k} shots</th>" for k in shots) + "</tr>"]
    for row in rows:
        cells = "".join(
            f"<td>{e(ours)}<br><span class='paper'>{e(paper)}</span></td>"
            for ours, paper in (_cell(row["cells"].get(k)) for k in shots))
        parts.append(f"<tr><td>{e(row['backbone'])}</td><td>{e(row['variant'])}</td>"
                     f"{cells}</tr>")
    return "".join(parts) + f"</table><p class='paper'>{e(block['note'])}</p>"
