"""What identifies features and files, importable without torch (stores are read without it).

- `card_fingerprint`: the sha256 of the backbone-card fields that decide whether two feature sets
  are interchangeable (a store's features, a fit result, an exported model all carry it);
- `manifest_seal`: the sha256 of a store manifest's whole content (every field but the seal and
  the `updated` time stamp), which readers and `verify` check: a card or dataset field edited by
  hand (a model name, `logit_scale`, a class name) is refused, not copied into results;
- `canonical_sha256`: the sha256 of any JSON value in one canonical form (run identities);
- `file_sha256`: the one file hasher (weights files, split files, model-folder files), streamed
  in 4 MiB blocks so a multi-GB checkpoint never sits in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

# Backbone-card fields that identify the features (versions and labels are informative only),
# each hashed under a frozen label: the card's keys were renamed in store schema 2 (T ->
# tokens, ...; store/compat.py), and a renamed key must not change any store's fingerprint.
CARD_KEY_RENAMES = {"T": "tokens", "C": "channels", "D": "embed_dim", "grid": "token_grid"}
_FROZEN_LABELS = {new: old for old, new in CARD_KEY_RENAMES.items()}
FINGERPRINT_FIELDS = {key: _FROZEN_LABELS.get(key, key) for key in (
    "family", "model_config_sha256", "weights_sha256", "init_seed", "quick_gelu", "image_size",
    "mean", "std", "interpolation", "resize_mode", "cut", "tokens", "channels", "embed_dim",
    "token_grid")}
_BLOCK = 1 << 22
_MEMO: dict[tuple[str, int, int], str] = {}


def card_fingerprint(card: dict[str, Any]) -> str:
    """sha256 of the backbone-card fields that decide whether two feature sets are
    interchangeable."""
    identity = {label: card.get(key) for key, label in FINGERPRINT_FIELDS.items()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


SEAL_FIELD = "manifest_sha256"
UNSEALED_FIELDS = (SEAL_FIELD, "updated")  # the seal itself, and a time stamp of no meaning


def canonical_sha256(value: Any) -> str:
    """sha256 of a JSON value with sorted keys and no whitespace: equal values, equal digests
    (NaN is refused: it is never equal to itself)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_seal(manifest: dict[str, Any]) -> str:
    """The seal of a store manifest: every field but the seal and `updated`."""
    return canonical_sha256({k: v for k, v in manifest.items() if k not in UNSEALED_FIELDS})


def file_sha256(path: str | os.PathLike, *, memo: bool = False) -> str:
    """sha256 of a file's bytes, streamed.

    `memo=True` remembers the digest per (path, size, mtime) for the process: loading the same
    multi-GB weights file twice (extract's client and a worker in one process) hashes it once.
    Checks of files that may have been tampered with (model folders) do not memoise.
    """
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if memo and key in _MEMO:
        return _MEMO[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    _MEMO[key] = digest.hexdigest()
    return _MEMO[key]
