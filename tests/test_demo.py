"""The demo: generated shapes dataset -> extracted store, offline, resumable."""

from __future__ import annotations

import pytest

from safe_cache.data.datasets import open_dataset
from safe_cache.demo import CLASSES, run_demo
from safe_cache.store import open_store

pytestmark = pytest.mark.slow  # the whole demo, twice: ~30 s each


def test_demo_builds_a_sound_store(tmp_path):
    result = run_demo(str(tmp_path), workers=0, iters=150)
    assert result["problems"] == []
    assert result["store"].startswith(str(tmp_path))
    dataset = open_dataset(result["spec"], result["data"])
    assert dataset.classnames == sorted(CLASSES)  # sorted folders, underscores -> spaces
    store = open_store(result["store"])
    assert result["rows"]["test"] == len(dataset.splits["test"]) > 0
    assert store.classifier("hand").shape == (len(CLASSES), store.manifest["backbone"]["embed_dim"])
    assert store.fewshot(2, 4)[0].size == 4 * len(CLASSES)
    fitted = {(r.shots, r.seed): r.methods for r in result["results"]}
    assert set(fitted) == {(k, s) for k in (1, 2, 4) for s in (1, 2)}
    safe = [m["safe"]["test_acc"] for m in fitted.values()]
    zero = [m["zero_shot"]["test_acc"] for m in fitted.values()]
    assert sum(safe) / len(safe) > sum(zero) / len(zero) + 0.2  # SAFE learns the shapes
    again = run_demo(str(tmp_path), workers=0, iters=150)  # a rerun finds everything done
    assert again["extracted"] == {"test": 0, "train": 0, "val": 0}
    assert all(r.skipped for r in again["results"])
    # accuracy vs shots, beta curve, its change from beta = 0, 3 grids, training curves
    assert len(result["plots"]) == 1 + 1 + 1 + 3 + 6


def test_fit_cli_on_the_demo_store_with_the_default_grid(tmp_path):
    """The paper's default 12-configuration grid runs end to end (few iterations for CI)."""
    import json

    from click.testing import CliRunner

    from safe_cache.cli import main

    result = run_demo(str(tmp_path), workers=0, iters=20)
    out = tmp_path / "results"
    cli = CliRunner().invoke(main, ["fit", "--store", result["store"], "--shots", "1,2",
                                    "--seeds", "1,2", "--iters", "60", "--eval-every", "20",
                                    "--out", str(out), "--json"])
    assert cli.exit_code == 0, cli.output
    runs = json.loads(cli.stdout)  # progress goes to stderr
    assert len(runs) == 4 and all(len(r["grid"]) == 12 for r in runs)
    assert len(list(out.rglob("*.json"))) == 4
    heads = [p for p in out.rglob("*.safetensors") if not p.name.endswith(".safe_a.safetensors")]
    assert len(heads) == 4  # the fine-tuned heads
    assert len(list(out.rglob("*.safe_a.safetensors"))) == 4  # SAFE-A's trained caches
