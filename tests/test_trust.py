"""Numbers mean exactly what they say: a result carries its whole identity, and nothing
untrusted (an edited manifest or result, NaN anywhere, an incomplete split, a renamed file)
becomes a number. Each test makes the bad thing and asserts the refusal or the new result."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import statistics
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from factories import extract_miniature, result_record, write_record

from safe_cache import ConfigError, ResultError, ResultFormatError, SafeCacheWarning, StoreError
from safe_cache.analysis.report import aggregate, load_results
from safe_cache.atomic import atomic_write_text, atomic_write_with
from safe_cache.cli import main
from safe_cache.fit import FitConfig, fit
from safe_cache.fit.results import load_result
from safe_cache.identity import manifest_seal
from safe_cache.names import inside, plain_name
from safe_cache.store import open_store
from safe_cache.store.verify import verify_store

MODEL = "safe-cache-tiny-rn"
SMALL = dict(shots=(1,), seeds=(1,), iters=4, eval_every=2, lrs=(1e-3,), wds=(0.0,),
             methods=("tip_adapter",))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    return extract_miniature(root, MODEL, root / "store.zarr",
                             counts={"train": 2, "val": 2, "test": 4})


@pytest.fixture
def store(source, tmp_path):
    copy = tmp_path / "store.zarr"
    shutil.copytree(source, copy)
    return copy


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def one_line_refusal(code: int, output: str, *needles: str, after_progress: bool = False
                     ) -> None:
    """exit 2, one non-empty line, no traceback, naming what is wrong (`after_progress`: the
    refusal came mid-run, so a progress bar stands before its one line)."""
    lines = [line for line in output.splitlines() if line.strip()]
    if after_progress:
        lines = [line for line in lines if line.startswith("error:")]
    assert code == 2, output
    assert len(lines) == 1 and "Traceback" not in output, output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def edit_manifest(store: Path, change, *, reseal: bool = False) -> None:
    """Edit the manifest in zarr.json as a person would (optionally recomputing the seal, as
    someone who knows the format would)."""
    path = store / "zarr.json"
    document = json.loads(path.read_text())
    manifest = document["attributes"]["safe_cache"]
    change(manifest)
    if reseal:
        manifest["manifest_sha256"] = manifest_seal(manifest)
    path.write_text(json.dumps(document))


# --- run identity ---------------------------------------------------------------------------

def _slow(*values: object) -> object:
    """A parameter CI runs and the fast loop leaves out (one or two of a kind stay fast)."""
    return pytest.param(*values, marks=pytest.mark.slow)


@pytest.mark.parametrize("change", [  # one in the fast loop, every one in CI
    {"beta": 0.9}, _slow({"methods": ()}), _slow({"lrs": (1e-2,)}), _slow({"iters": 6}),
    _slow({"betas": (0.0, 0.25, 1.0)}), _slow({"blend": "each"}),
    _slow({"select_on": "test", "methods": ("tip_adapter_f",)}), _slow({"eval_every": 1}),
    _slow({"batch_size": 2}),
])
def test_a_changed_option_never_returns_the_old_numbers(store, tmp_path, change):
    base = FitConfig(store=str(store), out=str(tmp_path / "r"), **SMALL)
    (first,) = fit(base)
    before = first.path.read_bytes()
    (second,) = fit(replace(base, **change))
    assert not second.skipped and second.path != first.path and second.path.is_file()
    assert first.path.read_bytes() == before  # the old result is kept, beside the new
    for name, value in change.items():
        recorded = second.config[name]
        assert (list(recorded) if isinstance(value, tuple) else recorded) == \
            (list(value) if isinstance(value, tuple) else value)
    assert second.identity_sha256 != first.identity_sha256
    (again,) = fit(replace(base, **change))  # the same options: the same run, skipped
    assert again.skipped and again.path == second.path


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_a_run_whose_store_changed_under_it_is_recomputed_and_says_why(store, tmp_path):
    config = FitConfig(store=str(store), out=str(tmp_path / "r"), **SMALL)
    (first,) = fit(config)
    with open_store(str(store), "a") as writable:  # skipped images change no run's numbers
        writable.record_skipped([{"split": "train", "error": "train/broken.jpg: unreadable"}])
    (again,) = fit(config)
    assert again.skipped and again.identity_sha256 == first.identity_sha256
    with open_store(str(store), "a") as writable:  # another text classifier: other numbers
        sentences = writable.prompt_sentences("hand")
        weights = -writable.classifier("hand")
        embeddings, _ = writable.sentence_embeddings("hand")
        writable.write_classifier("hand", weights, sentences, -embeddings)
    (second,) = fit(config)
    assert not second.skipped and second.path == first.path
    assert second.identity_sha256 != first.identity_sha256
    assert "recomputed" in second.note and "prompts_sha256" in second.note
    assert load_result(first.path).identity_sha256 == second.identity_sha256  # never the old


@pytest.mark.slow
def test_fit_table_says_which_options_differ(store, tmp_path):
    base = FitConfig(store=str(store), out=str(tmp_path / "r"), **SMALL)
    fit(base)
    code, output = invoke("fit", "--store", store, "--out", tmp_path / "r", "--shots", "1",
                          "--seeds", "1", "--iters", "4", "--eval-every", "2", "--lr", "1e-3",
                          "--wd", "0", "--methods", "tip_adapter", "--beta", "0.9")
    assert code == 0, output
    assert "beta 0.5 -> 0.9" in " ".join(output.split())


def test_results_of_other_options_are_grouped_apart_and_each_seed_counts_once(tmp_path):
    accuracies = {1: 0.40, 2: 0.60}
    for seed, acc in accuracies.items():
        write_record(tmp_path, result_record("dtd", 1, seed, acc, 0.3))
        write_record(tmp_path, result_record("dtd", 1, seed, acc + 0.1, 0.3,
                                             select_on="test"))
        write_record(tmp_path, result_record("dtd", 1, seed, acc + 0.2, 0.3, beta=0.9))
    rows = aggregate(load_results(tmp_path))
    zero = [r for r in rows if r["method"] == "zero_shot"]
    assert len(zero) == 3 and all(r["seeds"] == 2 for r in zero)  # never "seeds 4"
    safe = {r["setting"]: r for r in rows if r["method"] == "safe"}
    assert set(safe) == {"safe", "safe, test-selected", "safe, beta 0.9"}
    assert safe["safe"]["std"] == pytest.approx(statistics.stdev([40.0, 60.0]))
    assert safe["safe, beta 0.9"]["mean"] == pytest.approx(70.0)


def test_stray_copies_are_skipped_and_renamed_files_refused(tmp_path):
    path = write_record(tmp_path, result_record("dtd", 1, 1, 0.5, 0.3))
    shutil.copy(path, path.with_name(path.stem + ".bak.json"))
    shutil.copy(path, path.with_name(path.stem + " copy.json"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = load_results(tmp_path)
    assert len(runs) == 1 and sum(issubclass(w.category, SafeCacheWarning)
                                  for w in caught) == 2
    renamed = path.with_name(path.name.replace("seed1", "seed2"))
    shutil.copy(path, renamed)  # a second "seed" that is the first one's file
    with pytest.raises(ResultError, match="not shots1_seed2"):
        load_results(tmp_path)
    renamed.unlink()
    moved = tmp_path / "food101" / "RN50-openai" / path.name
    moved.parent.mkdir(parents=True)
    shutil.copy(path, moved)
    with pytest.raises(ResultError, match="holds dtd"):
        load_results(tmp_path)


@pytest.mark.parametrize("edit, needle", [
    (lambda r: r["methods"]["safe"].update(test_acc=True), "methods.safe.test_acc"),
    (lambda r: r.update(shots=2.0), "shots"),
    (lambda r: r.update(seed=True), "seed"),
    (lambda r: r["config"].update(beta=float("nan")), "NaN"),
    (lambda r: r["beta_curve"][0].update(test_acc=1.5), "beta_curve[0].test_acc"),
    (lambda r: r["grid"][0].update(val_acc=-0.1), "grid[0].val_acc"),
    (lambda r: r.update(dataset="../x"), "dataset"),
    (lambda r: r.update(surprise=1), "surprise"),
    (lambda r: r["methods"].update(magic={"val_acc": 1.0, "test_acc": 1.0}), "magic"),
])
def test_a_malformed_or_edited_result_is_refused(tmp_path, edit, needle):
    record = result_record("dtd", 1, 1, 0.5, 0.3)
    path = write_record(tmp_path, record)
    edit(record)
    path.write_text(json.dumps(record))  # json writes NaN as NaN: refused on read too
    code, output = invoke("report", tmp_path)
    one_line_refusal(code, output, needle)


def test_an_infinite_number_written_as_1e999_is_refused(tmp_path):
    path = write_record(tmp_path, result_record("dtd", 1, 1, 0.5, 0.3))
    path.write_text(path.read_text().replace('"norm_ratio_finetuned_over_original": 1.0',
                                             '"norm_ratio_finetuned_over_original": 1e999'))
    with pytest.raises(ResultError, match="not a finite number"):
        load_result(path)


@pytest.mark.slow
def test_an_edited_option_in_a_fitted_result_breaks_its_identity(store, tmp_path):
    (result,) = fit(FitConfig(store=str(store), out=str(tmp_path / "r"), **SMALL))
    document = json.loads(result.path.read_text())
    document["config"]["beta"] = 0.9  # the numbers stay beta 0.5's
    result.path.write_text(json.dumps(document))
    with pytest.raises(ResultError, match="content_sha256"):
        load_result(result.path)
    document["identity"]["options"]["beta"] = 0.9  # and its identity block: its hash breaks
    result.path.write_text(json.dumps(document))
    with pytest.raises(ResultError, match="identity_sha256"):
        load_result(result.path)


# --- the paper's number ----------------------------------------------------------------------

def _paper_cell(tmp_path: Path, record: dict, backbone: str = "RN50-openai") -> dict:
    write_record(tmp_path, record, backbone)
    (row,) = [r for r in aggregate(load_results(tmp_path)) if r["method"] == "safe"]
    shutil.rmtree(tmp_path / record["dataset"])
    return row


def test_the_paper_number_stands_beside_the_paper_setting_only(tmp_path):
    paper = _paper_cell(tmp_path, result_record("food101", 16, 1, 0.8, 0.77))
    assert paper["paper"] == 79.66 and paper["paper_note"] is None
    layer4 = result_record("food101", 16, 1, 0.8, 0.77)
    layer4["backbone"]["cut"] = "layer4"
    cases = [
        (layer4, "RN50-openai-layer4", "cut layer4"),
        (result_record("food101", 16, 1, 0.8, 0.77, prompts="cupl.json"), None, "prompts"),
        (result_record("food101", 16, 1, 0.8, 0.77, pretrained="yfcc15m"), "RN50-yfcc15m",
         "weights yfcc15m"),
        (result_record("food101", 16, 1, 0.8, 0.77, pretrained=None), "RN50-random0",
         "weights random"),
        (result_record("food101", 16, 1, 0.8, 0.77, recipe="views"), None, "recipe views"),
        (result_record("food101", 16, 1, 0.8, 0.77, lrs=[1e-3]), None, "lrs"),
        (result_record("food101", 16, 1, 0.8, 0.77, iters=400), None, "iters"),
        (result_record("food101", 16, 1, 0.8, 0.77, select_on="test"), None, "on test"),
        (result_record("food101", 16, 1, 0.8, 0.77, model="ViT-B-16"), "ViT-B-16-openai",
         "RN50"),
    ]
    for record, backbone, reason in cases:
        row = _paper_cell(tmp_path, record, backbone or "RN50-openai")
        assert row["paper"] is None and row["delta"] is None, reason
        assert reason in row["paper_note"], (reason, row["paper_note"])


def test_report_prints_a_footnote_per_reason(tmp_path):
    write_record(tmp_path, result_record("food101", 16, 1, 0.8, 0.77, prompts="cupl.json"))
    code, output = invoke("report", tmp_path, "--format", "md")
    assert code == 0, output
    assert "paper '-': prompts cupl, not the hand templates" in output


# --- nothing non-finite becomes a number ------------------------------------------------------

@pytest.mark.parametrize("values", [
    {"lrs": (math.nan,)}, {"lrs": (math.inf,)}, {"lrs": (1e308,)}, {"wds": (math.inf,)},
    {"beta": math.nan}, {"beta": -1.0}, {"betas": (math.nan, 0.5)}, {"iters": 10**9},
    {"betas": tuple(range(2000))}, {"iters": True}, {"tip_epochs": math.inf},
    {"lrs": tuple(10.0 ** -k for k in range(1, 10)), "wds": tuple(range(8))},
])
def test_non_finite_and_absurd_options_are_refused(values):
    with pytest.raises(ConfigError):
        FitConfig(store="s.zarr", **values)


def test_a_study_with_a_nan_value_is_refused_with_its_line(tmp_path):
    from safe_cache.study.spec import load_study

    path = tmp_path / "mine.toml"
    path.write_text('datasets = ["dtd"]\n[[backbones]]\nmodel = "RN50"\npretrained = "none"\n'
                    '[fit]\niters = 4\nbeta = nan\n')
    with pytest.raises(ConfigError, match=r"line 7: \[fit\] beta = nan"):
        load_study(path)


def _write_into(store: Path, array: str, value: float) -> None:
    """Write behind the store's back, as zarr lets anyone."""
    group = zarr.open_group(str(store), mode="r+", zarr_format=3, use_consolidated=False)
    node = group[array]
    data = node[...]
    data.reshape(-1)[0] = value
    node[...] = data


