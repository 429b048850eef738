"""One source of defaults: the config dataclasses' fields (ExtractConfig, FitConfig).

The CLI's option defaults, a study's defaults and the keys a study may set are all read from
those fields here, never typed again: a default changed in a config changes `--help`, the
studies and the docs with it (tests/test_help.py and tests/test_study.py check that they agree).
"""

from __future__ import annotations

import dataclasses
from typing import Any


def default_of(config: type, name: str) -> Any:
    """A config dataclass's default for field `name` (its factory called, for a list)."""
    spec = config.__dataclass_fields__[name]
    if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
        raise KeyError(f"{config.__name__}.{name} has no default")
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


def settable(config: type, *, less: set[str]) -> set[str]:
    """The fields of `config` a study's table may set: all, less those the study sets its own
    way (`less`)."""
    names = {f.name for f in dataclasses.fields(config)}
    unknown = less - names
    if unknown:  # a renamed field must not silently become settable
        raise KeyError(f"{config.__name__} has no field(s) {sorted(unknown)}")
    return names - less
