"""report aggregates hand-made result files: means, stds, the 11-dataset average, the paper."""

from __future__ import annotations

import json
import re
import statistics

import pytest
from click.testing import CliRunner
from factories import result_record, write_record

from safe_cache.analysis.report import (
    ELEVEN,
    aggregate,
    beta_change_lines,
    load_results,
    published,
    render,
    write_plots,
)
from safe_cache.cli import main
from safe_cache.fit.results import load_result


def run(dataset: str, shots: int, seed: int, safe: float, zero: float, model: str = "RN50"):
    return result_record(dataset, shots, seed, safe, zero, model)


def write(folder, result, backbone="RN50-openai"):
    write_record(folder, result, backbone)


def test_means_stds_and_paper_deltas(tmp_path):
    for seed, acc in ((1, 0.78), (2, 0.80), (3, 0.82)):
        write(tmp_path, run("food101", 16, seed, acc, 0.77))
    rows = {(r["dataset"], r["shots"], r["method"]): r for r in aggregate(load_results(tmp_path))}
    safe = rows[("food101", 16, "safe")]
    assert safe["mean"] == pytest.approx(80.0) and safe["seeds"] == 3
    assert safe["std"] == pytest.approx(statistics.stdev([78.0, 80.0, 82.0]))
    paper = published()["table_1"]["methods"]["safe"]["food101"]["16"]
    assert safe["paper"] == paper == 79.66 and safe["delta"] == pytest.approx(80.0 - 79.66)
    zero = rows[("food101", 16, "zero_shot")]
    assert zero["paper"] == 77.31  # zero-shot compares with the paper's 0-shot row


def test_eleven_dataset_average_and_other_backbones(tmp_path):
    for index, dataset in enumerate(ELEVEN):
        write(tmp_path, run(dataset, 1, 1, 0.5 + 0.01 * index, 0.4))
    write(tmp_path, run("food101", 1, 1, 0.9, 0.4, model="ViT-B-16"), "ViT-B-16-openai")
    rows = aggregate(load_results(tmp_path))
    average = [r for r in rows if r["dataset"] == "average" and r["method"] == "safe"]
    assert len(average) == 1  # only RN50 has all 11 datasets
    assert average[0]["mean"] == pytest.approx(100 * statistics.fmean(
        0.5 + 0.01 * i for i in range(11)))
    assert average[0]["paper"] == 66.17
    vit = [r for r in rows if r["backbone"] == "ViT-B-16-openai"]
    assert vit and all(r["paper"] is None for r in vit)  # Table I is RN50 only


@pytest.mark.slow  # matplotlib renders eight PNGs
def test_formats_and_plots(tmp_path):
    for seed in (1, 2):
        for shots in (1, 2):
            write(tmp_path / "results", run("dtd", shots, seed, 0.5 + 0.1 * seed, 0.4))
    rows = aggregate(load_results(tmp_path / "results"))
    assert render(rows, "md").startswith("| dataset |")
    assert render(rows, "csv").splitlines()[0].startswith("dataset,backbone,setting,shots")
    assert json.loads(render(rows, "json"))[0]["dataset"] == "dtd"
    written = write_plots(rows, load_results(tmp_path / "results"), tmp_path / "plots")
    names = sorted(p.name for p in written)
    curves = [f"curves_dtd_RN50-openai_shots{k}_seed{s}_safe.png" for k in (1, 2) for s in (1, 2)]
    assert names == sorted(["accuracy_vs_shots_dtd.png", "beta_curve_dtd.png",
                            "beta_change_dtd.png", *curves,
                            "grid_dtd_shots1.png", "grid_dtd_shots2.png"])  # runs keep curves
    for path in written:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    cli = CliRunner().invoke(main, ["report", str(tmp_path / "results"), "--plots",
                                    str(tmp_path / "cli-plots")])
    assert cli.exit_code == 0, cli.output
    assert "dtd / RN50-openai" in cli.output and "± " in cli.output
    assert len(list((tmp_path / "cli-plots").glob("*.png"))) == len(names)


def test_a_malformed_result_file_is_named(tmp_path):
    write(tmp_path, run("dtd", 1, 1, 0.5, 0.4))
    bad = tmp_path / "dtd" / "RN50-openai" / "shots2_seed1.json"
    bad.write_text("{not json")
    cli = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert cli.exit_code == 2 and "shots2_seed1.json" in cli.output and "JSON" in cli.output
    record = result_record("dtd", 4, 1, 0.5, 0.4)
    del record["methods"]["safe"]["test_acc"]
    write(tmp_path, record)
    bad.unlink()
    cli = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert cli.exit_code == 2 and "methods.safe.test_acc" in cli.output


