"""The command line: help, the shim, JSON output and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from safe_cache.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_the_command_groups():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "Backbones" in result.output
    for command in ("backbone", "models"):
        assert command in result.output


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
    assert card["family"] == "vit" and card["T"] == 65 and len(card["fingerprint"]) == 64


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
    assert {row["family"] for row in rows} == {"resnet", "vit"}
    everything = json.loads(CliRunner().invoke(main, ["models", "--all", "--json"]).output)
    assert len(everything) > len(rows)
