"""Backbone families: one module per way an open_clip visual tower pools, each a `Family` class
registered by `@register_family` (registry.py) that owns its detection rules, its trunk, its
heads and its dense map's shape (base.py says what a family provides).

Adding a family is one file here, imported below; tests/test_families.py fails when a module of
this folder is not in the registry, and the split and gradient contract tests run over every
registered family's tiny configs without being told about it.
"""

from __future__ import annotations

# Each import registers its family; their order is the order messages and listings name them.
# isort: off
from . import resnet, vit, map, coca, eva  # noqa: F401
# isort: on
from .base import Family, Trunk
from .registry import (
    FAMILIES,
    UNSUPPORTED,
    config_family,
    config_refusal,
    family,
    module_family,
    register_family,
    supported_text,
)

__all__ = [
    "FAMILIES",
    "UNSUPPORTED",
    "Family",
    "Trunk",
    "config_family",
    "config_refusal",
    "family",
    "module_family",
    "register_family",
    "supported_text",
]