def test_a_result_of_the_previous_release_is_refused_naming_it(tmp_path):
    """A result JSON written by safe-cache 0.1 (tests/data/): refused in one line naming the
    file and the fix, by load_results and by report."""
    from pathlib import Path

    from safe_cache import ResultFormatError

    source = Path(__file__).parent / "data" / "result_v0_1.json"
    target = tmp_path / "shapes" / "safe-cache-tiny-vit-random0" / "shots1_seed1.json"
    target.parent.mkdir(parents=True)
    target.write_text(source.read_text())
    with pytest.raises(ResultFormatError, match=r"safe-cache 0\.1") as info:
        load_results(tmp_path)
    assert str(target) in str(info.value) and "--force" in str(info.value)
    cli = CliRunner().invoke(main, ["report", str(tmp_path)])
    lines = [line for line in cli.output.splitlines() if line.strip()]
    assert cli.exit_code == 2 and len(lines) == 1, cli.output
    assert "shots1_seed1.json" in lines[0] and "fit it again with --force" in lines[0]


def test_costs_are_each_methods_mean_seconds_per_run(tmp_path):
    from safe_cache.analysis.costs import cost_rows

    for seed, seconds in ((1, 2.0), (2, 4.0)):
        record = run("dtd", 4, seed, 0.6, 0.4)
        record["methods"]["gda"] = {"val_acc": 0.5, "test_acc": 0.5}
        record["timings"]["methods_s"] = {"gda": seconds, "clap": 9.0}  # clap: not in methods
        record["timings"]["train_s"] = 10.0 * seed
        write(tmp_path, record)
    reference = result_record("dtd", 4, 1, 0.6, 0.4, protocol="reference")
    reference["methods"]["gda"] = {"val_acc": 0.5, "test_acc": 0.5, "protocol": "reference"}
    reference["timings"]["methods_s"] = {"gda": 100.0}
    write(tmp_path, reference)
    costs = {(c["method"], c["setting"]): c for c in cost_rows(load_results(tmp_path))}
    assert costs["gda", "safe"]["seconds"] == 3.0 and costs["gda", "safe"]["max_seconds"] == 4.0
    assert costs["safe", "safe"]["seconds"] == 15.0 and costs["safe", "safe"]["runs"] == 2
    apart = costs["gda (reference)", "safe, protocol reference"]  # never averaged with ours
    assert apart["seconds"] == 100.0 and apart["runs"] == 1
    assert not [m for m, _ in costs if m == "clap"]


@pytest.mark.parametrize("timings, needle", [
    ({"train_s": -1.0}, "timings.train_s is -1.0"),
    ({"train_s": None}, "timings.train_s is None"),
    ({"methods_s": {"gda": "fast"}}, "timings.methods_s.gda is 'fast'"),
    ({"methods_s": [1, 2]}, "timings.methods_s is not an object"),
])
def test_edited_timings_are_refused_naming_the_file(tmp_path, timings, needle):
    from safe_cache.fit.results import ResultError

    record = run("dtd", 4, 1, 0.6, 0.4)
    record["timings"].update(timings)
    path = write_record(tmp_path, record)  # sealed as fit seals it: only the check can refuse
    with pytest.raises(ResultError, match=re.escape(needle)):
        load_result(path)
    record["timings"] = "x"
    path = write_record(tmp_path / "x", record)
    with pytest.raises(ResultError, match="'timings' is not an object"):
        load_result(path)


def test_the_change_from_beta_zero_is_per_split_and_setting(tmp_path):
    """Fig. 5's lines: the source test set and each OOD variant, mean over seeds of
    acc(beta) - acc(0)."""
    for seed, safe in ((1, 0.6), (2, 0.8)):
        curve = [{"beta": b, "test_acc": 0.5 + 0.1 * b * seed} for b in (0.0, 0.5, 1.0)]
        ood = {"imagenet_v2": {"zero_shot": 0.4, "safe": 0.5, "images": 10, "classes": 1000,
                               "beta_curve": {"made": "post hoc", "points": curve}}}
        write(tmp_path / "results", result_record("imagenet", 16, seed, safe, 0.4, ood=ood))
    lines = beta_change_lines(load_results(tmp_path / "results"))
    assert set(lines) == {"test, 16 shots", "imagenet_v2, 16 shots"}
    betas, change = lines["imagenet_v2, 16 shots"]
    assert betas == [0.0, 0.5, 1.0]
    assert change == pytest.approx([0.0, 100 * 0.05 * 3 / 2, 100 * 0.1 * 3 / 2])
    # result_record's source curve falls by 0.1 per unit of beta, whatever the seed
    assert lines["test, 16 shots"][1] == pytest.approx([0.0, -5.0, -10.0])
