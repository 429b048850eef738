"""Studies: a whole table over miniatures of all 11 datasets and ImageNet's 4 variants with a
tiny model, end to end; a second run does no work; runs killed in extract and in fit finish with
the same result files; dry runs; bad study files; the report page in a real headless browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from miniatures import write_every_layout, write_split_zhou

from safe_cache import ConfigError, DatasetError
from safe_cache.analysis.report import ELEVEN as PAPER_ORDER
from safe_cache.cli import main
from safe_cache.fit.methods import METHODS
from safe_cache.study import list_studies, load_study, plan_study, run

ELEVEN = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
          "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]
FAST = """
[[backbones]]
model = "safe-cache-tiny-rn"
pretrained = "none"

[extract]
views = 1
workers = 0

[fit]
iters = 20
eval_every = 10
lrs = [1e-3]
wds = [0.0]
tip_epochs = 2
device = "cpu"
"""


def study_file(folder: Path, datasets: list[str], *, ood: tuple[str, ...] = (),
               shots=(1, 16), methods=None, name: str = "mini", extra: str = "") -> Path:
    methods = methods or ["zero_shot", "linear_probe", "tip_adapter", "tip_adapter_f", "safe",
                          "safe_a"]
    text = (f'name = "{name}"\ndescription = "a miniature study"\n'
            f"datasets = {json.dumps(datasets)}\nood = {json.dumps(list(ood))}\n"
            f"shots = {json.dumps(list(shots))}\nseeds = [1]\nmethods = {json.dumps(methods)}\n"
            f"{extra}\n{FAST}")
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def result_accuracies(out: Path) -> dict[str, dict[str, float]]:
    """Every result file under out/results, by relative path: its methods' test accuracy."""
    found = {}
    for path in sorted((out / "results").rglob("*.json")):
        record = json.loads(path.read_text())
        found[str(path.relative_to(out))] = {m: v["test_acc"] for m, v in
                                             record["methods"].items()}
    return found


@pytest.fixture(scope="module")
def whole_study(tmp_path_factory):
    """The 11 datasets + 4 ImageNet variants, run once (shared by the tests that read it)."""
    folder = tmp_path_factory.mktemp("study")
    write_every_layout(folder / "data")
    path = study_file(folder, ELEVEN, ood=("imagenet_v2", "imagenet_sketch", "imagenet_a",
                                           "imagenet_r"))
    result = run(load_study(path), folder / "data", stores=str(folder / "stores"),
                 out=folder / "out")
    return folder, path, result


@pytest.mark.slow
def test_whole_study_runs_end_to_end(whole_study):
    folder, _, result = whole_study
    assert len(result.extracted) == 15  # 11 datasets + 4 variants, one backbone
    assert result.fitted == 11 * 2 and result.skipped == 0
    report = json.loads((folder / "out" / "study.json").read_text())
    sixteen = next(t for t in report["tables"] if t["shots"] == 16)
    # the paper's Table I order (Aircraft, ImageNet, DTD, ...), the 11-dataset average last
    assert sixteen["datasets"] == [*PAPER_ORDER, "average"] and sorted(PAPER_ORDER) == \
        sorted(ELEVEN) and PAPER_ORDER[:3] == ("fgvc_aircraft", "imagenet", "dtd")
    assert {m for m in sixteen["methods"]} >= {"zero_shot", "safe", "safe_a", "linear_probe"}
    assert report["ood"] and report["ood"][0]["imagenet_r"] is not None
    assert all(s["files"] for s in report["sources"])  # every cell names its result files
    plots = sorted(p.name for p in (folder / "out" / "plots").iterdir())
    for dataset in ELEVEN:  # beta curves and grids from every run: both shot counts
        assert {f"beta_curve_{dataset}.png", f"grid_{dataset}_shots1.png",
                f"grid_{dataset}_shots16.png"} <= set(plots), dataset
    assert sum(p.startswith("curves_") for p in plots) == 11  # one training-curve plot each
    markdown = (folder / "out" / "study.md").read_text()
    assert "safe-cache fit --store" in markdown and "| safe_a |" in markdown
    costs = {(c["method"], c["shots"]): c for c in report["costs"]}  # what each method cost
    assert {m for m, _ in costs} >= {"safe", "safe_a", "linear_probe", "tip_adapter"}
    assert all(c["runs"] == 11 and 0 <= c["seconds"] <= c["max_seconds"] for c in costs.values())
    assert "## Seconds per run" in markdown


