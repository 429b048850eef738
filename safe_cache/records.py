"""Typed identities: the backbone card and the store manifest as frozen dataclasses with
`to_dict` / `from_dict` (zarr-python's config style), importable without torch.

`from_dict` is the one reader of a card or manifest written to disk: an unknown, missing or
wrong-typed field is an error naming the file and the field, never a KeyError deep in fit. A bool
is not a number, and a float is finite. The dict forms stay what callers index (`manifest[
"backbone"]["model"]`); these classes are what decides whether such a dict may be trusted.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar, Union

from .errors import StoreError

T = TypeVar("T", bound="Record")
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def type_problem(value: Any, hint: Any) -> str | None:
    """Why `value` is not of type `hint` (None when it is). JSON's forms: a list for a tuple."""
    if hint is Any:
        return None
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        problems = [type_problem(value, option) for option in options]
        return None if any(p is None for p in problems) else next(
            p for p in problems if p is not None)
    if hint is type(None):
        return None if value is None else f"is {value!r}, not null"
    if hint is bool:
        return None if isinstance(value, bool) else f"is {value!r}, not true/false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else \
            f"is {value!r}, not an integer"
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"is {value!r}, not a number"
        return None if math.isfinite(value) else f"is {value!r}, not a finite number"
    if hint is str:
        return None if isinstance(value, str) else f"is {value!r}, not a text"
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return f"is {value!r}, not a list"
        args = [a for a in typing.get_args(hint) if a is not Ellipsis] or [Any]
        for index, item in enumerate(value):
            problem = type_problem(item, args[0] if len(args) == 1 else args[index]
                                   if index < len(args) else Any)
            if problem:
                return f"[{index}] {problem}"
        return None
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return f"is {value!r:.60}, not an object"
        args = typing.get_args(hint)
        for key, item in value.items():
            if not isinstance(key, str):
                return f"has a key {key!r} that is not a text"
            problem = type_problem(item, args[1]) if args else None
            if problem:
                return f".{key} {problem}"
        return None
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return None if isinstance(value, dict) else f"is {value!r:.60}, not an object"
    raise TypeError(f"records.py cannot check the type {hint!r}")  # a programming error


@dataclass(frozen=True)
class Record:
    """Base of the typed records: strict `from_dict`, plain `to_dict`."""

    @classmethod
    def from_dict(cls: type[T], data: Any, source: str = "<record>",
                  error: type[Exception] = StoreError, where: str = "") -> T:
        """A record from its JSON form; `source` (the file) and the field path in errors."""
        prefix = f"{source}: {where}" if where else f"{source}: "
        if not isinstance(data, dict):
            raise error(f"{prefix.rstrip(': ')} is not a JSON object.")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise error(f"{prefix}field '{unknown[0]}' is unknown to this safe-cache (edited,"
                        f" or written by a newer version); remove it or use a matching"
                        f" safe-cache.")
        values = {}
        for name, spec in known.items():
            if name not in data:
                if spec.default is dataclasses.MISSING and \
                        spec.default_factory is dataclasses.MISSING:
                    raise error(f"{prefix}field '{name}' is missing; the file is damaged or"
                                f" from another tool. Write it again (re-extract, or fit"
                                f" --force).")
                continue
            hint = _hints(cls)[name]
            value = data[name]
            nested = _record_type(hint)
            if nested is not None and isinstance(value, dict):
                value = nested.from_dict(value, source, error, f"{where}{name}.")
            else:
                problem = type_problem(value, hint)
                if problem:
                    raise error(f"{prefix}field '{name}' {problem}; the file was edited or is"
                                f" damaged. Write it again (re-extract, or fit --force).")
            values[name] = value
        record = cls(**values)
        record.check(source, error)
        return record

    def check(self, source: str, error: type[Exception]) -> None:
        """Value ranges beyond types (subclasses)."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            out[spec.name] = value.to_dict() if isinstance(value, Record) else value
        return out


def _record_type(hint: Any) -> type[Record] | None:
    options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) \
        else (hint,)
    for option in options:
        if isinstance(option, type) and issubclass(option, Record):
            return option
    return None


@dataclass(frozen=True)
class BackboneCard(Record):
    """What a store's features were made by (model/backbone.py writes it): identity fields
    (the fingerprint's, identity.FINGERPRINT_FIELDS) and labels that name it in results."""

    schema: int
    model: str
    model_config_sha256: str | None
    family: str
    pretrained: str | None
    weights_sha256: str | None
    init_seed: int | None
    quick_gelu: bool
    image_size: list[int]
    mean: list[float]
    std: list[float]
    interpolation: str
    resize_mode: str
    cut: str
    tokens: int  # tokens of the dense map (prefix tokens, then the token grid's)
    channels: int  # channels of each token
    embed_dim: int  # the pooled (and text) embedding's size
    token_grid: list[int]  # (H, W) of the spatial tokens
    logit_scale: float
    open_clip_version: str
    torch_version: str
    hub_id: str | None = None
    logit_bias: float | None = None

    def check(self, source: str, error: type[Exception]) -> None:
        for name in ("tokens", "channels", "embed_dim"):
            if getattr(self, name) < 1:
                raise error(f"{source}: backbone.{name} {getattr(self, name)} must be >= 1.")
        if not 0 < self.logit_scale <= 1e4:
            raise error(f"{source}: backbone.logit_scale {self.logit_scale} is not a CLIP"
                        f" logit scale (0, 1e4].")
        if (self.pretrained is None) != (self.weights_sha256 is None):
            raise error(f"{source}: backbone.pretrained {self.pretrained!r} but weights_sha256"
                        f" {self.weights_sha256!r}: pretrained weights are always hashed, random"
                        f" ones never (edited by hand?). Re-extract the store.")


@dataclass(frozen=True)
class DatasetBlock(Record):
    """What a store records about its dataset (data/datasets.Dataset.describe)."""

    name: str
    num_classes: int
    classnames: list[str]
    kind: str = "folder"
    split_source: str | None = None
    split_sha256: str | None = None
    generated_split: bool = False
    class_subset: list[int] | None = None
    tip_adapter: dict[str, Any] = field(default_factory=dict)
    split_sizes: dict[str, int] = field(default_factory=dict)

    def check(self, source: str, error: type[Exception]) -> None:
        from .names import plain_name_problem

        problem = plain_name_problem(self.name)
        if problem:
            raise error(f"{source}: dataset.name {self.name!r} {problem}; it names the results"
                        f" folder, so it must be a plain name. Re-extract the store.")
        if self.num_classes != len(self.classnames):
            raise error(f"{source}: dataset.num_classes {self.num_classes} but"
                        f" {len(self.classnames)} class names.")


@dataclass(frozen=True)
class ViewsBlock(Record):
    count: int
    seed: int
    scale: list[float]
    augmentation: str = ""
    decode: str = "pil"


@dataclass(frozen=True)
class StoreManifest(Record):
    """The store's manifest (the root zarr.json's `safe_cache` attribute, store/store.py)."""

    schema_version: int
    backbone: BackboneCard
    backbone_fingerprint: str
    dataset: DatasetBlock
    views: ViewsBlock
    dtype: dict[str, str]
    shapes: dict[str, int]
    layout: dict[str, Any]
    tool_version: str
    created: str
    updated: str | None = None
    center_flip: bool = False
    skipped_images: list[dict[str, str]] = field(default_factory=list)
    manifest_sha256: str | None = None