@pytest.mark.parametrize("array", [_slow("text/hand/classifier"), _slow("text/hand/embeddings"),
                                   _slow("test/pooled"), "test/dense"])
def test_nan_in_a_stored_array_never_becomes_an_accuracy(store, tmp_path, array):
    _write_into(store, array, math.nan)
    out = tmp_path / "r"
    code, output = invoke("fit", "--store", store, "--out", out, "--shots", "1", "--seeds", "1",
                          "--iters", "4", "--eval-every", "2", "--lr", "1e-3", "--wd", "0",
                          "--text-average", "raw" if "embeddings" in array else "normalised")
    # text arrays are read before training; test features as they stream in (a second read
    # of the whole test split before training would cost more than the check is worth)
    one_line_refusal(code, output, array.rsplit("/", 1)[0], "NaN",
                     after_progress=array.startswith("test/"))
    assert not out.exists()
    assert any("NaN" in p for p in verify_store(str(store)))


@pytest.mark.slow
def test_nan_in_the_stored_head_is_refused(store, tmp_path):
    name = next(iter(zarr.open_group(str(store), mode="r")["head"].array_keys()))
    _write_into(store, f"head/{name}", math.inf)
    with pytest.raises(StoreError, match=f"head/{name} holds NaN or Inf"):
        fit(FitConfig(store=str(store), out=str(tmp_path / "r"), **SMALL))
    assert any(f"head/{name}" in p for p in verify_store(str(store)))


