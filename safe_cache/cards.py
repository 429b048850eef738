"""Backbone-card fingerprints, importable without torch (stores are read without it)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Card fields that identify the features; versions and labels are informative only.
FINGERPRINT_FIELDS = (
    "family", "model_config_sha256", "weights_sha256", "init_seed", "quick_gelu", "image_size",
    "mean", "std", "interpolation", "resize_mode", "cut", "T", "C", "D", "grid",
)


def card_fingerprint(card: dict[str, Any]) -> str:
    """sha256 of the fields that decide whether two feature sets are interchangeable."""
    identity = {key: card.get(key) for key in FINGERPRINT_FIELDS}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
