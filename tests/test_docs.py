"""README and docs/: short, every link resolves, every example and generated table is what the
code makes today (safe_cache/cli/examples.py; the slow test runs it again and compares)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from safe_cache.cli.examples import IMAGES_SHOWN, SNIPPET, fill, mask_timings, pages, run_examples
from safe_cache.store.schema import ARRAYS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"


def _examples() -> dict[str, str]:
    return {p.stem: p.read_text() for p in EXAMPLES.glob("*.txt")}


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, len(lines)


@pytest.mark.parametrize("page", pages(ROOT), ids=lambda p: p.name)
def test_every_snippet_is_what_the_script_wrote(page):
    text = page.read_text()
    assert fill(text, _examples()) == text  # run `python -m safe_cache.cli.examples` to update


def test_every_example_is_shown_and_every_array_documented():
    shown = {m.group(3) for page in pages(ROOT) for m in SNIPPET.finditer(page.read_text())}
    assert set(_examples()) <= shown and "store arrays" in shown
    store_page = (ROOT / "docs" / "store.md").read_text()
    assert all(f"/{spec.name}`" in store_page for spec in ARRAYS)


@pytest.mark.parametrize("page", pages(ROOT), ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), (page.name, target)


@pytest.mark.slow
def test_the_examples_script_prints_what_the_docs_show_today(tmp_path):
    """The whole tour again (demo, report, attention, correspond), as a user runs it: the
    outputs equal the docs' (timings aside) and the images the docs show match."""
    outputs = run_examples(tmp_path / "work")
    for name, text in outputs.items():
        assert mask_timings(text) == mask_timings((EXAMPLES / f"{name}.txt").read_text()), name
    for shown, made in IMAGES_SHOWN.items():
        new = np.asarray(Image.open(tmp_path / "work" / made).convert("RGB"), dtype=float)
        old = np.asarray(Image.open(ROOT / "docs" / shown).convert("RGB"), dtype=float)
        assert new.shape == old.shape and np.abs(new - old).mean() < 2.0, shown