# --- manifests: edited fields are refused ----------------------------------------------------

@pytest.mark.parametrize("change, needle", [
    (lambda m: m["backbone"].update(model="RN50"), "manifest_sha256"),
    (lambda m: m["backbone"].update(pretrained="openai"), "weights_sha256"),
    _slow(lambda m: m["backbone"].update(logit_scale=200.0), "manifest_sha256"),
    _slow(lambda m: m["dataset"].update(name="food101x"), "manifest_sha256"),
    _slow(lambda m: m["dataset"]["classnames"].reverse(), "manifest_sha256"),
    _slow(lambda m: m.pop("manifest_sha256"), "carries no manifest_sha256"),
    (lambda m: m["backbone"].update(tokens="5"), "field 'tokens'"),
    _slow(lambda m: m.update(extra=1), "field 'extra'"),
    _slow(lambda m: m["backbone"].pop("logit_scale"), "field 'logit_scale' is missing"),
])
def test_an_edited_manifest_is_refused_by_fit_and_verify(store, tmp_path, change, needle):
    edit_manifest(store, change)
    out = tmp_path / "r"
    code, output = invoke("fit", "--store", store, "--out", out, "--shots", "1", "--seeds", "1")
    one_line_refusal(code, output, needle)
    assert not out.exists()
    assert verify_store(str(store))