@pytest.mark.slow
def test_a_finished_study_run_again_does_no_work(whole_study):
    folder, path, _ = whole_study
    before = result_accuracies(folder / "out")
    again = run(load_study(path), folder / "data", stores=str(folder / "stores"),
                out=folder / "out")
    assert again.extracted == [] and again.fitted == 0 and again.skipped == 22
    assert result_accuracies(folder / "out") == before


def _study_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    log = open(cwd / "study-cli.log", "ab")  # noqa: SIM115  (closed when the test ends)
    return subprocess.Popen([sys.executable, "-m", "safe_cache.cli", "study", "run", *args],
                            cwd=cwd, env=env, stdout=log, stderr=log, start_new_session=True)


def _kill_when(process: subprocess.Popen, ready, timeout: float = 120.0) -> bool:
    """SIGKILL the process (group) as soon as `ready()` holds; False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if ready():
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.02)
    process.wait()
    return False


@pytest.mark.slow
def test_killed_in_extract_and_in_fit_finishes_with_the_same_results(tmp_path):
    write_split_zhou(tmp_path / "data", "dtd", classes=3)
    write_split_zhou(tmp_path / "data", "eurosat", classes=3)
    path = study_file(tmp_path, ["dtd", "eurosat"], shots=(1, 2), methods=["zero_shot", "safe"])
    reference = run(load_study(path), tmp_path / "data", stores=str(tmp_path / "ref-stores"),
                    out=tmp_path / "ref")
    assert reference.fitted == 4
    args = [str(path), "--root", str(tmp_path / "data"), "--store-root",
            str(tmp_path / "stores"), "--out", str(tmp_path / "out")]
    stores, results = tmp_path / "stores", tmp_path / "out" / "results"
    killed_extract = _kill_when(_study_cli(args, tmp_path),
                                lambda: any(stores.rglob("zarr.json")))
    assert killed_extract and not results.exists()  # killed before any fit
    killed_fit = _kill_when(_study_cli(args, tmp_path),
                            lambda: results.exists() and any(results.rglob("*.json")))
    log = tmp_path / "study-cli.log"
    assert killed_fit, log.read_text(errors="replace")[-3000:]
    finished = _study_cli(args, tmp_path)
    assert finished.wait(timeout=300) == 0, log.read_text(errors="replace")[-3000:]
    assert result_accuracies(tmp_path / "out") == result_accuracies(tmp_path / "ref")


@pytest.mark.slow
def test_dry_run_lists_stores_runs_and_every_missing_folder(tmp_path):
    write_split_zhou(tmp_path / "data", "dtd", classes=3)
    path = study_file(tmp_path, ["dtd", "eurosat", "food101"], shots=(1,))
    plan = plan_study(load_study(path), tmp_path / "data", stores=str(tmp_path / "stores"),
                      out=tmp_path / "out")
    assert [(s.dataset, s.status) for s in plan.stores] == \
        [("dtd", "create"), ("eurosat", "no data"), ("food101", "no data")]
    assert plan.stores[0].bytes > 0 and plan.disk_bytes == plan.stores[0].bytes
    assert len(plan.missing) == 2 and "eurosat" in plan.missing[0] and \
        "food101" in plan.missing[1] and "datasets fetch eurosat" in plan.missing[0]
    assert [(r.dataset, r.status) for r in plan.runs] == \
        [("dtd", "todo"), ("eurosat", "todo"), ("food101", "todo")]
    assert plan.seconds is None and "no measured throughput" in plan.estimate_note
    result = CliRunner().invoke(main, ["study", "run", str(path), "--root",
                                       str(tmp_path / "data"), "--store-root",
                                       str(tmp_path / "stores"), "--dry-run", "--json"])
    assert result.exit_code == 1  # missing data: a dry run says so in its status too
    listed = json.loads(result.stdout)
    assert listed["runs"]["todo"] == 3 and len(listed["missing"]) == 2
    assert not (tmp_path / "stores").exists()  # nothing was written
    with pytest.raises(DatasetError, match=r"2 dataset\(s\) cannot be read .* nothing was run"):
        run(load_study(path), tmp_path / "data", stores=str(tmp_path / "stores"),
            out=tmp_path / "out")
    assert not (tmp_path / "stores").exists()


@pytest.mark.slow
def test_dry_run_estimates_time_from_measured_throughput(tmp_path):
    write_split_zhou(tmp_path / "data", "dtd", classes=3)
    path = study_file(tmp_path, ["dtd"], shots=(1,))
    path.write_text(path.read_text().replace('model = "safe-cache-tiny-rn"', 'model = "RN50"')
                    .replace('pretrained = "none"', 'pretrained = "openai"'))
    plan = plan_study(load_study(path), tmp_path / "data", out=tmp_path / "out")
    images = plan.stores[0].images
    assert plan.seconds == pytest.approx(images / 9.33 + 20 * 0.3895)
    assert plan.estimate_note.endswith("(docs/performance.md)")  # nothing left out
    path.write_text(path.read_text().replace("seeds = [1]", 'seeds = [1]\nlinear = ["hand"]')
                    .replace('"safe_a"]', '"safe_a", "gda"]'))
    plan = plan_study(load_study(path), tmp_path / "data", out=tmp_path / "out")
    assert plan.estimate_note.endswith("; not counted: the classifier's Linear Fine-tuning and"
                                       " the workbench methods")


@pytest.mark.parametrize("edit, message", [
    ('seeds = [1]\n',
     r"line \d+: unknown study key 'seedz' \(did you mean 'seeds'\?\); allowed: backbones"),
    ('"dtd"', r"line 3: unknown dataset 'dtdd'; allowed: caltech101, dtd,"),
    ('model = "safe-cache-tiny-rn"', r"line \d+: unknown model 'RN5O'; allowed: open_clip names"),
    ('"safe_a"', r"line 7: unknown method 'safe_b'; allowed: zero_shot, linear_probe"),
    ('iters = 20', r"line \d+: unknown fit key 'iterations'.*; allowed: batch_size"),
    ('eval_every = 10', r"line \d+: unknown fit key 'classifier' \(a study fine-tunes the"
                        r" classifier per prompt set: linear = \[\"<prompt set>\"\]"),
    ('seeds = [1]\n', r"line \d+: a prompt file may not be named like the built-in set 'mined'"),
])
def test_bad_study_file_names_file_line_and_allowed_values(tmp_path, edit, message):
    path = study_file(tmp_path, ["dtd"])
    bad = {'seeds = [1]\n': 'seedz = [1]\n', '"dtd"': '"dtdd"',
           'model = "safe-cache-tiny-rn"': 'model = "RN5O"', '"safe_a"': '"safe_b"',
           'iters = 20': 'iterations = 20',
           'eval_every = 10': 'eval_every = 10\nclassifier = "linear"'}[edit]
    if "prompt file" in message:
        (tmp_path / "mined.json").write_text("{}")
        bad = 'seeds = [1]\nprompts = ["hand", "mined.json"]\n'
    path.write_text(path.read_text().replace(edit, bad, 1))
    with pytest.raises(ConfigError, match=rf"{path}, {message}"):
        load_study(path)


def test_two_backbones_writing_one_store_are_refused(tmp_path):
    path = study_file(tmp_path, ["dtd"])
    path.write_text(path.read_text() + '\n[[backbones]]\nmodel = "safe-cache-tiny-rn"\n'
                    'pretrained = "none"\n')
    with pytest.raises(ConfigError, match=r"two backbones write the same store"
                                          r" \(safe-cache-tiny-rn-random0\)"):
        load_study(path)


def test_two_variants_writing_one_result_folder_are_refused(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "cupl.json").write_text("{}")
    path = study_file(tmp_path, ["dtd"], extra='prompts = ["a/cupl.json", "b/cupl.json"]')
    with pytest.raises(ConfigError, match=r"two recipe x prompt-set variants write the same"
                                          r" results \(safe-cupl\)"):
        load_study(path)


def test_shipped_studies_parse_and_list():
    names = {s.name for s in list_studies()}
    assert names == {"table1-rn50", "table1-vitb16", "table3-ood", "ablation-beta",
                     "ablation-layer4", "ablation-prompts", "recipes", "workbench"}
    table1 = load_study("table1-rn50")
    assert len(table1.datasets) == 11 and table1.shots == (1, 2, 4, 8, 16)
    assert table1.seeds == (1, 2, 3) and "safe_a" in table1.methods
    assert load_study("table3-ood").ood == ("imagenet_v2", "imagenet_sketch", "imagenet_a",
                                           "imagenet_r")
    assert [b.cut for b in load_study("ablation-layer4").backbones] == ["pool", "layer4"]
    bench = load_study("workbench")
    assert set(bench.methods) == {*METHODS} and len(bench.datasets) == 11
    assert [b.model for b in bench.backbones] == ["RN50", "ViT-B-16"] and bench.seeds == (1, 2, 3)
    result = CliRunner().invoke(main, ["study", "list", "--json"])
    assert {row["name"] for row in json.loads(result.stdout)} == names
    with pytest.raises(ConfigError, match=r"No study 'table2'.*ablation-beta"):
        load_study("table2")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_report_page_renders_in_a_headless_browser(whole_study):
    """Open study.html in Chromium (Debian's package): the tables' cells are there and every
    embedded plot decodes to a non-empty image; a screenshot is not blank."""
    folder, _, _ = whole_study
    browser_path = _chromium()
    if browser_path is None:
        if os.environ.get("SAFE_CACHE_REQUIRE_BROWSER"):
            pytest.fail("Chromium is not installed (.ci/run installs Debian's `chromium`).")
        pytest.skip("no Chromium here (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    page_path = folder / "out" / "study.html"
    assert "src=\"http" not in page_path.read_text()  # self-contained: no external files
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path,
                                             args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        cells = page.locator("table td").count()
        images = page.evaluate("""() => Promise.all([...document.images].map(
            img => img.decode().then(() => [img.naturalWidth, img.naturalHeight],
                                      () => [0, 0])))""")
        headers = page.locator("h2").all_inner_texts()
        shot = page.screenshot(full_page=False)
        browser.close()
    assert cells >= 6 * 12  # 6 methods x (11 datasets + average), in one table at least
    assert images and all(w > 0 and h > 0 for w, h in images), images
    assert any("16 shots" in h for h in headers) and any("variants" in h for h in headers)
    from io import BytesIO

    from PIL import Image

    screenshot = Image.open(BytesIO(shot)).convert("L")
    low, high = screenshot.getextrema()
    assert high - low > 100  # text and plots on the page, not a blank render


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_planned_run_paths_are_the_files_fit_writes(tmp_path):
    """Run paths come from fit's own naming, select_on included (a test-selected run's file
    is named so); store names are extract's, with an ablation cut."""
    write_split_zhou(tmp_path / "data", "dtd", classes=3)
    path = study_file(tmp_path, ["dtd"], shots=(1,), methods=["zero_shot", "safe"])
    text = path.read_text().replace("device = \"cpu\"", "device = \"cpu\"\nselect_on = \"test\"")
    path.write_text(text)
    plan = plan_study(load_study(path), tmp_path / "data", stores=str(tmp_path / "stores"),
                      out=tmp_path / "out")
    [planned] = plan.runs
    assert planned.path.parent == (tmp_path / "out" / "results" / "safe" / "dtd"
                                   / "safe-cache-tiny-rn-random0")
    # the study's short fit and its methods differ from a default fit: their options' hash
    assert re.fullmatch(r"shots1_seed1_safe_test-selected_o[0-9a-f]{8}\.json", planned.path.name)
    assert plan.stores[0].url == f"{tmp_path / 'stores'}/dtd/safe-cache-tiny-rn-random0.zarr"
    result = run(load_study(path), tmp_path / "data", stores=str(tmp_path / "stores"),
                       out=tmp_path / "out")
    assert result.fitted == 1 and planned.path.is_file()
    again = plan_study(load_study(path), tmp_path / "data", stores=str(tmp_path / "stores"),
                       out=tmp_path / "out")
    assert [r.status for r in again.runs] == ["done"]
    assert [s.status for s in again.stores] == ["present"]


