"""Range checks for config dataclasses: one line naming the option (as the CLI spells it), the
value and what is allowed, raised before any work starts.

Every check refuses what is not a finite number first: `nan < low` is False, so a plain range
test lets NaN through (`--lr nan` once trained to NaN weights and printed an accuracy), and
`inf` passes every lower bound. A bool is not a number here either.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import ConfigError


def option(field: str) -> str:
    return "--" + field.replace("_", "-")


def number(field: str, value: Any) -> float:
    """`value` if it is a finite number (not a bool), else one line naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{option(field)} {value!r}: must be a finite number.")
    return value


def whole_numbers(config: Any, names: Iterable[str]) -> None:
    """Each named field of `config` an int (not a bool, not a float such as 1e308)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{option(name)} {value!r}: must be a whole number.")


def at_least(field: str, value: float, low: float, *, what: str = "",
             high: float | None = None) -> None:
    """low <= value (<= high when given), a finite number."""
    number(field, value)
    if value < low or (high is not None and value > high):
        bound = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise ConfigError(f"{option(field)} {value}: must be {bound}{what}.")


def positive(field: str, value: float, *, high: float | None = None) -> None:
    """0 < value (<= high when given), a finite number."""
    number(field, value)
    if not value > 0 or (high is not None and value > high):
        bound = f"in (0, {high:g}]" if high is not None else "> 0"
        raise ConfigError(f"{option(field)} {value}: must be {bound}.")


def each(field: str, values: Sequence[float], low: float, *, strict: bool = False,
         example: str = "", high: float | None = None, most: int | None = None) -> None:
    """A non-empty list (of at most `most` values) whose every value is a finite number >= low
    (> low when strict, <= high when given)."""
    hint = f" (e.g. {example})" if example else ""
    if not values:
        raise ConfigError(f"{option(field)} is empty: give at least one value{hint}.")
    if most is not None and len(values) > most:
        raise ConfigError(f"{option(field)}: {len(values)} values, at most {most} allowed{hint}.")
    for value in values:
        number(field, value)
        if value < low or (strict and value == low) or (high is not None and value > high):
            bound = f"> {low:g}" if strict else f">= {low:g}"
            bound += f" and <= {high:g}" if high is not None else ""
            raise ConfigError(f"{option(field)} {value}: every value must be {bound}{hint}.")


def one_of(field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{option(field)} {value!r}: use one of {', '.join(map(str, choices))}.")


def subset_of(field: str, values: Iterable[Any], choices: Iterable[Any]) -> None:
    choices = list(choices)
    unknown = [v for v in values if v not in choices]
    if unknown:
        raise ConfigError(f"{option(field)} {unknown[0]!r} is unknown: use any of"
                          f" {', '.join(map(str, choices))}.")
