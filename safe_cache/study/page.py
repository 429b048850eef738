"""The study report: `study.md` and one self-contained `study.html` (plots embedded as data URIs).

Tables are laid out as the paper's: one per (backbone, variant, shots), methods as rows and
datasets (then the 11-dataset average) as columns; each cell is our mean +- std over seeds, the
paper's number and the delta where the paper has one. Then ImageNet's OOD table, its cells the
same beside the paper's Table III (analysis/ood_table.py), accuracy vs shots and SAFE's beta
curves per dataset, the training curves of the largest-shot first-seed run per dataset, and for
every cell the command that produced it and its result files.
"""

from __future__ import annotations

import base64
import html
import json
import shlex
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from .._version import __version__
from ..analysis.literature import FULL_ENCODER_METHODS
from ..analysis.ood_table import OOD_COLUMNS, ood_rows
from ..analysis.report import ELEVEN, footnotes
from ..atomic import atomic_write_text
from ..fit.results import METHODS
from .figures import FIGURES, figure_html, figure_markdown, figure_rows, published_keys
from .plan import StudyPlan

ELEVEN_LAST = "average"


def _cell_text(row: dict[str, Any] | None) -> tuple[str, str]:
    """(ours, paper and delta) texts of one cell."""
    if row is None:
        return "-", ""
    if row.get("published"):
        return "-", f"published {row['paper']:.2f}"
    ours = f"{row['mean']:.2f} ± {row['std']:.2f}"
    if row.get("paper") is None:
        return ours, ""
    return ours, f"paper {row['paper']:.2f} ({row['delta']:+.2f})"


def _ood_setting(row: dict[str, Any]) -> str:
    """The OOD table's setting cell: the run's (recipe and every option that differs, so two
    prompt variants' rows read apart), or `published` for a published-only row."""
    return "published" if row.get("published") else str(row["setting"])


def _ood_cell_text(row: dict[str, Any], column: str) -> tuple[str, str]:
    """(ours, paper and delta) texts of one OOD cell, as Table I's cells: our mean +- std over
    seeds, and the paper's Table III number of the row's own method and backbone with our
    delta; a published-only row holds the paper's number alone."""
    paper = row["paper"][column]
    if row.get("published"):
        return "-", "" if paper is None else f"published {paper:.1f}"
    ours = "-" if row[column] is None else f"{row[column]:.2f} ± {row['std'][column]:.2f}"
    if paper is None:
        return ours, ""
    delta = row["delta"][column]
    return ours, f"paper {paper:.1f}" + ("" if delta is None else f" ({delta:+.2f})")