def test_a_studys_tables_take_the_configs_fields_and_defaults():
    """One source: [fit] / [extract] keys are the configs' fields (less the study's own), and
    a study's defaults are FitConfig's."""
    from dataclasses import fields

    from safe_cache.defaults import default_of
    from safe_cache.extract.config import ExtractConfig
    from safe_cache.fit.config import FitConfig
    from safe_cache.study.spec import EXTRACT_KEYS, FIT_KEYS, Study

    assert {f.name for f in fields(FitConfig)} > FIT_KEYS
    assert {f.name for f in fields(ExtractConfig)} > EXTRACT_KEYS
    assert {"lrs", "wds", "iters", "cuda_graph", "cache"} <= FIT_KEYS
    assert not {"store", "out", "force", "shots"} & FIT_KEYS
    assert {"views", "writer_threads", "decode", "task_images"} <= EXTRACT_KEYS
    assert not {"takeover", "store", "model"} & EXTRACT_KEYS
    study = Study(name="s", path=None, datasets=("dtd",), backbones=())
    assert (study.shots, study.seeds, study.prompts) == (
        default_of(FitConfig, "shots"), default_of(FitConfig, "seeds"),
        (default_of(FitConfig, "prompts"),))


def test_execution_settings_in_a_study_point_at_study_runs_options(tmp_path):
    from safe_cache.errors import ConfigError

    study = tmp_path / "s.toml"
    study.write_text('name = "s"\ndatasets = ["dtd"]\n'
                     'backbones = [{model = "RN50", pretrained = "openai"}]\n'
                     '[fit]\nlocal_workers = 2\n')
    with pytest.raises(ConfigError, match=r"`study run --scheduler ADDRESS` or `--local-workers"):
        load_study(study)


