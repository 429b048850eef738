"""`safe-cache report`: aggregate result records (one per run, as CLIP_benchmark does) into tables
beside the paper's published numbers, and plots. The rich tables the CLI prints are in tables.py.

Mean and standard deviation over seeds per dataset x backbone x setting x shots x method
(accuracy %; a setting is a run identity less the seed, so different options are never
averaged), the 11-dataset average where all 11 are present, and the paper's Table I value and
our delta beside rows of the paper's setting only (`paper_reasons` says why not, elsewhere);
Table III (out of distribution) is ood_table.py's. Plots (PNG): accuracy vs shots per method
(the paper's Fig. 2), SAFE's beta curve and its change from beta = 0 (Fig. 5's axes), and the
lr x wd grid's validation accuracy as a heat map.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..fit.identity import changed_options
from ..fit.results import METHODS, RunResult, load_results
from .literature import TABLE_I, published_number, published_rows, safe_paper

# The 11 datasets in the order of the paper's Table I columns (Aircraft, ImageNet, DTD, ...)
ELEVEN = ("fgvc_aircraft", "imagenet", "dtd", "eurosat", "caltech101", "food101",
          "oxford_flowers", "oxford_pets", "stanford_cars", "sun397", "ucf101")
__all__ = ["aggregate", "footnotes", "load_results", "paper_reasons", "published", "render",
           "setting_label", "write_plots"]


def published() -> dict[str, Any]:
    """The SAFE paper's tables (literature.py holds every published number and its source)."""
    return safe_paper()


TEST_SELECTED = " (test-selected)"
# Options whose change makes a run no longer the paper's protocol (fit/identity.OPTION_FIELDS).
PAPER_OPTIONS = ("lrs", "wds", "iters", "batch_size", "eval_every", "beta", "blend",
                 "tip_epochs")
# Options that change which numbers a run holds, not the numbers themselves: its methods set,
# and the OOD stores it also tested on. Left out of the setting's label (they stay in the
# identity), so an ImageNet run with OOD stores sits in the same table as the other datasets.
UNLABELLED = ("methods", "eval_ood")


REFERENCE = " (reference)"


def method_label(method: str, values: dict[str, Any]) -> str:
    """The method's row name: a method run as its authors' code runs it (fit --protocol
    reference), or with an epoch chosen on test, is labelled, so its numbers are never
    averaged with ours."""
    if values.get("protocol") == "reference":
        return method + REFERENCE
    return method + (TEST_SELECTED if values.get("selected_on") == "test" else "")


def base_method(label: str) -> str:
    """The method a row label names (its protocol suffix removed)."""
    return label.removesuffix(REFERENCE).removesuffix(TEST_SELECTED)


def setting_label(run: RunResult) -> str:
    """What tells the run's group from a default fit's: the recipe, then every option that
    differs (`safe, beta 0.9, iters 40`), test selection and a partial test split."""
    parts = [run.recipe_name]
    parts += [f"{name} {_text(value)}" for name, value in
              changed_options(run.options).items() if name not in UNLABELLED]
    if run.selected_on == "test":
        parts.append("test-selected")
    if run.partial:
        parts.append(f"partial test {run.partial['rows']}/{run.partial['expected']}")
    return ", ".join(parts)


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def paper_reasons(run: RunResult, models: tuple[str, ...] = ("RN50",)) -> list[str]:
    """Why a run is not the paper's setting (empty when it is): the paper's number stands only
    beside runs of its backbone with OpenAI weights, the attention-pool cut, hand prompts and
    their frozen classifier, the `safe` recipe with the paper's grid, iterations, batch and
    beta, selected on val, whole."""
    reasons = []
    model, pretrained = run.backbone.get("model"), run.backbone.get("pretrained")
    if model not in models:
        reasons.append(f"the paper reports {' and '.join(models)}, not {model}")
    if pretrained != "openai":
        reasons.append(f"weights {pretrained or 'random'}, not OpenAI's")
    if run.backbone.get("cut", "pool") != "pool":
        reasons.append(f"cut {run.backbone['cut']}, not the attention pool")
    options = run.options
    if options["prompts"] != "hand":
        reasons.append(f"prompts {options['prompts']}, not the hand templates")
    if options.get("classifier", "text") != "text":
        reasons.append(f"classifier {options['classifier']}, not the frozen text classifier")
    if run.recipe_name != "safe":
        reasons.append(f"recipe {run.recipe_name}, not the paper's (safe)")
    changed = [n for n in PAPER_OPTIONS if n in changed_options(options)]
    if changed:
        reasons.append(f"{', '.join(changed)} not the paper's")
    if run.selected_on == "test":
        reasons.append("selected on test")
    if run.partial:
        reasons.append("a partial test split")
    return reasons


