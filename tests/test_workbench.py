"""The workbench's registry: one module per method, each registering the name fit and the
results use; `fit --methods` spells the groups out."""

from __future__ import annotations

import pytest

from safe_cache import ConfigError
from safe_cache.fit import FitConfig
from safe_cache.fit.methods import (
    DEFAULT_METHODS,
    METHOD_LABELS,
    METHODS,
    OPTIONAL_METHODS,
    WORKBENCH_METHODS,
    expand_methods,
)
from safe_cache.fit.workbench import module_names, register_method, registry


def test_every_module_registers_its_method_and_every_method_has_a_module():
    methods = registry()
    assert sorted(methods) == sorted(WORKBENCH_METHODS) == module_names()
    assert all(name in METHODS and name in METHOD_LABELS for name in methods)
    with pytest.raises(ValueError, match="registered twice"):
        register_method("gda")(lambda inputs: None)  # type: ignore[arg-type,return-value]


def test_method_groups_expand_and_the_default_stays_the_adapters():
    assert FitConfig(store="s").methods == DEFAULT_METHODS
    assert expand_methods(["workbench"]) == WORKBENCH_METHODS
    assert expand_methods(["all"]) == OPTIONAL_METHODS
    assert expand_methods(["none"]) == ()
    assert expand_methods(["safe", "gda", "zero_shot", "gda", "tip_adapter"]) == \
        ("gda", "tip_adapter")
    with pytest.raises(ConfigError, match="methods"):
        FitConfig(store="s", methods=("gdaa",))


@pytest.mark.parametrize("methods, needle", [
    (("clap",), r"keeps no sentence embeddings.*--methods clap"),
    (("gda", "cross_modal_lp"), r"keeps no sentence embeddings.*--methods cross_modal_lp"),
])
@pytest.mark.slow
def test_a_store_a_method_cannot_serve_is_refused_before_safe_trains(tmp_path, monkeypatch,
                                                                     methods, needle):
    from test_protocol import _config, _store

    from safe_cache import RecipeError
    from safe_cache.fit import fit
    from safe_cache.fit import train as train_module

    store = _store(str(tmp_path / "s.zarr"), whole_val=False)  # sentences, no embeddings
    trained: list[int] = []
    monkeypatch.setattr(train_module, "train_grid", lambda *a, **k: trained.append(1))
    config = _config(store, str(tmp_path / "r"), methods=methods)
    with pytest.raises(RecipeError, match=needle):
        fit(config)
    assert not trained and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_too_few_samples_for_cross_modal_lp_are_refused_before_safe_trains(tmp_path,
                                                                           monkeypatch):
    from test_protocol import _config, _store

    from safe_cache import RecipeError
    from safe_cache.fit import fit
    from safe_cache.fit import train as train_module

    store = _store(str(tmp_path / "s.zarr"), whole_val=False, embeddings=True)  # 3 sentences
    trained: list[int] = []
    monkeypatch.setattr(train_module, "train_grid", lambda *a, **k: trained.append(1))
    with pytest.raises(RecipeError, match=r"cross_modal_lp: no valid batch size.*3 text"):
        fit(_config(store, str(tmp_path / "r"), methods=("cross_modal_lp",)))
    assert not trained and not (tmp_path / "r").exists()