def test_a_study_asking_for_the_whole_val_split_plans_its_rows(tmp_path):
    """[extract] full_val = true: the plan counts every val row, so a store holding only the
    few-shot ones is extended (fit --protocol reference searches on them all)."""
    from safe_cache.study.plan import _wanted_rows

    write_split_zhou(tmp_path / "data", "dtd", classes=3)
    few = load_study(study_file(tmp_path, ["dtd"], shots=(1,)))
    whole = load_study(study_file(tmp_path, ["dtd"], shots=(1,), name="whole"))
    whole.extract["full_val"] = True  # as `[extract] full_val = true` sets it
    rows_few = _wanted_rows(few, "dtd", tmp_path / "data", test_only=False)
    rows_whole = _wanted_rows(whole, "dtd", tmp_path / "data", test_only=False)
    assert rows_few["val"] == 3 and rows_whole["val"] > rows_few["val"]  # 1 shot x 3 classes
    assert {k: v for k, v in rows_whole.items() if k != "val"} == \
        {k: v for k, v in rows_few.items() if k != "val"}


def test_each_cells_command_is_the_fit_the_study_runs(tmp_path):
    """The page's "where each cell comes from" command, parsed by fit's own CLI, names the
    methods and every [fit] option the study's runs used."""
    import shlex

    from safe_cache.study.page import _fit_flags
    from safe_cache.study.plan import fit_config

    path = study_file(tmp_path, ["dtd"], shots=(1,), methods=["zero_shot", "safe", "workbench"])
    study = load_study(path)
    study.fit.update(protocol="reference", betas=[0.0, 0.5], cuda_graph=False)  # as [fit] sets
    flags = _fit_flags(study, "dtd")
    command = main.commands["fit"]
    params = command.make_context("fit", ["--store", "s.zarr", *shlex.split(shlex.join(flags))]
                                  ).params
    wanted = fit_config(study, "s.zarr", "dtd", "safe", "hand", tmp_path / "out")
    for name in ("methods", "lrs", "wds", "iters", "eval_every", "tip_epochs", "protocol",
                 "betas", "cuda_graph", "device"):
        assert params[name] == getattr(wanted, name), name


