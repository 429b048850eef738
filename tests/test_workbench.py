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
