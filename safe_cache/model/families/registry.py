"""The registry of backbone families, filled by `@register_family` (timm's `@register_model`
style): every question "which family is this, and what does it do?" is asked here, so a family
is one file and no `if family == ...` chain grows anywhere else.

Family rules are disjoint (each claims what the others do not), so the order of the registry is
only the order in which messages and listings name the families.
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn

from ...errors import ModelConfigError, UnsupportedModelError
from .base import Config, Family

FAMILIES: dict[str, Family] = {}
UNSUPPORTED = "unsupported"  # config_family's family for a config no family can split

F = TypeVar("F", bound=type[Family])


def register_family(cls: F) -> F:
    """Class decorator: make a `Family` subclass known under its `name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name == UNSUPPORTED:
        raise ModelConfigError(f"Backbone family {cls.__qualname__} needs a `name` (the backbone"
                               f" card's family), other than '{UNSUPPORTED}'.")
    if name in FAMILIES:
        raise ModelConfigError(f"Two backbone families are named '{name}' ({cls.__module__} and"
                               f" {type(FAMILIES[name]).__module__}): rename one.")
    FAMILIES[name] = cls()
    return cls


def family(name: str) -> Family:
    """The family a backbone card names."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedModelError(
            f"Backbone family '{name}' is not one this safe-cache knows ({', '.join(FAMILIES)}):"
            f" upgrade safe-cache, or extract the features again with this version.") from None


def supported_text() -> str:
    return "; ".join(f"{f.name}: {f.description}" for f in FAMILIES.values())


def config_family(config: Config) -> tuple[str, str]:
    """(family, reason) from an open_clip model config, without building the model.

    family is a registered family's name or 'unsupported'; reason says why a config is
    unsupported ('' otherwise).
    """
    claimed = [f for f in FAMILIES.values() if f.claims_config(config)]
    if not claimed:
        return UNSUPPORTED, _unclaimed_config(config)
    owner = _only(claimed, "config")
    problem = owner.config_problem(config)
    return (UNSUPPORTED, problem) if problem else (owner.name, "")


def config_refusal(config: Config) -> str:
    """Why a config cannot be split for SAFE, '' when some family splits it."""
    return config_family(config)[1]


def module_family(visual: nn.Module) -> Family:
    """The family of a built visual tower; a clear error for a tower none can split exactly."""
    claimed = [f for f in FAMILIES.values() if f.claims_module(visual)]
    if not claimed:
        raise UnsupportedModelError(_unclaimed_module(visual))
    owner = _only(claimed, "visual tower")
    problems = owner.module_problems(visual)
    if problems:
        raise UnsupportedModelError(
            f"{owner.module_label(visual)} cannot be split for SAFE: {'; '.join(problems)}."
            f" Supported: {supported_text()}.")
    return owner


def _only(claimed: list[Family], what: str) -> Family:
    """The one family that claims a tower: the rules are meant to be disjoint."""
    if len(claimed) > 1:
        names = ", ".join(f.name for f in claimed)
        raise ModelConfigError(f"The backbone families {names} all claim this {what}: their"
                               f" rules must not overlap; narrow one family file's claims_*.")
    return claimed[0]


def _unclaimed_config(config: Config) -> str:
    vision = config.get("vision_cfg", {})
    if "timm_model_name" not in vision:
        return "no backbone family of safe-cache recognises its visual tower"
    name, pool = vision["timm_model_name"], vision.get("timm_pool", "avg")
    if pool == "token":
        return (f"timm tower {name} pools by its class token, but it is not one of the timm"
                f" towers a family of safe-cache splits")
    return (f"timm tower {name} pools by '{pool or 'its own head'}', without attention: SAFE"
            f" fine-tunes an attention-pooling layer, and this tower has none")


def _unclaimed_module(visual: nn.Module) -> str:
    trunk = getattr(visual, "trunk", None)
    if trunk is None:  # not open_clip's TimmModel
        return (f"Visual tower {type(visual).__name__} is not supported (SAFE fine-tunes CLIP's"
                f" attention pooling). Supported: {supported_text()}.")
    how = getattr(trunk, "global_pool", "") or "its own head"
    name = type(trunk).__name__
    if how == "token":
        return (f"The timm tower {name} pools by its class token, but it is not one of the timm"
                f" towers a family of safe-cache splits. Supported: {supported_text()}.")
    return (f"The timm tower {name} pools by '{how}', not with attention: SAFE fine-tunes an"
            f" attention-pooling layer (the query that decides which tokens matter), and a"
            f" parameter-free pool has none. Supported: {supported_text()}.")