def test_the_pages_ood_table_stands_beside_table_iii(tmp_path):
    """The study page's OOD cells are laid out as its Table I cells: our mean +- std, then the
    paper's Table III number of the same method and backbone with our delta; a method absent
    from Table III (Tip-Adapter) shows ours alone; Table III's full-encoder methods are
    published-only rows; a run off the paper's setting gets a footnote, no number."""
    from factories import ood_record, write_record

    from safe_cache.analysis.ood_table import ood_rows
    from safe_cache.fit.results import load_results
    from safe_cache.study.page import _html, _markdown

    write_record(tmp_path / "paper", ood_record(1))
    write_record(tmp_path / "off", ood_record(1, iters=400))
    for folder in ("paper", "off"):
        report = {"study": "t", "description": "d", "safe_cache": "0", "written": "now",
                  "runs": 1, "tables": [], "costs": [], "sources": [],
                  "ood": ood_rows(load_results(tmp_path / folder))}
        markdown, page = _markdown(report, [], tmp_path), _html(report, [])
        lines = {line.split(" | ")[2]: line for line in markdown.splitlines()
                 if line.startswith("| RN50-openai |")}
        if folder == "paper":  # SAFE: 66 % on ImageNet, 61 % on -V2; the paper's 65.9, 57.7
            assert "| 66.00 ± 0.00<br>paper 65.9 (+0.10) | 61.00 ± 0.00<br>paper 57.7 (+3.30) |" \
                in lines["safe"]
            assert "paper" not in lines["tip_adapter"] and "62.00 ± 0.00" in lines["tip_adapter"]
            assert "| published | coop_m4 | -<br>published 63.0 |" in lines["coop_m4"]
            assert "<td>66.00 ± 0.00<br><span class='paper'>paper 65.9 (+0.10)</span></td>" \
                in page
            assert "paper '-'" not in markdown
        else:
            assert "coop_m4" not in lines and "paper" not in lines["safe"]
            assert lines["safe"].startswith("| RN50-openai | safe, iters 400 | safe |")
            assert "- paper '-': iters not the paper's" in markdown
            assert "<p class='paper'>paper &#x27;-&#x27;: iters not the paper&#x27;s</p>" in page


