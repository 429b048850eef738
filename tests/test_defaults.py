"""The design's two commands work exactly as typed in a fresh folder: `safe-cache extract
--dataset food101`, then `safe-cache fit --shots ...` with no --store (weights cannot be
downloaded here, so the tiny model comes from the environment, as a user could set it)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from miniatures import write_split_zhou

from safe_cache.cli import main

SMALL = {"train": 3, "val": 2, "test": 2}


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty working folder; the tiny model with random weights by environment."""
    monkeypatch.chdir(tmp_path)
    for name in ("SAFE_CACHE_DATA", "SAFE_CACHE_STORES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SAFE_CACHE_MODEL", "safe-cache-tiny-vit")
    monkeypatch.setenv("SAFE_CACHE_PRETRAINED", "none")
    return tmp_path


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.slow  # decoding worker processes (extract's default --workers 2)
def test_extract_then_fit_as_typed(fresh):
    write_split_zhou(fresh / "data", "food101", classes=3, counts=SMALL)
    extracted = invoke("extract", "--dataset", "food101")  # exactly as the design types it
    assert extracted.exit_code == 0, extracted.output
    store = fresh / "stores" / "food101" / "safe-cache-tiny-vit-random0.zarr"
    assert (store / "zarr.json").is_file()
    fitted = invoke("fit", "--shots", "1,2", "--seeds", "1", "--iters", "20", "--eval-every",
                    "10", "--methods", "none", "--json")
    assert fitted.exit_code == 0, fitted.output
    runs = json.loads(fitted.stdout)
    assert [(r["shots"], r["store"]["url"]) for r in runs] == [(1, str(store)), (2, str(store))]
    assert "fitting 1 store" in fitted.stderr
    assert [p.name for p in (fresh / "results" / "food101" / "safe-cache-tiny-vit-random0")
            .glob("shots2_seed1_safe_o*.json")]  # a short fit: named with its options' hash
    # the commands that need a store or a results folder take the same defaults
    assert invoke("verify").exit_code == 0
    info = invoke("info", "--json")
    assert info.exit_code == 0 and json.loads(info.stdout)["manifest"]["dataset"]["name"] == \
        "food101"
    report = invoke("report")
    assert report.exit_code == 0 and "food101" in report.output
    listed = invoke("ls", "--json")
    assert [row["dataset"] for row in json.loads(listed.stdout)] == ["food101"]


@pytest.mark.slow
def test_the_data_root_from_the_environment(fresh, monkeypatch):
    elsewhere = fresh / "datasets-on-a-shared-disk"
    write_split_zhou(elsewhere, "food101", classes=3, counts=SMALL)
    monkeypatch.setenv("SAFE_CACHE_DATA", str(elsewhere))
    monkeypatch.setenv("SAFE_CACHE_STORES", str(fresh / "team-stores"))
    extracted = invoke("extract", "--dataset", "food101", "--views", "1", "--shots", "1",
                       "--seeds", "1", "--workers", "0")
    assert extracted.exit_code == 0, extracted.output
    assert (fresh / "team-stores" / "food101" / "safe-cache-tiny-vit-random0.zarr").is_dir()
    assert not (fresh / "stores").exists()


def test_a_missing_dataset_names_every_place_looked(fresh, monkeypatch):
    missing = invoke("extract", "--dataset", "food101")
    assert missing.exit_code == 2
    text = " ".join(missing.output.split())
    for expected in ("--root (not given)", "SAFE_CACHE_DATA (not set)", "./data",
                     "food-101/images/", "split_zhou_Food101.json", "--root DIR",
                     "SAFE_CACHE_DATA=DIR"):
        assert expected in text, expected
    monkeypatch.setenv("SAFE_CACHE_DATA", str(fresh / "nowhere"))
    text = " ".join(invoke("extract", "--dataset", "food101").output.split())
    assert f"SAFE_CACHE_DATA {fresh / 'nowhere'}" in text and "from SAFE_CACHE_DATA" in text
    assert "Traceback" not in text


@pytest.mark.slow
def test_fit_without_a_store_lists_what_is_there(fresh):
    nothing = invoke("fit", "--shots", "1")
    assert nothing.exit_code == 2
    text = " ".join(nothing.output.split())
    for expected in ("No store matching", "stores", "SAFE_CACHE_STORES", "Stores found there:"
                     " none", "safe-cache extract --dataset NAME --model safe-cache-tiny-vit"):
        assert expected in text, expected
    write_split_zhou(fresh / "data", "dtd", classes=3, counts=SMALL)
    assert invoke("extract", "--dataset", "dtd", "--views", "1", "--shots", "1", "--seeds",
                  "1", "--workers", "0").exit_code == 0
    other = " ".join(invoke("fit", "--dataset", "food101", "--shots", "1").output.split())
    assert "dataset food101" in other and "dtd, safe-cache-tiny-vit-random0" in other
    assert "safe-cache extract --dataset food101" in other
