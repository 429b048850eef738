"""The command line: help, the shim, JSON output and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from safe_cache import SafeCacheWarning
from safe_cache.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_python_m_reaches_every_command():
    """`python -m safe_cache.cli` runs main() at the module's end: every command registered."""
    for name in sorted(main.commands):
        result = subprocess.run([sys.executable, "-m", "safe_cache.cli", name, "--help"],
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, (name, result.stderr)
        assert f"safe_cache.cli {name} [OPTIONS]" in result.stdout, name


def test_help_lists_the_command_groups():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "Backbones" in result.output
    for command in ("backbone", "models"):
        assert command in result.output


@pytest.mark.slow
def test_cli_shim_matches_console_script():
    shim = subprocess.run([sys.executable, "cli.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    script = subprocess.run(["safe-cache", "--help"], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    assert shim.stdout == script.stdout
    assert "Usage: safe-cache" in shim.stdout


def test_backbone_card_as_json():
    result = CliRunner().invoke(main, ["backbone", "safe-cache-tiny-vit", "--json"])
    assert result.exit_code == 0, result.output
    card = json.loads(result.output)
    assert card["family"] == "vit" and card["tokens"] == 65 and len(card["fingerprint"]) == 64


def test_backbone_table():
    result = CliRunner().invoke(main, ["backbone", "safe-cache-tiny-rn"])
    assert result.exit_code == 0, result.output
    assert "fingerprint" in result.output and "resnet" in result.output


def test_errors_are_messages_not_tracebacks():
    result = CliRunner().invoke(main, ["backbone", "convnext_base"])
    assert result.exit_code == 2
    assert "cannot be split for SAFE" in result.output
    assert "Traceback" not in result.output


def test_models_lists_supported_families_only_by_default():
    result = CliRunner().invoke(main, ["models", "--json"])
    rows = json.loads(result.output)
    assert {row["family"] for row in rows} == {"resnet", "vit", "map", "coca", "eva"}
    names = {row["model"] for row in rows}
    assert {"PE-Core-B-16", "ViT-B-16-SigLIP2", "coca_ViT-B-32", "EVA02-B-16"} <= names
    everything = json.loads(CliRunner().invoke(main, ["models", "--all", "--json"]).output)
    assert len(everything) > len(rows)


def test_datasets_table_marks_presence(tmp_path):
    from miniatures import write_split_zhou

    write_split_zhou(tmp_path, "dtd")
    result = CliRunner().invoke(main, ["datasets", "--root", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert rows["dtd"]["status"] == "present" and rows["food101"]["status"] == "missing"
    assert rows["sun397"]["classes"] == 397
    table = CliRunner().invoke(main, ["datasets"])
    assert "50,500" in table.output and "imagenet_r" in table.output


def test_datasets_make_split(tmp_path):
    from miniatures import write_split_zhou

    from safe_cache.data.datasets import load_spec

    write_split_zhou(tmp_path, "eurosat")
    spec = load_spec("eurosat")
    (tmp_path / spec.folder / spec.split_file).unlink()
    missing = CliRunner().invoke(main, ["datasets", "--root", str(tmp_path), "--json"])
    assert {r["name"]: r for r in json.loads(missing.output)}["eurosat"]["status"].startswith("no ")
    with warnings.catch_warnings():
        warnings.simplefilter("always", SafeCacheWarning)
        result = CliRunner().invoke(main, ["datasets", "--root", str(tmp_path), "--make-split",
                                           "eurosat", "--json"])
    assert result.exit_code == 0, result.output
    assert "warning: eurosat: using the generated split" in result.output
    assert (tmp_path / spec.folder / "split_generated_eurosat.json").is_file()


def test_bad_storage_options_name_the_option(tmp_path):
    for command in (["info", str(tmp_path)], ["verify", str(tmp_path)], ["ls", str(tmp_path)]):
        result = CliRunner().invoke(main, [*command, "--storage-options", "{bad"])
        assert result.exit_code == 2, result.output
        assert "--storage-options" in result.output and "not valid JSON" in result.output
        assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["info", str(tmp_path), "--storage-options", "[1]"])
    assert result.exit_code == 2 and "JSON object" in result.output
    result = CliRunner().invoke(main, ["copy", str(tmp_path), str(tmp_path / "x"),
                                       "--source-options", "nope"])
    assert result.exit_code == 2 and "--source-options" in result.output


def test_the_dropped_shard_images_alias_is_refused_by_name():
    result = CliRunner().invoke(main, ["extract", "--dataset", "dtd", "--shard-images", "8"])
    assert result.exit_code == 2 and "No such option '--shard-images'" in result.output