def test_table3_ood_runs_every_table_iii_method_a_store_can():
    """table3-ood's methods: each row of the paper's Table III that runs from a store (zero-shot,
    linear probing, Tip-Adapter-F, SAFE, SAFE-A), plus only the training-free Tip-Adapter; each
    one with an OOD predictor, so its variants' accuracies reach the page."""
    from safe_cache.analysis.literature import safe_paper

    study = load_study("table3-ood")
    table = safe_paper()["table_3"]
    runnable = {m for methods in table["backbones"].values() for m in methods if m in METHODS}
    assert runnable == {"zero_shot", "linear_probe", "tip_adapter_f", "safe", "safe_a"}
    assert set(study.methods) == runnable | {"tip_adapter"}
    assert study.paper == "table_3" and study.shots == (table["shots"],)
    assert study.datasets == (table["source"],)
    assert {b.model for b in study.backbones} == set(table["backbones"])


def test_ablation_layer4_tests_imagenet_of_both_cuts_out_of_distribution(tmp_path):
    """Section IV-D2 is about accuracy and OOD: ImageNet's runs of the pool and layer4 cuts are
    tested on the 4 variants, each cut on its own variant stores (test split only); the other
    10 datasets' runs get no OOD stores, in the plan and in each cell's command."""
    from safe_cache.study.page import _fit_flags
    from safe_cache.study.plan import fit_config

    study = load_study("ablation-layer4")
    variants = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
    assert study.ood == variants and len(study.datasets) == 11
    plan = plan_study(study, tmp_path / "data", stores=str(tmp_path / "stores"),
                      out=tmp_path / "out")
    tested = sorted((s.dataset, s.backbone.cut) for s in plan.stores if s.test_only)
    assert tested == sorted((v, cut) for v in variants for cut in ("pool", "layer4"))
    assert {s.url for s in plan.stores if s.test_only and s.backbone.cut == "layer4"} == {
        f"{tmp_path}/stores/{v}/RN50-openai-layer4.zarr" for v in variants}
    assert not any(r.dataset in variants for r in plan.runs)  # variants are only tested on
    for dataset in study.datasets:
        config = fit_config(study, "s.zarr", dataset, "safe", "hand", tmp_path / "out")
        flags = _fit_flags(study, dataset)
        if dataset == "imagenet":
            assert config.eval_ood == variants and ",".join(variants) in flags
        else:
            assert config.eval_ood == () and "--eval-ood" not in flags
    # fit resolves each variant beside its source store: the layer4 store's own variants
    from safe_cache.fit.ood import resolve_ood_stores

    layer4 = next(s for s in plan.stores if s.dataset == "imagenet" and s.backbone.cut == "layer4")
    assert set(resolve_ood_stores(variants, layer4.url, layer4.card).values()) == {
        s.url for s in plan.stores if s.test_only and s.backbone.cut == "layer4"}