def aggregate(runs: list[RunResult]) -> list[dict[str, Any]]:
    """One row per dataset x backbone x setting x shots x method: mean and std (%) over seeds.
    A setting is one run identity less the seed (fit/identity.py): runs of different options,
    stores or recipes are never averaged together, and each seed counts once."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    first: dict[tuple, RunResult] = {}
    seen: set[tuple] = set()
    for run in runs:
        key = (run.dataset, run.backbone_label, run.shots, run.group)
        if (key, run.seed) in seen:
            continue  # load_results keeps each run once; a caller's list may not
        seen.add((key, run.seed))
        first.setdefault(key, run)
        for method, values in run.methods.items():
            groups[(*key, method_label(method, values))].append(100 * values["test_acc"])
    labels = _setting_labels(first)
    rows = []
    for (dataset, backbone, shots, group, method), values in sorted(
            groups.items(), key=lambda item: (item[0][:3], labels[item[0][:4]], item[0][4])):
        run = first[dataset, backbone, shots, group]
        rows.append({"dataset": dataset, "backbone": backbone, "model": run.backbone["model"],
                     "recipe": run.recipe_name, "setting": labels[dataset, backbone, shots,
                                                                  group],
                     "group": group[:12], "shots": shots, "method": method,
                     "mean": statistics.fmean(values),
                     "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                     "seeds": len(values), "reasons": paper_reasons(run),
                     "protocol_reasons": paper_reasons(run, (run.backbone["model"],))})
    rows += _averages(rows)
    rows = _with_paper(rows)
    return rows + published_rows(rows)


def _setting_labels(first: dict[tuple, RunResult]) -> dict[tuple, str]:
    """Each group's setting label; two groups of one label (another store content, another
    recipe detail) get their identity's first digits, so they never read as one."""
    labels = {key: setting_label(run) for key, run in first.items()}
    count: dict[tuple, int] = defaultdict(int)
    for (dataset, backbone, shots, _), label in labels.items():
        count[dataset, backbone, shots, label] += 1
    return {key: label + (f" #{key[3][:6]}" if count[(*key[:3], label)] > 1 else "")
            for key, label in labels.items()}


