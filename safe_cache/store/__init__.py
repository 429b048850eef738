"""The feature store: Zarr v3 groups of dense maps, readable without torch.

schema (the one table of arrays), store (create, open, read, write), lease (one writer at a
time), verify, chunkcache (a local cache of a remote store's feature chunks), transfer (copy),
paths (default store names), catalog (finding stores). Imports nothing above it and no torch.
"""

from __future__ import annotations

from .paths import absolute_url, default_store_url, weights_label
from .schema import SCHEMA_VERSION, SPLITS
from .store import FeatureStore, StoreLayout, check_fingerprint, create_store, open_store

__all__ = [
    "SCHEMA_VERSION",
    "SPLITS",
    "FeatureStore",
    "StoreLayout",
    "absolute_url",
    "check_fingerprint",
    "create_store",
    "default_store_url",
    "open_store",
    "weights_label",
]