@pytest.mark.slow  # 10 miniature stores and 2 fits
def test_a_layer4_study_tests_imagenet_on_its_variants_end_to_end(tmp_path):
    """ablation-layer4's shape on miniatures: both cuts' ImageNet runs hold every variant's
    accuracy for zero-shot and SAFE, and the page's OOD table has a row per cut and method."""
    write_every_layout(tmp_path / "data")
    variants = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
    layer4 = '[[backbones]]\nmodel = "safe-cache-tiny-rn"\npretrained = "none"\ncut = "layer4"\n'
    path = study_file(tmp_path, ["imagenet"], ood=variants, shots=(16,),
                      methods=["zero_shot", "safe"], extra=layer4)
    result = run(load_study(path), tmp_path / "data", stores=str(tmp_path / "stores"),
                 out=tmp_path / "out")
    assert len(result.extracted) == 10 and result.fitted == 2
    for record_path in (tmp_path / "out" / "results").rglob("*.json"):
        record = json.loads(record_path.read_text())
        assert set(record["ood"]) == set(variants), record_path
        assert all({"zero_shot", "safe"} <= set(v) for v in record["ood"].values())
    report = json.loads((tmp_path / "out" / "study.json").read_text())
    assert sorted((r["backbone"], r["method"]) for r in report["ood"]) == [
        (b, m) for b in ("safe-cache-tiny-rn-random0", "safe-cache-tiny-rn-random0-layer4")
        for m in ("safe", "zero_shot")]


@pytest.mark.slow
def test_a_fig8_study_runs_mined_and_linear_variants_and_its_page_shows_them(tmp_path):
    """Template Mining and Linear Fine-tuning through a study: extract stores the pool for
    `mined`, fit runs `-linear` variants with the classifier fine-tuned, and the page's Fig. 8
    table lists every variant (ours only: a tiny model is not the paper's setting)."""
    from miniatures import write_imagenet

    write_imagenet(tmp_path / "data")
    path = study_file(tmp_path, ["imagenet"], shots=(1,), methods=["zero_shot", "safe"],
                      extra='paper = "figure_8"\nprompts = ["hand", "mined"]\n'
                            'linear = ["hand"]\n')
    study = load_study(path)
    assert [study.variant_name(*v) for v in study.variants] == [
        "safe-hand", "safe-hand-linear", "safe-mined"]
    result = run(study, tmp_path / "data", stores=str(tmp_path / "stores"), out=tmp_path / "out")
    assert result.fitted == 3
    folders = {p.parent.parent.parent.name: json.loads(p.read_text())
               for p in (tmp_path / "out" / "results").rglob("*.json")}
    assert set(folders) == {"safe-hand", "safe-mined", "safe-hand-linear"}
    assert folders["safe-hand"].get("text") is None
    assert len(folders["safe-mined"]["text"]["templates"]) == 21
    assert folders["safe-hand-linear"]["text"]["linear"]["selected_on"] == "val"
    page = (tmp_path / "out" / "study.md").read_text()
    table = page[page.index("## Figure 8"):].split("\n\n")[1]
    assert [line.split(" | ")[1] for line in table.splitlines()[2:]] == [
        "safe-hand", "safe-mined", "safe-hand-linear"]
    assert "paper " not in table  # random weights: no published number stands beside ours
    commands = [s["command"] for s in json.loads((tmp_path / "out" / "study.json").read_text())
                ["sources"]]
    assert sum("--classifier linear" in c for c in commands) == 1
