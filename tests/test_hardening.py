"""Nothing wrong is trusted: every fault found by trying safe-cache as a hostile user would is
refused with one line naming the thing and the fix (exit 2), and leaves no result behind."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from factories import extract_miniature
from miniatures import write_split_zhou
from PIL import Image

from safe_cache import ImageReadError, SafeCacheWarning, StoreError
from safe_cache.cli import main
from safe_cache.cli.app import io_message
from safe_cache.data.datasets import open_dataset
from safe_cache.data.fewshot import sample_few_shot
from safe_cache.data.views import load_image
from safe_cache.fit import FitConfig, fit
from safe_cache.fit.results import head_file, load_result
from safe_cache.store import open_store

MODEL = "safe-cache-tiny-rn"
FIT = ["--shots", "1", "--seeds", "1", "--iters", "4", "--eval-every", "2", "--lr", "1e-3",
       "--wd", "0"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    store = extract_miniature(root, MODEL, root / "store.zarr",
                              counts={"train": 2, "val": 2, "test": 4})
    return root, store


@pytest.fixture
def store(source, tmp_path):
    """A fresh copy of the store, to damage."""
    copy = tmp_path / "store.zarr"
    shutil.copytree(source[1], copy)
    return copy


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, " ".join(result.output.split())


def chunk(store: Path, array: str) -> Path:
    return next(p for p in sorted((store / array / "c").rglob("*")) if p.is_file())


@pytest.mark.parametrize("array", ["test/dense", "train/aug_dense", "train/flip_dense"])
def test_a_missing_chunk_is_named_and_nothing_is_written(store, tmp_path, array):
    missing = chunk(store, array)
    missing.unlink()
    out = tmp_path / "results"
    code, text = invoke("fit", "--store", store, *FIT, "--out", out)
    assert code == 2 and array in text and "missing" in text and "safe-cache verify" in text
    assert not out.exists()


def test_a_corrupt_chunk_is_named(store, tmp_path):
    path = chunk(store, "test/dense")
    path.write_bytes(path.read_bytes()[:50])
    code, text = invoke("fit", "--store", store, *FIT, "--out", tmp_path / "results")
    assert code == 2 and "test/dense" in text and "truncated or corrupt" in text
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_an_edited_fingerprint_and_a_broken_manifest_are_refused(store, tmp_path):
    metadata = store / "zarr.json"
    document = json.loads(metadata.read_text())
    document["attributes"]["safe_cache"]["backbone_fingerprint"] = "0" * 64
    metadata.write_text(json.dumps(document))
    code, text = invoke("fit", "--store", store, *FIT, "--out", tmp_path / "r")
    assert code == 2 and "edited by hand?" in text and not (tmp_path / "r").exists()
    code, text = invoke("verify", store)
    assert code == 1 and "fingerprint" in text
    metadata.write_text("{not json")
    for command in (["info", store], ["verify", store], ["fit", "--store", store, *FIT]):
        code, text = invoke(*command)
        assert code in (1, 2) and "zarr.json is not readable" in text, command
        assert "Traceback" not in text


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_a_half_written_result_is_run_again_and_never_exported(source, tmp_path):
    _, store = source
    config = FitConfig(store=str(store), shots=(1,), seeds=(1,), iters=4, eval_every=2,
                       lrs=(1e-3,), wds=(0.0,), methods=("safe_a",), out=str(tmp_path / "r"))
    (first,) = fit(config)
    old_json = first.path.read_text()
    (fit_again,) = fit(config.__class__(**{**config.__dict__, "force": True}))
    first.path.write_text(old_json)  # a kill between the new head and the new JSON
    assert load_result(first.path).run_id != fit_again.run_id
    code, text = invoke("export", first.path, "--out", tmp_path / "model")
    assert code == 2 and "belongs to another run" in text and not (tmp_path / "model").exists()
    (rerun,) = fit(config)  # not skipped: its files disagree, so the run is done again
    assert not rerun.skipped and rerun.run_id != first.run_id


@pytest.mark.slow
def test_export_refuses_overwrites_broken_heads_and_edited_cards(source, tmp_path):
    _, store = source
    config = FitConfig(store=str(store), shots=(1,), seeds=(1,), iters=4, eval_every=2,
                       lrs=(1e-3,), wds=(0.0,), methods=("safe_a",), out=str(tmp_path / "r"))
    (record,) = fit(config)
    model = tmp_path / "model"
    assert invoke("export", record.path, "--out", model, "--method", "safe_a")[0] == 0
    assert (model / "cache.safetensors").is_file()
    code, text = invoke("export", record.path, "--out", model)
    assert code == 2 and "--force" in text
    assert invoke("export", record.path, "--out", model, "--force")[0] == 0
    assert not (model / "cache.safetensors").exists()  # no stale file from the old folder
    card = json.loads((model / "card.json").read_text())
    card["beta"] = 5.0
    (model / "card.json").write_text(json.dumps(card))
    code, text = invoke("predict", model, tmp_path)
    assert code == 2 and "modified after export" in text
    head = head_file(record.path)
    head.write_bytes(head.read_bytes()[:100])
    code, text = invoke("export", record.path, "--out", tmp_path / "other")
    assert code == 2 and not (tmp_path / "other").exists()


@pytest.mark.slow
def test_predict_needs_images_and_a_positive_top_k(source, tmp_path):
    _, store = source
    (record,) = fit(FitConfig(store=str(store), shots=(1,), seeds=(1,), iters=2, eval_every=1,
                              lrs=(1e-3,), wds=(0.0,), methods=(), out=str(tmp_path / "r")))
    model = tmp_path / "model"
    assert invoke("export", record.path, "--out", model)[0] == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    code, text = invoke("predict", model, empty)
    assert code == 2 and "No images" in text
    image = next(Path(source[0]).rglob("*.jpg"))
    code, text = invoke("predict", model, image, "--top-k", "0")
    assert code == 2 and "--top-k 0" in text


@pytest.mark.parametrize("args, expected", [
    (["--iters", "0"], "--iters 0"), (["--lr", "-1"], "--lr -1"),
    (["--wd", "-1"], "--wd -1"), (["--methods", "foo"], "--methods 'foo'"),
    (["--betas", "1:0:0.1"], "start <= stop"), (["--betas", "0:1:0"], "step > 0"),
    (["--shots", ""], "--shots is empty"), (["--seeds", ""], "--seeds is empty"),
    (["--shots", "0"], "--shots 0"), (["--batch-size", "0"], "--batch-size 0"),
    (["--eval-every", "0"], "--eval-every 0"), (["--device", "nonsense"], "--device"),
    (["--recipe", "paper"], "safe, views"), (["--warmup", "-5"], "--warmup -5"),
    (["--logit-scale", "hot"], "--logit-scale"), (["--scheduler", "not a url"], "tcp://"),
])
def test_fit_arguments_are_one_line_errors(source, tmp_path, args, expected):
    out = tmp_path / "r"
    code, text = invoke("fit", "--store", source[1], *FIT, "--out", out, *args)
    assert code == 2 and expected in text and "Traceback" not in text, text
    assert not out.exists()


@pytest.mark.parametrize("args, expected", [
    (["--views", "-1"], "--views -1"), (["--batch-size", "0"], "--batch-size 0"),
    (["--workers", "-1"], "--workers -1"), (["--shots", ""], "--shots is empty"),
    (["--device", "cuda:7"], "--device"), (["--max-pixels", "0"], "--max-pixels 0"),
])
def test_extract_arguments_are_one_line_errors(source, tmp_path, args, expected):
    code, text = invoke("extract", "--dataset", "food101", "--root", source[0], "--model", MODEL,
                        "--pretrained", "none", "--store", tmp_path / "s.zarr", *args)
    assert code == 2 and expected in text, text
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.slow
def test_row_point_and_file_arguments(source, tmp_path):
    store = source[1]
    (record,) = fit(FitConfig(store=str(store), shots=(1,), seeds=(1,), iters=2, eval_every=1,
                              lrs=(1e-3,), wds=(0.0,), methods=(), out=str(tmp_path / "r")))
    code, text = invoke("attention", "--store", store, "--head", record.path, "--images=-1",
                        "--out", tmp_path / "a")
    assert code == 2 and "row -1 is not a readable row" in text
    code, text = invoke("correspond", "--store", store, "--source", 0, "--point", "999,1",
                        "--targets", 1, "--out", tmp_path / "c")
    assert code == 2 and "outside the model's" in text
    code, text = invoke("ls", tmp_path / "nowhere")
    assert code == 2 and "No folder" in text
    (tmp_path / "file").write_text("x")
    code, text = invoke("copy", store, tmp_path / "file")
    assert code == 2 and "is a file" in text
    code, text = invoke("fit", "--store", store, *FIT, "--out", tmp_path / "file")
    assert code == 2 and "is a file" in text
    (tmp_path / "weights.txt").write_text("hello")
    code, text = invoke("backbone", MODEL, "--pretrained", tmp_path / "weights.txt")
    assert code == 2 and "weights.txt" in text and "Traceback" not in text


def test_a_decompression_bomb_is_an_unreadable_image(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (3000, 2000)).save(path)
    with pytest.raises(ImageReadError, match="--max-pixels"):
        load_image(path, max_pixels=1_000_000)
    assert load_image(path).size == (3000, 2000)
    Image.MAX_IMAGE_PIXELS, saved = 1000, Image.MAX_IMAGE_PIXELS  # PIL's own bomb error
    try:
        with pytest.raises(ImageReadError):
            load_image(path, max_pixels=10**9)
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def test_a_full_disk_is_one_line_naming_the_file():
    error = OSError(errno.ENOSPC, "No space left on device", "/stores/x.zarr/train/dense/c/0")
    message = io_message(error)
    assert "/stores/x.zarr/train/dense/c/0" in message and "resumes" in message
    assert io_message(OSError(errno.ECONNRESET, "reset")) is None  # not a user's fix


def test_a_generated_split_follows_the_folder(tmp_path):
    from miniatures import _jpeg

    images = tmp_path / "mine" / "images"
    for name in ("cats", "dogs", "lonely"):
        for i in range(5 if name != "lonely" else 1):
            _jpeg(images / name / f"{i}.jpg", i)
    spec = tmp_path / "mine.json"
    spec.write_text(json.dumps({"name": "mine", "kind": "imagefolder", "folder": "mine",
                                "image_dir": "images", "split_file": "split.json"}))
    first = open_dataset(str(spec), tmp_path)
    assert "lonely" in first.classnames
    with pytest.warns(SafeCacheWarning, match="no images; it gets 0"):
        sample_few_shot([e.label for e in first.splits["train"]],
                        [e.label for e in first.splits["val"]], 1, 1, first.classnames)
    shutil.rmtree(images / "lonely")  # the user removes the class that broke extraction
    with pytest.warns(SafeCacheWarning, match="changed since"):
        second = open_dataset(str(spec), tmp_path)
    assert second.classnames == ["cats", "dogs"]
    assert not any("lonely" in e.path for entries in second.splits.values() for e in entries)


def test_reading_rows_of_a_store_names_bad_rows(source):
    opened = open_store(str(source[1]))
    with pytest.raises(StoreError, match="row 10000"):
        opened.readable_row_ids("test", [0, 10000])
    assert np.array_equal(opened.readable_row_ids("test", [1, 0]), [1, 0])


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "/full/disk/chunk")


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_a_full_disk_in_extract_and_fit_is_one_line_and_resumable(source, tmp_path,
                                                                   monkeypatch):
    from safe_cache.fit import runs
    from safe_cache.store.store import FeatureStore

    root, _ = source
    target = tmp_path / "s.zarr"
    args = ["extract", "--dataset", "food101", "--root", root, "--model", MODEL,
            "--pretrained", "none", "--store", target, "--shots", "1", "--seeds", "1",
            "--views", "1", "--workers", "0"]
    with monkeypatch.context() as patch:
        patch.setattr(FeatureStore, "write_parts", _disk_full)
        code, text = invoke(*args)
    assert code == 2 and "No space left on device: /full/disk/chunk" in text
    assert "resumes" in text and "Traceback" not in text
    code, _ = invoke(*args)  # space freed: the same command finishes the store
    assert code == 0 and invoke("verify", target)[0] == 0
    out = tmp_path / "results"
    with monkeypatch.context() as patch:
        patch.setattr(runs, "write_result", _disk_full)
        code, text = invoke("fit", "--store", target, *FIT, "--out", out)
    assert code == 2 and "No space left" in text
    assert not list(out.rglob("*.json"))  # no result without its JSON
    assert invoke("fit", "--store", target, *FIT, "--out", out)[0] == 0
    assert len(list(out.rglob("*.json"))) == 1


@pytest.mark.slow  # seconds: outside the fast loop (CI runs it)
def test_out_of_memory_in_extract_is_one_line_and_resumes(tmp_path, monkeypatch):
    """An OOM on the device mid-split: one line with the fixes; the store resumes."""
    import torch

    from safe_cache.cli import main
    from safe_cache.model.backbone import Backbone
    from safe_cache.store.verify import verify_store

    write_split_zhou(tmp_path, "food101", classes=4)
    store = tmp_path / "store.zarr"
    args = ["extract", "--dataset", "food101", "--root", str(tmp_path), "--model",
            "safe-cache-tiny-rn", "--pretrained", "none", "--store", str(store), "--shots", "1",
            "--seeds", "1", "--views", "1", "--workers", "0", "--batch-size", "4"]
    original, calls = Backbone.forward_features, {"n": 0}

    def failing(self, images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, images)

    monkeypatch.setattr(Backbone, "forward_features", failing)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    message = result.output.strip().splitlines()
    assert any("Out of memory on cpu extracting" in line for line in message), result.output
    assert "--batch-size 2" in result.output and "run the same command again" in result.output
    monkeypatch.setattr(Backbone, "forward_features", original)
    resumed = CliRunner().invoke(main, args)
    assert resumed.exit_code == 0, resumed.output
    assert verify_store(str(store)) == []


def test_out_of_memory_in_fit_is_one_line_with_the_fixes(monkeypatch):
    import types

    import torch

    from safe_cache import DeviceMemoryError
    from safe_cache.fit import FitConfig, runs

    def failing(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB\nmore")

    monkeypatch.setattr(runs, "fit_one", failing)
    store = types.SimpleNamespace(manifest={"dataset": {"name": "food101"}})
    config = FitConfig(store="unused.zarr", device="cpu", test_chunk=256)
    with pytest.raises(DeviceMemoryError, match=r"^Out of memory fitting food101 16 shots seed 2"
                                                r" on cpu \(CUDA out of memory\. Tried to"
                                                r" allocate 9\.00 GiB\)\. Try --test-chunk 128"):
        runs.fit_and_save(store, 16, 2, config)


@pytest.mark.slow
def test_a_store_whose_creation_was_killed_is_created_anew(tmp_path):
    """SIGKILL between the group's zarr.json and its manifest leaves an empty Zarr group:
    extract creates the store there anew (a group holding anything else is never touched)."""
    import zarr

    from safe_cache.store import open_store

    url = tmp_path / "store.zarr"
    zarr.open_group(str(url), mode="w")  # what the killed creation left
    extract_miniature(tmp_path, "safe-cache-tiny-rn", url, classes=2)
    assert open_store(str(url)).manifest["dataset"]["name"] == "food101"
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").attrs["mine"] = 1
    with pytest.raises(StoreError, match="is a Zarr group but not a safe-cache store"):
        open_store(str(other))
