"""safe-cache: SAFE few-shot CLIP adaptation from cached dense feature maps.

Stage 1 (`extract`) runs the frozen trunk once per image into a Zarr store; stage 2 (`fit`) trains
the pooling head from the store. The library calls behind every CLI command are importable here.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .cards import card_fingerprint
from .errors import (
    DatasetError,
    ModelConfigError,
    SafeCacheError,
    SafeCacheWarning,
    StoreError,
    StoreLockedError,
    StoreNotFoundError,
    UnsupportedModelError,
    WeightsUnavailableError,
)

try:
    __version__ = version("safe-cache")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"


def __getattr__(name: str):
    """Import torch-heavy modules lazily, so reading a store never pays for importing torch."""
    if name in {"load_backbone", "Backbone"}:
        from . import backbone

        return getattr(backbone, name)
    if name in {"load_model", "export_model"}:
        from . import export

        return getattr(export, name)
    if name in {"open_store", "create_store", "FeatureStore"}:
        from . import store

        return getattr(store, name)
    raise AttributeError(f"module 'safe_cache' has no attribute {name!r}")


__all__ = [
    "Backbone",
    "DatasetError",
    "ModelConfigError",
    "SafeCacheError",
    "SafeCacheWarning",
    "StoreError",
    "StoreLockedError",
    "StoreNotFoundError",
    "UnsupportedModelError",
    "WeightsUnavailableError",
    "__version__",
    "card_fingerprint",
    "create_store",
    "export_model",
    "load_backbone",
    "load_model",
    "open_store",
]
