"""Range checks for config dataclasses: one line naming the option (as the CLI spells it), the
value and what is allowed, raised before any work starts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import ConfigError


def option(field: str) -> str:
    return "--" + field.replace("_", "-")


def at_least(field: str, value: float, low: float, *, what: str = "") -> None:
    if value is None or value < low:
        raise ConfigError(f"{option(field)} {value}: must be >= {low:g}{what}.")


def positive(field: str, value: float) -> None:
    if value is None or not value > 0:
        raise ConfigError(f"{option(field)} {value}: must be > 0.")


def each(field: str, values: Sequence[float], low: float, *, strict: bool = False,
         example: str = "") -> None:
    """A non-empty list whose every value is >= low (> low when strict)."""
    if not values:
        raise ConfigError(f"{option(field)} is empty: give at least one value"
                          f"{' (e.g. ' + example + ')' if example else ''}.")
    for value in values:
        if value < low or (strict and value == low):
            bound = f"> {low:g}" if strict else f">= {low:g}"
            raise ConfigError(f"{option(field)} {value}: every value must be {bound}"
                              f"{' (e.g. ' + example + ')' if example else ''}.")


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