def test_a_dataset_name_that_is_a_path_never_leads_outside_out(store, tmp_path):
    edit_manifest(store, lambda m: m["dataset"].update(name="../../../escaped"), reseal=True)
    out = tmp_path / "deep" / "er" / "r"
    with pytest.raises(StoreError, match="plain name"):
        fit(FitConfig(store=str(store), out=str(out), **SMALL))
    assert not list(tmp_path.rglob("escaped*"))


@pytest.mark.slow
def test_verify_seal_seals_an_older_store_and_refuses_an_edited_one(store):
    edit_manifest(store, lambda m: m.pop("manifest_sha256"))
    with pytest.raises(StoreError, match="carries no manifest_sha256"):
        open_store(str(store))
    code, output = invoke("verify", store, "--seal")
    assert code == 0, output
    assert open_store(str(store)).manifest["manifest_sha256"]
    edit_manifest(store, lambda m: m["backbone"].update(logit_scale=1.0))
    code, output = invoke("verify", store, "--seal")
    assert code == 1 and "manifest_sha256" in output


# --- complete or refused ----------------------------------------------------------------------

@pytest.mark.slow
def test_an_incomplete_test_split_is_refused_unless_partial(store, tmp_path):
    group = zarr.open_group(str(store), mode="r+", zarr_format=3, use_consolidated=False)
    flags = group["test/complete"]
    flags[0] = 0  # a write unit whose data never finished
    out = tmp_path / "r"
    code, output = invoke("fit", "--store", store, "--out", out, "--shots", "1", "--seeds", "1")
    one_line_refusal(code, output, "test is incomplete", "units [0]", "safe-cache extract",
                     "--partial")
    assert not out.exists()
    flags[0] = 1
    group["test/complete"].resize((2,))  # a second unit, reserved, never written
    group["test/label"].resize((group["test/label"].shape[0] + 1,))
    manifest = dict(group.attrs["safe_cache"])
    manifest["dataset"]["split_sizes"]["test"] += 1
    manifest["manifest_sha256"] = manifest_seal(manifest)
    group.attrs["safe_cache"] = manifest
    with pytest.raises(StoreError, match="incomplete"):
        fit(FitConfig(store=str(store), out=str(out), **SMALL))
    (partial,) = fit(FitConfig(store=str(store), out=str(out), partial=True, **SMALL))
    expected = manifest["dataset"]["split_sizes"]["test"]
    assert partial.partial == {"rows": expected - 1, "expected": expected}
    (row,) = [r for r in aggregate([load_result(partial.path)]) if r["method"] == "safe"]
    assert "partial test" in row["setting"]