def _averages(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The 11-dataset average, where every one of the 11 benchmarks has a row."""
    by_key: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        key = (row["backbone"], row["model"], row["setting"], row["shots"], row["method"])
        by_key[key][row["dataset"]] = row
    averages = []
    for (backbone, model, setting, shots, method), datasets in sorted(by_key.items()):
        if all(name in datasets for name in ELEVEN):
            means = [datasets[name]["mean"] for name in ELEVEN]
            reasons = sorted({r for name in ELEVEN for r in datasets[name]["reasons"]})
            protocol = sorted({r for name in ELEVEN
                               for r in datasets[name]["protocol_reasons"]})
            averages.append({"dataset": "average", "backbone": backbone, "model": model,
                             "recipe": datasets[ELEVEN[0]]["recipe"], "setting": setting,
                             "group": None, "shots": shots, "method": method,
                             "mean": statistics.fmean(means), "std": 0.0,
                             "seeds": min(datasets[n]["seeds"] for n in ELEVEN),
                             "reasons": reasons, "protocol_reasons": protocol})
    return averages


def _with_paper(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add the published number (Table I, or the method's own paper for the row's backbone)
    and our delta, beside rows of the source's protocol only; elsewhere the reason it is left
    out (`paper_note`, report's footnotes). A row of a backbone no source reports notes the
    Table I number it does not stand beside."""
    for row in rows:
        method = base_method(row["method"])
        found = published_number(method, row["model"], row["dataset"], row["shots"])
        reasons = list(row["protocol_reasons"])
        if found is None:  # Table I reports RN50 only
            found, reasons = published_number(method, "RN50", row["dataset"], row["shots"]), \
                list(row["reasons"])
        if found is not None and found[2] != TABLE_I and found[2] != row_protocol(row):
            reasons.append(_protocol_reason(found[2]))
        row["paper"] = row["delta"] = row["paper_note"] = row["source"] = None
        if found is not None and not reasons:
            row["paper"], row["delta"], row["source"] = found[0], row["mean"] - found[0], found[1]
        elif found is not None:
            row["paper_note"] = "; ".join(reasons)
    return rows


def row_protocol(row: dict[str, Any]) -> str:
    """The protocol a row's runs followed: reference (fit --protocol reference), or ours."""
    return "reference" if row["method"].endswith(REFERENCE) else "ours"


def _protocol_reason(published: str | None) -> str:
    if published is None:
        return "published under a protocol no fit runs (its source says how)"
    return ("published under the authors' protocol (fit --protocol reference)"
            if published == "reference" else "published without the reference protocol")


def footnotes(rows: list[dict[str, Any]]) -> list[str]:
    """One line per reason a paper number was left out, in the order first met."""
    return list(dict.fromkeys(f"paper '-': {reason}" for row in rows if row.get("paper_note")
                              for reason in row["paper_note"].split("; ")))


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    """md, csv or json text of the aggregated rows."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    columns = ["dataset", "backbone", "setting", "shots", "method", "mean", "std", "seeds",
               "paper", "delta"]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row, c) for c in columns) + " |")
    notes = footnotes(rows)
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def cell(row: dict[str, Any], column: str) -> str:
    """A row's value as table text: 2 decimals, the delta signed, '-' for none."""
    value = row[column]
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.2f}" if column == "delta" else f"{value:.2f}"
    return str(value)


