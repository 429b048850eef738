"""The package's layering (docs/architecture.md) holds, every error class is in one place, and
the store is sealed (nothing outside safe_cache/store/ touches its zarr group).

The package's types are checked by `mypy` in .ci/run only, not here: a cold run over the
package takes about a minute on two cores, longer than the whole inner loop."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import safe_cache
from safe_cache.errors import SafeCacheError

ROOT = Path(__file__).resolve().parent.parent


def _all_modules() -> list[str]:
    return [info.name for info in pkgutil.walk_packages(safe_cache.__path__, "safe_cache.")
            if not info.name.endswith(".__main__")]  # importing it runs the command line


def _test_extra_installed() -> bool:
    """Whether this environment installed the `test` extra: a requirement of it other than
    pytest and import-linter is there (pyproject.toml)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["test"]
    names = {re.split(r"[^A-Za-z0-9_.-]", req, maxsplit=1)[0] for req in extra}
    return any(_installed(name) for name in names - {"pytest", "import-linter"})


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_import_contracts_are_kept():
    """import-linter with pyproject.toml's contracts: layers, no torch in store/, nobody
    imports the package root, no cycles. Run as a module of this interpreter (not the
    `lint-imports` script, which may not be on PATH), so it runs wherever it is installed, and
    an environment with the test extra but without it fails."""
    if importlib.util.find_spec("importlinter") is None:
        if _test_extra_installed():
            pytest.fail("import-linter is missing though the test extra is installed:"
                        " pip install -e '.[test]'")
        pytest.skip("import-linter not installed (pip install -e '.[test]')")
    done = subprocess.run(
        [sys.executable, "-c",
         "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
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


# --- the store is sealed: nobody outside safe_cache/store/ touches its zarr group --------------
STORE_MAKERS = {"open_store", "create_store", "FeatureStore"}
STORE_NAME = re.compile(r"(^|_)store$")


def _bound_stores(tree: ast.AST) -> set[str]:
    """Names a module binds to a store: parameters annotated FeatureStore, and names assigned
    (or taken `with ... as`) from open_store / create_store / FeatureStore(...)."""
    def makes_store(value: ast.AST | None) -> bool:
        if not isinstance(value, ast.Call):
            return False
        func = value.func
        return (func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)) \
            in STORE_MAKERS

    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.annotation is not None and \
                "FeatureStore" in ast.unparse(node.annotation):
            names.add(node.arg)
        elif isinstance(node, ast.Assign) and makes_store(node.value):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and (
                makes_store(node.value) or "FeatureStore" in ast.unparse(node.annotation)):
            names.add(node.target.id)
        elif isinstance(node, ast.withitem) and makes_store(node.context_expr) and \
                isinstance(node.optional_vars, ast.Name):
            names.add(node.optional_vars.id)
    return names


def store_group_uses(source: str) -> list[str]:
    """Every reach into a store's zarr group in `source`, as "line: code": `._group` on
    anything, and `.group` read (not called: re.Match.group(1) and click's main.group(...) are
    calls) on a store, i.e. a name bound to one or one called `store` / `*_store`."""
    tree = ast.parse(source)
    stores = _bound_stores(tree)
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or node.attr not in ("group", "_group"):
            continue
        receiver = node.value
        name = receiver.id if isinstance(receiver, ast.Name) else getattr(receiver, "attr", "")
        on_store = name in stores or bool(STORE_NAME.search(name))
        if node.attr == "_group" or (on_store and id(node) not in called):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_nothing_outside_the_store_reaches_into_its_zarr_group():
    """The store's invariants (lease, completion flags after data, missing-chunk refusal, the
    sealed manifest) hold only if every reader and writer goes through FeatureStore's methods:
    no `.group` / `._group` on a store in safe_cache/ outside safe_cache/store/, nor in
    benchmarks/."""
    files = [p for p in sorted((ROOT / "safe_cache").rglob("*.py"))
             if (ROOT / "safe_cache" / "store") not in p.parents]
    files += sorted((ROOT / "benchmarks").rglob("*.py"))
    found = [f"{path.relative_to(ROOT)}:{use}" for path in files
             for use in store_group_uses(path.read_text())]
    assert not found, ("reaches into a store's zarr group; call (or add) a FeatureStore method"
                       " instead:\n" + "\n".join(found))


def test_the_group_check_finds_a_planted_reach_and_spares_regex_and_click():
    planted = {
        "store.group['train']['label'][0] = -1": 1,
        "def f(s: FeatureStore):\n    s.group.attrs['x'] = 1": 1,
        "opened = open_store(url)\nopened.group": 1,
        "with create_store(url) as made:\n    made.group": 1,
        "self.store.group": 1,
        "anything._group": 1,
        "anything._group()": 1,
        "match.group(1)": 0,
        "@main.group(invoke_without_command=True)\ndef f(): pass": 0,
        "run.group == other.group": 0,
        "click.group(cls=Group)": 0,
    }
    for source, count in planted.items():
        assert len(store_group_uses(source)) == count, source