# --- model folders, modes, names ---------------------------------------------------------------

@pytest.mark.slow
def test_a_model_folder_is_covered_whole_by_its_card(store, tmp_path):
    from safe_cache.export import card_digest, export_model, load_model

    config = FitConfig(store=str(store), out=str(tmp_path / "r"), **SMALL)
    (result,) = fit(config)
    folder = export_model(result.path, tmp_path / "model")
    load_model(folder)  # sound
    card_path = folder / "card.json"
    original = card_path.read_text()

    def refused(edit, needle):
        card = json.loads(original)
        edit(card)
        card_path.write_text(json.dumps(card))
        with pytest.raises(Exception, match=needle) as info:
            load_model(folder)
        assert type(info.value).__name__ == "ModelFolderError"
        card_path.write_text(original)

    refused(lambda c: c.pop("card_sha256"), "carries no card_sha256")
    refused(lambda c: (c.update(sha256={}), c.update(card_sha256=card_digest(c))),
            "not covered")
    refused(lambda c: (c.update(beta=float("nan")), c.update(card_sha256=card_digest(c))),
            "beta")
    (folder / "notes.safetensors").write_bytes(b"x")
    with pytest.raises(Exception, match=r"notes\.safetensors is not covered"):
        load_model(folder)


@pytest.mark.slow
def test_results_and_heads_are_readable_by_the_team(store, tmp_path):
    previous = os.umask(0o022)
    try:
        (result,) = fit(FitConfig(store=str(store), out=str(tmp_path / "r"), **SMALL))
    finally:
        os.umask(previous)
    for path in (result.path, result.path.with_suffix(".safetensors")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert not list(result.path.parent.glob(".*part"))


def test_an_atomic_write_that_fails_leaves_nothing_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "result.json"
    atomic_write_text(target, "old")

    def half_then_fail(temporary: Path) -> None:
        temporary.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write_with(target, half_then_fail)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == \
        ["result.json"]


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "", "~root", "x\x00y", "a\\b"])
def test_names_that_are_paths_are_refused(tmp_path, name):
    with pytest.raises(ConfigError):
        plain_name(name, "dataset name")
    with pytest.raises(ConfigError):
        inside(tmp_path, name)