def _tables(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group aggregated rows into paper-shaped tables: (backbone, recipe, shots) -> cells."""
    groups: dict[tuple, dict[tuple[str, str], dict]] = defaultdict(dict)
    for row in rows:  # a published-only row stands in its setting's table (literature.py)
        groups[row["backbone"], row["setting"], row["shots"]][row["method"], row["dataset"]] = row
    tables = []
    for (backbone, recipe, shots), cells in sorted(groups.items()):
        # the paper's column order (Table I: report.ELEVEN), other datasets after it
        datasets = sorted({d for _, d in cells if d != ELEVEN_LAST}, key=lambda d: (
            ELEVEN.index(d) if d in ELEVEN else len(ELEVEN), d))
        if any(d == ELEVEN_LAST for _, d in cells):
            datasets.append(ELEVEN_LAST)
        methods = list(dict.fromkeys(m for m, _ in sorted(cells, key=_method_order)))
        tables.append({"backbone": backbone, "recipe": recipe, "shots": shots,
                       "datasets": datasets, "methods": methods, "cells": cells,
                       "notes": footnotes(list(cells.values()))})
    return tables


def _method_order(key: tuple[str, str]) -> int:
    """Ours in METHODS' order; Table I's published-only rows first, in the paper's order."""
    method = key[0].split(" ")[0]
    if method in FULL_ENCODER_METHODS:
        return FULL_ENCODER_METHODS.index(method) - len(FULL_ENCODER_METHODS)
    return METHODS.index(method) if method in METHODS else len(METHODS)


def _sources(plan: StudyPlan) -> list[dict[str, Any]]:
    """For each (dataset, backbone, variant, shots): the fit command and the result files."""
    groups: dict[tuple, list] = defaultdict(list)
    for run in plan.runs:
        groups[run.dataset, run.backbone.name, run.variant, run.shots].append(run)
    sources = []
    for (dataset, backbone, variant, shots), runs in sorted(groups.items()):
        first = runs[0]
        command = ["safe-cache", "fit", "--store", first.store, "--shots", str(shots),
                   "--seeds", ",".join(str(r.seed) for r in runs), "--recipe", first.recipe,
                   "--prompts", first.prompts, "--out", str(plan.out / "results" / variant),
                   *(["--classifier", first.classifier] if first.classifier != "text" else []),
                   *_fit_flags(plan.study, dataset)]
        sources.append({"dataset": dataset, "backbone": backbone, "variant": variant,
                        "shots": shots, "command": shlex.join(command),
                        "files": [str(r.path) for r in runs if r.path.is_file()]})
    return sources


def _fit_flags(study: Any, dataset: str) -> list[str]:
    """The study's methods and [fit] options as fit's command line (fit/config's field names,
    spelt as the CLI spells them), so a cell's command reproduces its results."""
    from .spec import CLI_SPELLINGS

    spelt = {field: option for option, field in CLI_SPELLINGS.items()}
    optional = [m for m in study.methods if m not in ("zero_shot", "safe")]
    flags = ["--methods", ",".join(optional) or "none"]
    if dataset == "imagenet" and study.ood:
        flags += ["--eval-ood", ",".join(study.ood)]
    for key, value in sorted(study.fit.items()):
        flag = "--" + spelt.get(key, key).replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--" + "no-" + flag[2:])  # --cuda-graph's negative
        elif isinstance(value, (list, tuple)):
            flags += [flag, ",".join(f"{v:g}" if isinstance(v, float) else str(v)
                                     for v in value)]
        else:
            flags += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return flags


def _plots(plan: StudyPlan, rows, runs) -> list[Path]:
    from ..analysis.report import write_plots

    shown: dict[str, Any] = {}
    for run in sorted(runs, key=lambda r: (-r.shots, r.seed)):  # one curve plot per dataset
        shown.setdefault(run.dataset, run)
    return write_plots(rows, runs, plan.out / "plots", curve_runs=list(shown.values()))


def _load_runs(plan: StudyPlan) -> list:
    from ..fit.results import load_result

    return [load_result(r.path) for r in plan.runs if r.path.is_file()]


def write_report(plan: StudyPlan) -> tuple[dict[str, Any], list[Path]]:
    """Write study.md, study.html and study.json under the study's out folder."""
    from ..analysis.costs import cost_rows
    from ..analysis.report import aggregate

    runs = _load_runs(plan)
    rows = _variant_settings(aggregate(runs), runs) if runs else []
    report = {"study": plan.study.name, "description": plan.study.description,
              "safe_cache": __version__,
              "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "tables": _tables(rows), "ood": ood_rows(runs) if runs else [],
              "costs": cost_rows(runs),
              "figure": (plan.study.paper, figure_rows(rows, plan.study.paper,
                                                        published_keys(plan.study)))
              if plan.study.paper in FIGURES else None,
              "sources": _sources(plan), "runs": len(runs)}
    plots = _plots(plan, rows, runs) if runs else []
    plan.out.mkdir(parents=True, exist_ok=True)
    pages = [plan.out / "study.md", plan.out / "study.html", plan.out / "study.json"]
    atomic_write_text(pages[0], _markdown(report, plots, plan.out))
    atomic_write_text(pages[1], _html(report, plots))
    serialisable = {**report, "tables": [{**t, "cells": {f"{m}|{d}": c for (m, d), c in
                                                         t["cells"].items()}}
                                         for t in report["tables"]]}
    atomic_write_text(pages[2], json.dumps(serialisable, indent=2, default=str) + "\n")
    return report, pages


def _variant_settings(rows: list[dict[str, Any]], runs: list) -> list[dict[str, Any]]:
    """A variant's results folder names its recipe x prompt set: the tables' setting is that
    name, then any other option that tells the group apart (report.setting_label's)."""
    variant = {run.group[:12]: run.path.parents[2].name for run in runs}
    for row in rows:
        if row["group"] in variant:
            extra = [p for p in row["setting"].split(", ")[1:]
                     if not p.startswith(("prompts ", "classifier "))]
            row["setting"] = ", ".join([variant[row["group"]], *extra])
    return rows


def _markdown(report: dict[str, Any], plots: list[Path], out: Path) -> str:
    lines = [f"# Study {report['study']}", "", report["description"], "",
             f"safe-cache {report['safe_cache']}, {report['written']}; {report['runs']} runs.",
             ""]
    for table in report["tables"]:
        lines += [f"## {table['backbone']}, {table['recipe']}, {table['shots']} shots", "",
                  "| method | " + " | ".join(table["datasets"]) + " |",
                  "|---|" + "---|" * len(table["datasets"])]
        for method in table["methods"]:
            cells = []
            for dataset in table["datasets"]:
                ours, paper = _cell_text(table["cells"].get((method, dataset)))
                cells.append(ours + (f"<br>{paper}" if paper else ""))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += ["", *(f"- {note}" for note in table["notes"])]
        lines.append("")
    if report.get("figure"):
        lines += figure_markdown(*report["figure"])
    if report["ood"]:
        lines += ["## ImageNet and its variants (16 shots)", "",
                  "| backbone | setting | method | imagenet | -v2 | -sketch | -a | -r |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in report["ood"]:
            values = []
            for column in OOD_COLUMNS:
                ours, paper = _ood_cell_text(row, column)
                values.append(ours + (f"<br>{paper}" if paper else ""))
            lines.append(f"| {row['backbone']} | {_ood_setting(row)} | {row['method']} | "
                         + " | ".join(values) + " |")
        lines += ["", *(f"- {note}" for note in footnotes(report["ood"])), ""]
    if report["costs"]:
        lines += ["## Seconds per run (mean over runs; max)", "",
                  "| backbone | setting | method | shots | seconds | max | runs |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {c['backbone']} | {c['setting']} | {c['method']} | {c['shots']} |"
                  f" {c['seconds']:.2f} | {c['max_seconds']:.2f} | {c['runs']} |"
                  for c in report["costs"]]
        lines.append("")
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(out)})" for p in plots] + [""]
    lines += ["## Where each cell comes from", ""]
    for source in report["sources"]:
        lines += [f"- {source['dataset']}, {source['backbone']}, {source['variant']},"
                  f" {source['shots']} shots: `{source['command']}`; files:"
                  f" {', '.join(source['files']) or 'none yet'}"]
    return "\n".join(lines) + "\n"


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(path.stem)}</figcaption></figure>")


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:right}th:first-child,td:first-child{text-align:left}.paper{color:#666;
font-size:85%}img{max-width:640px}figure{display:inline-block;margin:8px}
code{font-size:85%}"""


def _html(report: dict[str, Any], plots: list[Path]) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Study"
             f" {e(report['study'])}</title><style>{STYLE}</style></head><body>",
             f"<h1>Study {e(report['study'])}</h1><p>{e(report['description'])}</p>",
             f"<p>safe-cache {e(report['safe_cache'])}, {e(report['written'])};"
             f" {report['runs']} runs.</p>"]
    for table in report["tables"]:
        parts.append(f"<h2>{e(table['backbone'])}, {e(table['recipe'])}, {table['shots']}"
                     f" shots</h2><table><tr><th>method</th>"
                     + "".join(f"<th>{e(d)}</th>" for d in table["datasets"]) + "</tr>")
        for method in table["methods"]:
            cells = []
            for dataset in table["datasets"]:
                ours, paper = _cell_text(table["cells"].get((method, dataset)))
                cells.append(f"<td>{e(ours)}<br><span class='paper'>{e(paper)}</span></td>")
            parts.append(f"<tr><td>{e(method)}</td>{''.join(cells)}</tr>")
        parts.append("</table>" + "".join(f"<p class='paper'>{e(note)}</p>"
                                          for note in table["notes"]))
    if report.get("figure"):
        parts.append(figure_html(*report["figure"]))
    if report["ood"]:
        columns = OOD_COLUMNS
        parts.append("<h2>ImageNet and its variants (16 shots)</h2><table><tr><th>backbone</th>"
                     "<th>setting</th><th>method</th>"
                     + "".join(f"<th>{c}</th>" for c in columns) + "</tr>")
        for row in report["ood"]:
            cells = []
            for column in columns:
                ours, paper = _ood_cell_text(row, column)
                cells.append(f"<td>{e(ours)}<br><span class='paper'>{e(paper)}</span></td>")
            parts.append(f"<tr><td>{e(row['backbone'])}</td><td>{e(_ood_setting(row))}</td>"
                         f"<td>{e(row['method'])}</td>{''.join(cells)}</tr>")
        parts.append("</table>" + "".join(f"<p class='paper'>{e(note)}</p>"
                                          for note in footnotes(report["ood"])))
    if report["costs"]:
        parts.append("<h2>Seconds per run (mean over runs; max)</h2><table><tr>"
                     + "".join(f"<th>{c}</th>" for c in ("backbone", "setting", "method",
                                                        "shots", "seconds", "max", "runs"))
                     + "</tr>")
        parts += [f"<tr><td>{e(c['backbone'])}</td><td>{e(c['setting'])}</td>"
                  f"<td>{e(c['method'])}</td><td>{c['shots']}</td><td>{c['seconds']:.2f}</td>"
                  f"<td>{c['max_seconds']:.2f}</td><td>{c['runs']}</td></tr>"
                  for c in report["costs"]]
        parts.append("</table>")
    parts.append("<h2>Plots</h2>" + "".join(_image(p) for p in plots))
    parts.append("<h2>Where each cell comes from</h2><ul>")
    for s in report["sources"]:
        files = "".join(f"<li><code>{e(f)}</code></li>" for f in s["files"])
        parts.append(f"<li>{e(s['dataset'])}, {e(s['backbone'])}, {e(s['variant'])},"
                     f" {s['shots']} shots: <code>{e(s['command'])}</code><ul>{files}</ul></li>")
    parts.append("</ul></body></html>")
    return "\n".join(parts)
