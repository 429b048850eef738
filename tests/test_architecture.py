"""The package's layering (docs/architecture.md) holds, and every error class is in one place."""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import subprocess
from pathlib import Path

import pytest

import safe_cache
from safe_cache.errors import SafeCacheError

ROOT = Path(__file__).resolve().parent.parent


def _all_modules() -> list[str]:
    return [info.name for info in pkgutil.walk_packages(safe_cache.__path__, "safe_cache.")
            if not info.name.endswith(".__main__")]  # importing it runs the command line


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter not installed")
def test_import_contracts_are_kept():
    """lint-imports with pyproject.toml's contracts: layers, no torch in store/, nobody imports
    the package root, no cycles."""
    done = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "4 kept, 0 broken" in done.stdout


def test_every_error_class_lives_in_errors_and_is_exported():
    for name in _all_modules():
        importlib.import_module(name)
    seen, todo = set(), [SafeCacheError]
    while todo:
        cls = todo.pop()
        seen.add(cls)
        todo += cls.__subclasses__()
    ours = {cls for cls in seen if cls.__module__.startswith("safe_cache")}
    assert {cls.__module__ for cls in ours} == {"safe_cache.errors"}
    assert {cls.__name__ for cls in ours} <= set(safe_cache.__all__)
    assert all(getattr(safe_cache, cls.__name__) is cls for cls in ours)


def test_the_public_names_resolve():
    for name in safe_cache.__all__:
        assert getattr(safe_cache, name) is not None, name