def test_a_symlinked_name_leaving_its_root_is_refused(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    with pytest.raises(ConfigError, match="outside"):
        inside(tmp_path / "root", "link", "x")
    assert inside(tmp_path / "root", "plain") == tmp_path / "root" / "plain"


# --- every command, hostile values: exit 2, one line, no traceback ------------------------------

HOSTILE = [
    ("fit", "--lr", "nan"), ("fit", "--lr", "inf"), ("fit", "--lr", "1e308"),
    ("fit", "--wd", "inf"), ("fit", "--beta", "nan"), ("fit", "--beta", "-1"),
    ("fit", "--betas", "nan,0.5"), ("fit", "--betas", "0:1:1e-7"), ("fit", "--betas", "0:inf:1"),
    ("fit", "--iters", "0"), ("fit", "--iters", "1e3"), ("fit", "--shots", "0"),
    ("fit", "--batch-size", "-3"), ("fit", "--logit-scale", "nan"),
    ("fit", "--logit-scale", "-2"), ("fit", "--warmup", "-1"), ("fit", "--tip-epochs", "0"),
    ("fit", "--eval-every", "0"), ("fit", "--test-chunk", "0"), ("fit", "--methods", "magic"),
    ("extract", "--views", "-1"), ("extract", "--batch-size", "0"),
    ("extract", "--max-pixels", "0"), ("extract", "--shots", "0"),
    ("report", "--format", "xml"), ("predict", "--top-k", "0"),
]


@pytest.mark.parametrize("command", HOSTILE, ids=[" ".join(c) for c in HOSTILE])
def test_every_command_refuses_hostile_values_in_one_line(source, tmp_path, command):
    name, *values = command
    base = {"fit": ["fit", "--store", source, "--out", tmp_path / "r"],
            "extract": ["extract", "--dataset", "dtd", "--root", tmp_path, "--model", MODEL,
                        "--pretrained", "none", "--store", tmp_path / "s.zarr"],
            "report": ["report", tmp_path],
            "predict": ["predict", tmp_path / "model", tmp_path]}[name]
    code, output = invoke(*base, *values)
    one_line_refusal(code, output)
    assert not (tmp_path / "r").exists() and not (tmp_path / "s.zarr").exists()


@pytest.mark.slow
def test_hostile_numbers_in_the_arrays_of_a_result_are_never_exported(store, tmp_path):
    (result,) = fit(FitConfig(store=str(store), out=str(tmp_path / "r"), **SMALL))
    document = json.loads(result.path.read_text())
    document["config"]["beta"] = float("nan")
    result.path.write_text(json.dumps(document))
    code, output = invoke("export", result.path, "--out", tmp_path / "model")
    one_line_refusal(code, output, "NaN")
    assert not (tmp_path / "model").exists()
    assert np.isfinite(result.methods["safe"]["test_acc"])


# --- found by a hostile probe: small arrays, splits, prompt files, edited numbers ------------

@pytest.mark.parametrize("array", ["text/hand/classifier",
                                   _slow("fewshot/seed1/shots1/train_rows")])
def test_a_deleted_chunk_of_a_small_array_is_refused_not_read_as_zeros(store, tmp_path, array):
    for chunk in (store / array / "c").rglob("*"):
        if chunk.is_file():
            chunk.unlink()  # zarr now reads the whole array as zeros
    with pytest.raises(StoreError, match=f"{array} does not match its sha256"):
        fit(FitConfig(store=str(store), out=str(tmp_path / "r"), **SMALL))
    assert any(array in p for p in verify_store(str(store)))


def test_a_deleted_head_chunk_is_refused(store, tmp_path):
    name = next(iter(zarr.open_group(str(store), mode="r")["head"].array_keys()))
    for chunk in (store / "head" / name / "c").rglob("*"):
        if chunk.is_file():
            chunk.unlink()
    with pytest.raises(StoreError, match="does not match its sha256"):
        fit(FitConfig(store=str(store), out=str(tmp_path / "r"), **SMALL))


@pytest.mark.slow
def test_adding_to_a_store_from_another_split_file_is_refused(store, tmp_path):
    from safe_cache.errors import ExtractError
    from safe_cache.extract import ExtractConfig, extract

    copy = tmp_path / "data"
    root = Path(open_store(str(store)).manifest["dataset"]["split_source"])
    assert root.name.startswith("split_zhou")
    source_root = next(p for p in store.parent.parent.rglob(root.name)).parent.parent
    shutil.copytree(source_root, copy)
    split_file = next(copy.rglob(root.name))
    split = json.loads(split_file.read_text())
    split["train"].reverse()  # the same images, another order: another few-shot draw
    split_file.write_text(json.dumps(split))
    config = ExtractConfig(dataset="food101", root=str(copy), model=MODEL, pretrained=None,
                           store=str(store), shots=(1,), seeds=(1,), views=1, workers=0)
    with pytest.raises(ExtractError, match="another split"):
        extract(config)


@pytest.mark.slow
def test_a_prompt_file_of_the_same_name_with_other_sentences_is_refused(source, store,
                                                                        tmp_path):
    from safe_cache.errors import ExtractError
    from safe_cache.extract import ExtractConfig, extract

    manifest = open_store(str(store)).manifest
    classes = manifest["dataset"]["classnames"]
    root = source.parent  # the miniature's data root (extract_miniature writes it there)
    for folder, word in (("p1", "photo"), ("p2", "drawing")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "cupl.json").write_text(json.dumps(
            {c: [f"a {word} of a {c}."] for c in classes}))
    base = dict(dataset="food101", root=str(root), model=MODEL, pretrained=None,
                store=str(store), shots=(1,), seeds=(1,), views=1, workers=0)
    extract(ExtractConfig(prompts=str(tmp_path / "p1" / "cupl.json"), **base))
    with pytest.raises(ExtractError, match="other sentences"):
        extract(ExtractConfig(prompts=str(tmp_path / "p2" / "cupl.json"), **base))


def test_a_number_edited_in_a_result_is_refused_and_a_removed_checksum_too(tmp_path):
    record = result_record("food101", 16, 1, 0.8, 0.77)
    path = write_record(tmp_path, record)
    record["methods"]["safe"]["test_acc"] = 0.99  # in range, the right type: only the digest
    path.write_text(json.dumps(record))
    with pytest.raises(ResultError, match="content_sha256"):
        load_result(path)
    for field in ("identity_sha256", "content_sha256"):  # one removed: refused
        sealed = result_record("food101", 16, 1, 0.8, 0.77)
        path = write_record(tmp_path, sealed)
        sealed.pop(field)
        path.write_text(json.dumps(sealed))
        with pytest.raises(ResultFormatError, match=f"lacks {field}"):
            load_result(path)


def _as_0_1(record: dict, *, first: bool = False) -> dict:
    """A result as safe-cache 0.1 wrote it: no identity or checksums (`first`: nor the recipe
    block, run id, curves or execution, and fit's later config fields)."""
    dropped = ["identity", "identity_sha256", "content_sha256"]
    dropped += ["recipe", "run_id", "curves", "execution"] if first else []
    old = {k: v for k, v in record.items() if k not in dropped}
    old["store"] = {k: old["store"][k] for k in ("url", "fingerprint")}
    return old


@pytest.mark.parametrize("first", [False, True])
def test_a_result_of_safe_cache_0_1_is_refused_in_one_line_naming_it(tmp_path, first):
    record = result_record("food101", 16, 1, 0.8, 0.77)
    path = write_record(tmp_path, record)
    if first:  # named shots<K>_seed<S>.json, without the recipe
        path.unlink()
        path = path.with_name("shots16_seed1.json")
    path.write_text(json.dumps(_as_0_1(record, first=first)))
    for read in (load_result, lambda p: load_results(tmp_path)):
        with pytest.raises(ResultFormatError) as info:
            read(path)
        message = str(info.value)
        assert str(path) in message and "safe-cache 0.1" in message
        assert "lacks" in message and "--force" in message and "\n" not in message
    code, output = invoke("report", tmp_path)
    one_line_refusal(code, output, path.name, "safe-cache 0.1", "--force")


@pytest.mark.slow
def test_fit_recomputes_over_a_result_of_safe_cache_0_1_at_its_path(store, tmp_path):
    config = FitConfig(store=str(store), out=str(tmp_path / "r"), **SMALL)
    (first,) = fit(config)
    document = json.loads(first.path.read_text())
    first.path.write_text(json.dumps(_as_0_1(document)))
    (again,) = fit(config)
    assert not again.skipped and again.path == first.path
    assert "recomputed" in again.note and "safe-cache 0.1" in again.note
    assert load_result(again.path).run_id == again.run_id != first.run_id  # the new result
    assert fit(config)[0].skipped  # and that one is this run's


def test_minus_zero_is_zero_in_a_run_identity():
    from safe_cache.fit.identity import default_options, options_of, options_suffix

    assert options_suffix(options_of({**default_options(), "wds": [-0.0]})) == \
        options_suffix(options_of({**default_options(), "wds": [0.0]}))


@pytest.mark.slow
def test_export_force_replaces_model_folders_only_and_cards_never_name_paths(store, tmp_path):
    from safe_cache.errors import ModelFolderError
    from safe_cache.export import card_digest, export_model, load_model

    (result,) = fit(FitConfig(store=str(store), out=str(tmp_path / "r"), **SMALL))
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "data.txt").write_text("precious")
    with pytest.raises(ModelFolderError, match="not a model folder"):
        export_model(result.path, victim, force=True)
    assert (victim / "sub" / "data.txt").read_text() == "precious"
    for out in (".", "", ".."):
        code, output = invoke("export", result.path, "--out", out, "--force")
        one_line_refusal(code, output, "not a folder of its own")
    folder = export_model(result.path, tmp_path / "model")
    assert export_model(result.path, folder, force=True) == folder  # a model folder: replaced
    card = json.loads((folder / "card.json").read_text())
    card["backbone"]["model"] = f"../../{tmp_path.name}/PWNED"
    card["card_sha256"] = card_digest(card)
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelFolderError, match=r"backbone\.model"):
        load_model(folder)
    assert not list(tmp_path.parent.rglob("PWNED*"))