def write_plots(rows: list[dict[str, Any]], runs: list[RunResult], folder: str | Path,
                curve_runs: list[RunResult] | None = None) -> list[Path]:
    """accuracy_vs_shots_<dataset>.png, beta_curve_<dataset>.png, beta_change_<dataset>.png
    (with beta = 0 among a run's betas; its OOD variants too), grid_<dataset>_shots<K>.png,
    and curves_<dataset>_<backbone>_<result name>.png for each run with training curves among
    `curve_runs` (default: every run; a study draws one per dataset)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset in sorted({r["dataset"] for r in rows}):
        figure, axis = plt.subplots(figsize=(6, 4))
        mine = [r for r in rows if r["dataset"] == dataset]
        ours = [r for r in mine if not r.get("published")]
        recipes = sorted({r["setting"] for r in ours})
        methods = [m for m in METHODS if any(r["method"] == m for r in ours)]
        for recipe, method in ((r, m) for r in recipes for m in methods):
            points = sorted((r["shots"], r["mean"], r["std"]) for r in ours
                            if r["method"] == method and r["setting"] == recipe)
            if points:
                shots, means, stds = zip(*points, strict=True)
                label = method if len(recipes) == 1 else f"{method} [{recipe}]"
                axis.errorbar(shots, means, yerr=stds, marker="o", capsize=3, label=label)
        _published_lines(axis, mine)
        axis.set(xscale="log", xlabel="shots per class", ylabel="test accuracy (%)",
                 title=f"{dataset}: accuracy vs shots")
        axis.set_xticks(sorted({r["shots"] for r in rows}), minor=False)
        axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
        written.append(_save(figure, folder / f"accuracy_vs_shots_{dataset}.png"))
    for run in runs if curve_runs is None else curve_runs:
        if run.curves:
            name = f"curves_{run.dataset}_{run.backbone_label}_{run.path.stem if run.path else ''}"
            written.append(_curves_plot(plt, run, folder / f"{name}.png"))
    for dataset in sorted({r.dataset for r in runs}):
        mine = [r for r in runs if r.dataset == dataset]
        written.append(_beta_plot(plt, mine, folder / f"beta_curve_{dataset}.png"))
        if any(p["beta"] == 0 for r in mine for p in r.beta_curve):
            written.append(_beta_change_plot(plt, mine, folder / f"beta_change_{dataset}.png"))
        for shots in sorted({r.shots for r in mine}):
            groups = _by_group([r for r in mine if r.shots == shots])
            for index, group in enumerate(groups):
                suffix = f"_{index + 1}" if len(groups) > 1 else ""
                written.append(_grid_plot(plt, group,
                                          folder / f"grid_{dataset}_shots{shots}{suffix}.png"))
    plt.close("all")
    return written


def _published_lines(axis: Any, rows: list[dict[str, Any]]) -> None:
    """Published numbers as dashed lines, one per method and backbone: the published-only rows
    and the paper's numbers beside ours (zero-shot methods, one number for every shot count,
    are left to the solid lines)."""
    lines: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for row in rows:
        method = base_method(row["method"])
        if row.get("paper") is not None and method not in ("zero_shot", "cupl"):
            lines[method, row["backbone"]][row["shots"]] = row["paper"]
    several = len({backbone for _, backbone in lines}) > 1
    for (method, backbone), points in sorted(lines.items()):
        shots = sorted(points)
        label = f"{method} (published" + (f", {backbone})" if several else ")")
        axis.plot(shots, [points[k] for k in shots], linestyle="--", marker="x", linewidth=1,
                  label=label)


def shots_text(shots: int) -> str:
    return f"{shots} shot" + ("s" if shots != 1 else "")


def _curves_plot(plt, run: RunResult, path: Path) -> Path:
    """Every configuration's val accuracy (left) and training loss (right) at every evaluation;
    the chosen configuration drawn bold and its best point marked."""
    curves, safe = run.curves, run.methods["safe"]
    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for index, config in enumerate(run.grid):
        chosen = (config["lr"], config["wd"]) == (safe.get("lr"), safe.get("wd"))
        label = f"lr {config['lr']:g}, wd {config['wd']:g}" + (" (chosen)" if chosen else "")
        style = {"linewidth": 2.5, "color": "black", "zorder": 3} if chosen else \
            {"linewidth": 1, "alpha": 0.8}
        accuracy_axis.plot(curves["iters"], [100 * a[index] for a in curves["val_acc"]],
                           label=label, **style)
        loss_axis.plot(curves["iters"], [loss[index] for loss in curves["train_loss"]],
                       label=label, **style)
        if chosen:
            accuracy_axis.scatter([config["best_iter"]], [100 * config["val_acc"]], s=80,
                                  marker="*", color="red", zorder=4, label="restored state")
    accuracy_axis.set(xlabel="updates done (the result's best_iter counts the same way)",
                      ylabel="val accuracy (%)",
                      title=f"{run.dataset}, {shots_text(run.shots)}, seed {run.seed}:"
                      f" {run.recipe_name}")
    loss_axis.set(xlabel="updates", ylabel="training loss", yscale="log")
    accuracy_axis.legend(fontsize=6, ncol=2)
    for axis in (accuracy_axis, loss_axis):
        axis.grid(alpha=0.3)
    return _save(figure, path)


def _by_group(runs: list[RunResult]) -> list[list[RunResult]]:
    """Runs split by setting (identity less the seed), in the order first met: a plot averages
    the seeds of one setting only."""
    groups: dict[str, list[RunResult]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return list(groups.values())


def _beta_plot(plt, runs: list[RunResult], path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(6, 4))
    several = len({r.group for r in runs}) > len({r.shots for r in runs})
    for group in sorted(_by_group(runs), key=lambda g: g[0].shots):
        curves = [r.beta_curve for r in group]
        betas = [p["beta"] for p in curves[0] if p["beta"] <= 10]
        means = [100 * statistics.fmean(c[i]["test_acc"] for c in curves)
                 for i in range(len(betas))]
        label = shots_text(group[0].shots) + (f" [{setting_label(group[0])}]" if several
                                               else "")
        axis.plot(betas, means, marker="o", label=label)
    axis.set(xlabel="beta (weight of the original pooling)", ylabel="test accuracy (%)",
             title=f"{runs[0].dataset}: SAFE's blend")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return _save(figure, path)


def beta_change_lines(runs: list[RunResult]) -> dict[str, tuple[list[float], list[float]]]:
    """The paper's Fig. 5 as data: per setting's shots and per split (the source's test set,
    every OOD variant all its runs were tested on), the betas (up to 10) and the mean over seeds
    of test accuracy at each minus at beta = 0, in points. Post hoc, as fit makes it: one head
    per run, trained and chosen at the run's beta, evaluated at each beta."""
    lines = {}
    for group in sorted(_by_group(runs), key=lambda g: g[0].shots):
        splits = {"test": [{p["beta"]: p["test_acc"] for p in r.beta_curve} for r in group]}
        for name in sorted(set.intersection(*(set(r.ood or {}) for r in group))):
            curves = [(r.ood or {})[name].get("beta_curve") for r in group]
            if all(curves):
                splits[name] = [{p["beta"]: p["test_acc"] for p in c["points"]} for c in curves]
        for name, curves in splits.items():
            betas = sorted(b for b in set.intersection(*(set(c) for c in curves)) if b <= 10)
            if 0.0 in betas:
                lines[f"{name}, {shots_text(group[0].shots)}"] = (betas, [
                    100 * statistics.fmean(c[b] - c[0.0] for c in curves) for b in betas])
    return lines


