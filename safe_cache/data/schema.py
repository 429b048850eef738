"""The values a dataset spec may hold, checked when it is read (types come from DatasetSpec's
own annotations; this table adds the ranges): a spec decides folder and file names under the
data root, so `"name": "../../victim"` or `"folder": "../x"` must fail here, in one line that
names the file and the field, before fetch or extract touches anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..names import plain_name_problem, relative_path_problem

SPLIT_NAMES = ("train", "val", "test")
TIP_KEYS = {"search_scale", "search_step", "init_alpha", "init_gamma", "epochs"}


def _optional_relative(value: Any) -> str | None:
    return None if value is None else relative_path_problem(value)


def _split_counts(value: dict[str, int]) -> str | None:
    bad = [k for k, v in value.items() if k not in SPLIT_NAMES or v < 0]
    return f"has {bad[0]!r}: {value[bad[0]]!r}; keys are train, val, test and counts are" \
        f" >= 0" if bad else None


def _csv(value: dict[str, str] | None) -> str | None:
    for split, file in (value or {}).items():
        if split not in SPLIT_NAMES:
            return f"has a key {split!r}; keys are train, val, test"
        problem = relative_path_problem(file)
        if problem:
            return f"[{split}] {file!r} {problem}"
    return None


def _templates(value: tuple[str, ...]) -> str | None:
    if not value:
        return "is empty: give at least one template"
    bad = [t for t in value if "{}" not in t]
    if bad:
        return f"has {bad[0]!r}, which has no '{{}}' for the class name"
    for template in value:
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError):
            return f"has {template!r}, whose braces other than one '{{}}' are not a template" \
                   f" (write {{{{ and }}}} for literal braces)"
    return None


def _positive_numbers(value: Any, count: int, whole: bool) -> bool:
    return isinstance(value, list) and len(value) == count and all(
        not isinstance(v, bool) and isinstance(v, int if whole else (int, float))
        and math.isfinite(v) and v > 0 for v in value)


def _tip(value: dict[str, Any]) -> str | None:
    unknown = sorted(set(value) - TIP_KEYS)
    if unknown:
        return f"has an unknown key {unknown[0]!r}; known: {', '.join(sorted(TIP_KEYS))}"
    if "search_scale" in value and not _positive_numbers(value["search_scale"], 2, False):
        return f"search_scale {value['search_scale']!r} is not two numbers > 0"
    if "search_step" in value and not _positive_numbers(value["search_step"], 2, True):
        return f"search_step {value['search_step']!r} is not two whole numbers > 0"
    for key in ("init_alpha", "init_gamma", "epochs"):
        if key in value and not _positive_numbers([value[key]], 1, key == "epochs"):
            return f"{key} {value[key]!r} is not a {'whole ' if key == 'epochs' else ''}" \
                   f"number > 0"
    return None


CHECKS: dict[str, Callable[[Any], str | None]] = {
    "name": plain_name_problem,
    "folder": relative_path_problem,
    "image_dir": lambda v: relative_path_problem(v, allow_dot=True),
    "split_file": _optional_relative,
    "classnames_file": _optional_relative,
    "num_classes": lambda v: None if v is None or v >= 1 else f"is {v}, not a count >= 1",
    "split_sizes": _split_counts,
    "templates": _templates,
    "tip_adapter": _tip,
    "csv": _csv,
}


def value_problem(field: str, value: Any) -> str | None:
    """Why a spec field's (well-typed) value is out of range; None when it is fine."""
    check = CHECKS.get(field)
    return check(value) if check else None
