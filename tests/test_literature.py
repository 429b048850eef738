"""Published numbers beside ours: Table I's full-encoder methods as published-only rows, a
workbench method's own paper beside its row of the same backbone, dashed lines in the plot."""

from __future__ import annotations

import pytest
from factories import result_record, write_record

from safe_cache.analysis import literature
from safe_cache.analysis.report import aggregate, load_results, render
from safe_cache.analysis.tables import report_tables


def _rows(tmp_path, record, backbone="RN50-openai"):
    write_record(tmp_path, record, backbone)
    return aggregate(load_results(tmp_path))


def test_table_one_methods_a_store_cannot_run_are_published_only_rows(tmp_path):
    rows = _rows(tmp_path, result_record("dtd", 4, 1, 0.6, 0.4))
    published = {r["method"]: r for r in rows if r.get("published")}
    assert set(published) == set(literature.FULL_ENCODER_METHODS)
    table = literature.safe_paper()["table_1"]["methods"]
    assert published["coop"]["paper"] == table["coop"]["dtd"]["4"] == 53.49
    assert published["cupl"]["paper"] == table["cupl"]["dtd"]["0"]  # a 0-shot method
    for row in published.values():
        assert row["mean"] is None and row["delta"] is None and row["shots"] == 4
        assert "Table I" in row["source"]
    assert "| dtd | RN50-openai | safe | 4 | coop | - |" in render(rows, "md")
    write_record(tmp_path, result_record("dtd", 4, 1, 0.6, 0.4, iters=400))  # another setting
    rows = aggregate(load_results(tmp_path))
    settings = {r["setting"] for r in rows if r.get("published")}
    assert settings == {"safe"}  # never in the table of a setting off the paper's protocol
    assert any("CoOp" in str(t.columns[1]._cells) for t in report_tables(rows))


def test_no_published_row_beside_runs_off_the_papers_protocol(tmp_path):
    for record, backbone in ((result_record("dtd", 4, 1, 0.6, 0.4, pretrained=None),
                              "RN50-random0"),
                             (result_record("dtd", 4, 1, 0.6, 0.4, iters=400), None)):
        rows = _rows(tmp_path / (backbone or "iters"), record, backbone or "RN50-openai")
        assert not [r for r in rows if r.get("published")]
    vit = _rows(tmp_path / "vit", result_record("dtd", 4, 1, 0.6, 0.4, model="ViT-B-16"),
                "ViT-B-16-openai")
    assert not [r for r in vit if r.get("published")]  # Table I reports RN50 only


def test_a_workbench_method_stands_beside_its_own_papers_number(tmp_path, monkeypatch):
    papers = {"methods": {"gda": {"ViT-B-16": {
        "source": {"paper": "Wang et al., ICLR 2024", "table": "Table 9"},
        "numbers": {"dtd": {"4": 60.5}}}}}}
    monkeypatch.setattr(literature, "workbench_papers", lambda: papers)

    def rows_of(folder, record):
        return {r["method"]: r for r in _rows(tmp_path / folder, record, "ViT-B-16-openai")}

    record = result_record("dtd", 4, 1, 0.6, 0.4, model="ViT-B-16")
    record["methods"]["gda"] = {"val_acc": 0.5, "test_acc": 0.625, "protocol": "reference"}
    rows = rows_of("reference", record)  # GDA's paper searched as --protocol reference does
    gda = rows["gda (reference)"]
    assert gda["paper"] == 60.5 and gda["delta"] == pytest.approx(2.0)
    assert gda["source"] == "Wang et al., ICLR 2024, Table 9"
    assert rows["safe"]["paper"] is None and "RN50" in rows["safe"]["paper_note"]
    record["methods"]["gda"] = {"val_acc": 0.5, "test_acc": 0.625}  # ours: min(K, 4)-shot val
    ours = rows_of("ours", record)["gda"]
    assert ours["paper"] is None and "--protocol reference" in ours["paper_note"]
    off = result_record("dtd", 4, 1, 0.6, 0.4, model="ViT-B-16", prompts="cupl.json")
    off["methods"]["gda"] = {"val_acc": 0.5, "test_acc": 0.625, "protocol": "reference"}
    note = rows_of("off", off)["gda (reference)"]["paper_note"]
    assert "prompts" in note and "RN50" not in note  # its own paper reports ViT-B-16


def test_every_published_block_says_under_which_protocol_it_stands():
    blocks = {(m, b) for m, per in literature.workbench_papers()["methods"].items() for b in per}
    assert blocks == set(literature.PUBLISHED_PROTOCOL)
    assert set(literature.PUBLISHED_PROTOCOL.values()) <= {"reference", "ours", None}


@pytest.mark.slow
def test_the_plot_draws_published_numbers_dashed(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from safe_cache.analysis.report import _published_lines

    for shots in (1, 2):
        write_record(tmp_path, result_record("dtd", shots, 1, 0.6, 0.4))
    rows = aggregate(load_results(tmp_path))
    figure, axis = plt.subplots()
    _published_lines(axis, rows)
    lines = {line.get_label(): line for line in axis.get_lines()}
    assert {"coop (published)", "safe (published)"} <= set(lines)
    assert "zero_shot (published)" not in lines and "cupl (published)" not in lines
    coop = lines["coop (published)"]
    assert coop.get_linestyle() == "--" and list(coop.get_xdata()) == [1, 2]
    table = literature.safe_paper()["table_1"]["methods"]["coop"]["dtd"]
    assert list(coop.get_ydata()) == [table["1"], table["2"]]
    plt.close(figure)