def _beta_change_plot(plt, runs: list[RunResult], path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(6, 4))
    for label, (betas, change) in beta_change_lines(runs).items():
        axis.plot(betas, change, marker="o", label=label)
    trained_at = ", ".join(f"{b:g}" for b in sorted({r.config["beta"] for r in runs}))
    axis.axhline(0, color="grey", linewidth=0.8)
    axis.set(xlabel="beta (weight of the original pooling)",
             ylabel="change from beta = 0 (points)",
             title=f"{runs[0].dataset}: SAFE's blend, post hoc over one head per run trained"
                   f" at beta = {trained_at}")
    axis.title.set_fontsize(8)
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    return _save(figure, path)


def _grid_plot(plt, runs: list[RunResult], path: Path) -> Path:
    lrs = sorted({g["lr"] for g in runs[0].grid}, reverse=True)
    wds = sorted({g["wd"] for g in runs[0].grid})
    values = [[100 * statistics.fmean(g["val_acc"] for r in runs for g in r.grid
                                      if g["lr"] == lr and g["wd"] == wd) for wd in wds]
              for lr in lrs]
    figure, axis = plt.subplots(figsize=(5, 4))
    image = axis.imshow(values, cmap="viridis", aspect="auto")
    figure.colorbar(image, ax=axis, label="val accuracy (%)")
    axis.set_xticks(range(len(wds)), [f"{w:g}" for w in wds])
    axis.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    axis.set(xlabel="weight decay", ylabel="learning rate",
             title=f"{runs[0].dataset}, {runs[0].shots} shots: lr x wd"
             f" [{setting_label(runs[0])}]")
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            axis.text(j, i, f"{value:.1f}", ha="center", va="center", color="white", fontsize=8)
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