def test_seal_refuses_a_card_whose_model_name_was_edited(store):
    edit_manifest(store, lambda m: (m["backbone"].update(model="RN50"),
                                    m.pop("manifest_sha256")))
    code, output = invoke("verify", store, "--seal")
    assert code == 1 and "architecture digest is not RN50's" in output
    with pytest.raises(StoreError):
        open_store(str(store))


@pytest.mark.slow
def test_labels_outside_the_classes_and_padding_few_shot_rows_are_refused(store, tmp_path):
    group = zarr.open_group(str(store), mode="r+", zarr_format=3, use_consolidated=False)
    labels = group["test/label"]
    original = labels[...]
    changed = original.copy()
    changed[0] = 7  # 3 classes
    labels[...] = changed
    with pytest.raises(StoreError, match="labels outside"):
        fit(FitConfig(store=str(store), out=str(tmp_path / "r"), **SMALL))
    assert any("labels outside" in p for p in verify_store(str(store)))
    labels[...] = original
    train = group["train/label"]
    values = train[...]
    values[0] = -1  # the few-shot draw's first row is now padding
    train[...] = values
    with pytest.raises(StoreError, match="labels are not classes"):
        fit(FitConfig(store=str(store), out=str(tmp_path / "r"), **SMALL))


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_the_seeds_of_one_setting_are_averaged_together(tmp_path):
    store = extract_miniature(tmp_path, MODEL, tmp_path / "two.zarr", seeds=(1, 2),
                              counts={"train": 2, "val": 2, "test": 4})
    runs = fit(FitConfig(store=str(store), out=str(tmp_path / "r"),
                         **{**SMALL, "seeds": (1, 2)}))
    assert runs[0].store["fewshot_sha256"] != runs[1].store["fewshot_sha256"]  # two draws
    assert runs[0].group == runs[1].group  # one setting
    rows = [r for r in aggregate(load_results(tmp_path / "r")) if r["method"] == "safe"]
    assert [r["seeds"] for r in rows] == [2]
